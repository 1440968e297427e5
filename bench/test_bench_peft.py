"""One training step of a Llama-3-vocabulary causal LM with LoRA on ``q_proj``, ``v_proj`` and
``lm_head`` (PEFT): the PEFT model as it is, and wrapped by ``ChunkedLMHead.wrap`` (whose loss
applies the LoRA head as ``[x, s * lora_A(x)] @ [W, B].T`` block by block), in the same run.

    pytest bench/test_bench_peft.py --benchmark-only --benchmark-json=out/peft.json

V = 128,256, hidden size 1024, one decoder layer, 2048 tokens, fp32 (on CPUs without native
bf16 GEMMs the unwrapped bf16 head alone would take minutes per step). Each case records
``peak_mib`` and ``working_mib`` (peak minus the trainable parameters' gradients) and
``logits_mib``, the size of one ``[tokens, V]`` fp32 logits tensor; the wrapped case also its
peak's ratio to the unwrapped case's of the same run (the unwrapped case runs first).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import chunklogits as cl
from bench.common import LLAMA3_VOCAB, MiB, device, llama3_one_layer, measure

TOKENS = 2048
VARIANTS = ["peft", "peft-chunklogits-wrap"]

_peaks: dict[str, float] = {}


def _model() -> torch.nn.Module:
    model = llama3_one_layer(TOKENS)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "lm_head"])
    return get_peft_model(model, lora).train()


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_head_training_step(benchmark, variant):
    model = _model()
    if variant == "peft-chunklogits-wrap":
        cl.ChunkedLMHead.wrap(model)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(LLAMA3_VOCAB, (1, TOKENS), generator=generator).to(device())

    def reset():
        model.zero_grad(set_to_none=True)

    def step():
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    trainable = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    benchmark.group = f"LoRA on lm_head, training step, {TOKENS} tokens"
    measure(benchmark, step, reset=reset, returned_bytes=trainable, rounds=1)
    peak = benchmark.extra_info["peak_mib"]
    benchmark.extra_info["logits_mib"] = round(TOKENS * LLAMA3_VOCAB * 4 / MiB, 1)
    if variant == "peft":
        _peaks["peft"] = peak
    elif "peft" in _peaks:
        benchmark.extra_info["peak_ratio_to_peft"] = round(peak / _peaks["peft"], 3)
