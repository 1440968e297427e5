"""Peak memory of one training step (forward + backward) of a Llama-3-shaped causal LM, with its
output layer as transformers computes it and wrapped by ``ChunkedLMHead.wrap``, in the same run.

The model has Llama 3's vocabulary (V = 128,256) and untied embeddings, hidden size 1024 and one
decoder layer, so the output layer dominates as it does in real fine-tuning at long context.
``extra_info`` holds both peaks (bytes), their ratio, the bytes saved, the size of one
``[tokens, V]`` logits tensor in the model dtype, and the unwrapped step's seconds; the benchmark
times the wrapped step. The model is bf16, on CUDA when available, else on the CPU
(``chunklogits.memory.peak`` measures the allocator on CUDA, the resident set on CPU).

    pytest bench/test_bench_wrap.py --benchmark-only
"""

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import chunklogits as cl

VOCAB = 128_256
SEQUENCE = 2048
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=SEQUENCE,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(DEVICE, DTYPE).train()


def _step(model, input_ids) -> None:
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    model.zero_grad(set_to_none=True)


def _measured_step(model, input_ids) -> tuple[int, float]:
    """Peak bytes and seconds of one step, after a short warm-up step (kernels, lazy imports)."""
    _step(model, input_ids[:1, :256])
    start = time.perf_counter()
    with cl.memory.peak(DEVICE) as peak:
        _step(model, input_ids)
    return peak.bytes, time.perf_counter() - start


@pytest.mark.parametrize("tokens", [2048, 8192])
def test_training_step_peak_memory(benchmark, model, tokens):
    generator = torch.Generator().manual_seed(tokens)
    input_ids = torch.randint(VOCAB, (tokens // SEQUENCE, SEQUENCE), generator=generator)
    input_ids = input_ids.to(DEVICE)

    baseline_bytes, baseline_seconds = _measured_step(model, input_ids)
    cl.ChunkedLMHead.wrap(model, shards=8)
    try:
        measured = {}

        def wrapped_step():
            measured["bytes"], measured["seconds"] = _measured_step(model, input_ids)

        benchmark.pedantic(wrapped_step, rounds=1, iterations=1)
    finally:
        cl.ChunkedLMHead.unwrap(model)

    benchmark.extra_info.update(
        {
            "device": str(DEVICE),
            "dtype": str(DTYPE),
            "tokens": tokens,
            "vocab": VOCAB,
            "logits_bytes_model_dtype": tokens * VOCAB * DTYPE.itemsize,
            "peak_bytes_transformers": baseline_bytes,
            "peak_bytes_chunklogits": measured["bytes"],
            "peak_ratio_chunklogits_to_transformers": measured["bytes"] / baseline_bytes,
            "saved_bytes": baseline_bytes - measured["bytes"],
            "seconds_transformers": baseline_seconds,
            "seconds_chunklogits": measured["seconds"],
        }
    )
    assert measured["bytes"] < baseline_bytes
