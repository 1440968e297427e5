"""Assisted decoding: memory of a verification step and tokens per second, against generate().

    pytest bench/test_bench_assisted.py --benchmark-only --benchmark-json=out/assisted.json

A Llama-shaped target (D = 512, 4 layers, bf16) at V = 128,256 and 256,000, and as its draft a
truncated copy of it (the same embeddings, head and first layer: a draft that agrees often), one
prompt of 64 tokens, greedy. Group ``assisted-verify-V``: ``max_new_tokens=6`` with a constant
schedule of 5 drafts, so one round drafts 5 tokens and the target verifies them in one forward;
``peak_mib`` is the whole call's peak (prefill included), where ``generate()`` holds the
target's ``[1, 6, V]`` fp32 logits and the draft's rows, and ``cl.sample`` none. Group
``assisted-tokens-V``: 48 new tokens with and without the draft, ``tokens_per_s`` in
``extra_info``; the sequences of ``cl.sample`` and ``generate()`` are checked equal first.
"""

from __future__ import annotations

import copy

import pytest
import torch

import chunklogits as cl
from bench.common import device, measure

PROMPT_LENGTH, VERIFY_TOKENS, NEW_TOKENS = 64, 6, 48
VOCABS = (128256, 256000)


def _pair(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        eos_token_id=None,  # every call generates all its tokens
        pad_token_id=0,
    )
    target = LlamaForCausalLM(config).to(torch.bfloat16).to(device()).eval()
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    draft.generation_config.num_assistant_tokens = VERIFY_TOKENS - 1
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    ids = torch.randint(1, vocab, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    return target, draft, ids.to(device())


_pairs: dict[int, tuple] = {}


def pair(vocab: int):
    if vocab not in _pairs:
        _pairs[vocab] = _pair(vocab)
    return _pairs[vocab]


def _decode(name: str, target, draft, ids, new_tokens: int):
    assistant = {} if name.endswith("no-draft") else {"assistant_model": draft}
    if name.startswith("hf-generate"):
        return target.generate(ids, do_sample=False, max_new_tokens=new_tokens, **assistant)
    return cl.sample(target, ids, do_sample=False, max_new_tokens=new_tokens, **assistant)


@pytest.mark.parametrize("name", ["hf-generate", "chunklogits"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_verification_step(benchmark, vocab, name):
    target, draft, ids = pair(vocab)
    benchmark.group = f"assisted-verify-{vocab}"
    with torch.no_grad():
        measure(benchmark, lambda: _decode(name, target, draft, ids, VERIFY_TOKENS), rounds=3)


@pytest.mark.parametrize(
    "name", ["hf-generate", "hf-generate-no-draft", "chunklogits", "chunklogits-no-draft"]
)
@pytest.mark.parametrize("vocab", VOCABS)
def test_tokens_per_second(benchmark, vocab, name):
    target, draft, ids = pair(vocab)
    benchmark.group = f"assisted-tokens-{vocab}"
    with torch.no_grad():
        ours = _decode("chunklogits", target, draft, ids, NEW_TOKENS)
        assert torch.equal(ours, _decode("hf-generate", target, draft, ids, NEW_TOKENS))
        measure(benchmark, lambda: _decode(name, target, draft, ids, NEW_TOKENS), rounds=2)
    benchmark.extra_info["tokens_per_s"] = round(NEW_TOKENS / benchmark.stats.stats.mean, 1)
