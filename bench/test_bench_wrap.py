"""One training step (forward + backward) of a Llama-3-shaped causal LM: the transformers model as
it is, and wrapped by ``ChunkedLMHead.wrap``, in the same run.

    pytest bench/test_bench_wrap.py --benchmark-only --benchmark-json=out/wrap.json

The model has Llama 3's vocabulary (V = 128,256), untied embeddings, hidden size 1024 and one
decoder layer, in bf16, so that the output layer dominates as in fine-tuning at long context.
Each case records ``peak_mib`` and ``working_mib`` (peak minus the parameter gradients the step
returns; bench/common.py) and ``logits_mib``, the size of one ``[tokens, V]`` bf16 logits tensor.
The wrapped case also records its peak's ratio to the unwrapped case's of the same run and the
MiB saved (the unwrapped case runs first).
"""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl
from bench.common import LLAMA3_VOCAB, MiB, device, llama3_one_layer, measure

SEQUENCE = 2048
TOKENS = [2048, 8192]  # sequences of SEQUENCE tokens: 1 and 4 of them
VARIANTS = ["transformers", "chunklogits-wrap"]

_peaks: dict[int, float] = {}  # tokens -> the unwrapped case's peak_mib in this run


@pytest.fixture(scope="module")
def model():
    return llama3_one_layer(SEQUENCE, torch.bfloat16).train()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_training_step(benchmark, model, tokens, variant):
    generator = torch.Generator().manual_seed(tokens)
    input_ids = torch.randint(LLAMA3_VOCAB, (tokens // SEQUENCE, SEQUENCE), generator=generator)
    input_ids = input_ids.to(device())

    def reset():
        model.zero_grad(set_to_none=True)

    def step():
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    grads_bytes = sum(p.nbytes for p in model.parameters())
    benchmark.group = f"training step, {tokens} tokens"
    if variant == "chunklogits-wrap":
        cl.ChunkedLMHead.wrap(model)
    try:
        measure(benchmark, step, reset=reset, returned_bytes=grads_bytes, rounds=1)
    finally:
        if variant == "chunklogits-wrap":
            cl.ChunkedLMHead.unwrap(model)
    peak = benchmark.extra_info["peak_mib"]
    benchmark.extra_info["logits_mib"] = round(tokens * LLAMA3_VOCAB * 2 / MiB, 1)
    if variant == "transformers":
        _peaks[tokens] = peak
    elif tokens in _peaks:
        benchmark.extra_info["peak_ratio_to_transformers"] = round(peak / _peaks[tokens], 3)
        benchmark.extra_info["saved_mib"] = round(_peaks[tokens] - peak, 1)
