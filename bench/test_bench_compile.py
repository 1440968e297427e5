"""One training step (forward + backward) of a causal LM under ``torch.compile``: the model as it
is, compiled and eager; wrapped by ``ChunkedLMHead.wrap``, eager and compiled (one graph with the
chunked loss inside as the custom op ``chunklogits::linear_cross_entropy_and_grads``), in the
same run.

    pytest bench/test_bench_compile.py --benchmark-only --benchmark-json=out/compile.json

The model is a Llama with a 32k vocabulary, hidden size 512 and two decoder layers in fp32, on
4 sequences of 512 tokens, compiled with ``fullgraph=True`` (inductor); the compile happens in
the warm-up round, outside the timings. Each case records ``peak_mib`` and ``working_mib``
(peak minus the parameter gradients; bench/common.py) and ``logits_mib``, the size of one
``[tokens, V]`` fp32 logits tensor; the other cases record their peak's ratio to the compiled
unwrapped case's of the same run (which runs first). The compiled wrapped step's loss op
computes the head's gradients with the loss, by the eager engine: the same GEMMs over the head as
the eager wrapped step (``chunklogits._library``).
"""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl
from bench.common import MiB, device, measure

SIZE = {"vocab": 32768, "hidden": 512, "layers": 2, "batch": 4, "sequence": 512}
VARIANTS = ["compiled", "eager", "chunklogits-wrap-eager", "chunklogits-wrap-compiled"]

_peaks: dict[str, float] = {}  # the compiled unwrapped case's peak_mib in this run


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=SIZE["vocab"],
        hidden_size=SIZE["hidden"],
        intermediate_size=4 * SIZE["hidden"],
        num_hidden_layers=SIZE["layers"],
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=SIZE["sequence"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device()).train()


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step(benchmark, model, variant):
    generator = torch.Generator().manual_seed(0)
    shape = (SIZE["batch"], SIZE["sequence"])
    input_ids = torch.randint(SIZE["vocab"], shape, generator=generator).to(device())
    wrapped = variant.startswith("chunklogits-wrap")
    if wrapped:
        cl.ChunkedLMHead.wrap(model)
    torch._dynamo.reset()
    run = model if variant.endswith("eager") else torch.compile(model, fullgraph=True)

    def reset():
        model.zero_grad(set_to_none=True)

    def step():
        run(input_ids=input_ids, labels=input_ids).loss.backward()

    grads_bytes = sum(p.nbytes for p in model.parameters())
    tokens = input_ids.numel()
    benchmark.group = f"compiled training step, {tokens} tokens, V = {SIZE['vocab']}"
    try:
        measure(benchmark, step, reset=reset, returned_bytes=grads_bytes, rounds=3)
    finally:
        if wrapped:
            cl.ChunkedLMHead.unwrap(model)
        torch._dynamo.reset()
    peak = benchmark.extra_info["peak_mib"]
    benchmark.extra_info["logits_mib"] = round(tokens * SIZE["vocab"] * 4 / MiB, 1)
    if variant == "compiled":
        _peaks["compiled"] = peak
    elif "compiled" in _peaks:
        benchmark.extra_info["peak_ratio_to_compiled"] = round(peak / _peaks["compiled"], 3)
