"""Sampling: one step from hidden states to tokens, and whole generations, against HF's path in
the same run.

    pytest bench/test_bench_sampling.py --benchmark-only --benchmark-json=out/sampling.json

Group ``sampling-step``: B = 64 last hidden states, D = 1024, V = 256000 (Gemma's vocabulary),
bf16, temperature 0.8, top-k 50, top-p 0.9. HF's path is what ``generate()`` does per step:
``lm_head`` → ``.float()`` → ``TemperatureLogitsWarper`` → ``TopKLogitsWarper`` →
``TopPLogitsWarper`` → ``softmax`` → ``multinomial``. Targets: peak ≤ 50 MiB and time
≤ 0.6x HF's.

Group ``beam-step``: one step of beam search for 16 prompts x 8 beams (128 rows), D = 1024,
V = 256000, fp32 (a bf16 GEMM is ~100x slower than fp32 on an AVX2-only CPU): what
``generate(num_beams=8)`` computes per step (``lm_head`` → ``.float()`` → ``log_softmax`` → plus
the beam scores → ``topk(16)`` over ``[16, 8 * V]``) against ``beam_candidates`` (each row's 16
best log-probs and its log-sum-exp) plus the same ranking over the ``8 * 16`` candidates.

Group ``generate``: ``chunklogits.sample`` against ``model.generate(do_sample=True)`` (the
model's defaults: top-k 50) on a small random Llama-3-shaped model (V = 128256), 8 prompts of 64
tokens, 32 new tokens each; ``extra_info["tokens_per_s"]``. Target: at least HF's tokens/s.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import chunklogits as cl
from bench.common import device, measure
from chunklogits.sampling import beam_candidates

ROWS, DIM, VOCAB = 64, 1024, 256000
TEMPERATURE, TOP_K, TOP_P = 0.8, 50, 0.9
_HF_WARPERS = LogitsProcessorList(
    [TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)]
)


@pytest.fixture(scope="module")
def head():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, DIM, generator=g)
    weight = torch.randn(VOCAB, DIM, generator=g) / DIM**0.25
    return hidden.bfloat16().to(device()), weight.bfloat16().to(device())


def _hf_step(hidden, weight):
    scores = F.linear(hidden, weight).float()
    scores = _HF_WARPERS(None, scores)
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


def _chunklogits_step(hidden, weight):
    return cl.sample_next(hidden, weight, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)


STEPS = {"hf-generate-step": _hf_step, "chunklogits": _chunklogits_step}


@pytest.mark.benchmark(group="sampling-step")
@pytest.mark.parametrize("name", STEPS)
def test_sampling_step(benchmark, head, name):
    hidden, weight = head
    with torch.no_grad():
        measure(benchmark, lambda: STEPS[name](hidden, weight))


BEAM_PROMPTS, BEAMS = 16, 8


@pytest.fixture(scope="module")
def beam_head():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BEAM_PROMPTS * BEAMS, DIM, generator=g).to(device())
    weight = (torch.randn(VOCAB, DIM, generator=g) / DIM**0.25).to(device())
    scores = torch.randn(BEAM_PROMPTS, BEAMS, generator=g).to(device())
    return hidden, weight, scores


def _hf_beam_step(hidden, weight, scores):
    logprobs = F.linear(hidden, weight).float().log_softmax(-1)
    total = logprobs.view(BEAM_PROMPTS, BEAMS, -1) + scores[:, :, None]
    return total.flatten(1).topk(2 * BEAMS)


def _chunklogits_beam_step(hidden, weight, scores):
    logprobs, tokens = beam_candidates(hidden, weight, 2 * BEAMS)
    total = logprobs.view(BEAM_PROMPTS, BEAMS, -1) + scores[:, :, None]
    best, chosen = total.flatten(1).topk(2 * BEAMS)
    return best, tokens.view(BEAM_PROMPTS, -1).gather(1, chosen)


BEAM_STEPS = {"hf-generate-beam-step": _hf_beam_step, "chunklogits": _chunklogits_beam_step}


@pytest.mark.benchmark(group="beam-step")
@pytest.mark.parametrize("name", BEAM_STEPS)
def test_beam_step(benchmark, beam_head, name):
    with torch.no_grad():
        hf = _hf_beam_step(*beam_head)
        ours = _chunklogits_beam_step(*beam_head)
        torch.testing.assert_close(ours[0], hf.values, rtol=0, atol=1e-4)
        measure(benchmark, lambda: BEAM_STEPS[name](*beam_head))


PROMPTS, PROMPT_LENGTH, NEW_TOKENS = 8, 64, 32


@pytest.fixture(scope="module")
def llama3():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=None,  # every row generates NEW_TOKENS tokens, for both
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).to(device()).eval()
    ids = torch.randint(1, config.vocab_size, (PROMPTS, PROMPT_LENGTH), generator=torch.Generator())
    return model, ids.to(device()), torch.ones_like(ids).to(device())


GENERATORS = {
    "hf-generate": lambda model, ids, mask: model.generate(
        ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW_TOKENS
    ),
    "chunklogits": lambda model, ids, mask: cl.sample(
        model, ids, mask, do_sample=True, max_new_tokens=NEW_TOKENS
    ),
}


@pytest.mark.benchmark(group="generate")
@pytest.mark.parametrize("name", GENERATORS)
def test_generate(benchmark, llama3, name):
    model, ids, mask = llama3
    with torch.no_grad():
        out = GENERATORS[name](model, ids, mask)
        assert out.shape == (PROMPTS, PROMPT_LENGTH + NEW_TOKENS)
        measure(benchmark, lambda: GENERATORS[name](model, ids, mask))
    benchmark.extra_info["tokens_per_s"] = round(
        PROMPTS * NEW_TOKENS / benchmark.stats.stats.mean, 1
    )
