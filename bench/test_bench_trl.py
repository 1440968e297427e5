"""One GRPO-style step of a Llama-3-shaped head (V = 128,256): per-token log-probs and entropy,
forward and backward of ``sum(adv * logprobs) + 0.01 * sum(entropy)``, through TRL 1.16's own
fused head (``trl.kernels.ChunkedLogProbFunction``, what ``add_fused_lm_head`` runs), through
chunklogits (the ``row_stats`` call that ``chunklogits.integrations.trl`` makes, here through
``cl.token_logprobs``) and through the naive materialising path, in one run.

    pytest bench/test_bench_trl.py --benchmark-only --benchmark-json=out/trl.json

Each case records ``peak_mib``, ``working_mib`` (peak minus the returned gradients of hidden
and weight) and the largest errors against fp64 of the log-probs, the entropies and the two
gradients in ``extra_info``. fp32 at N = 1024, D = 256 (two timed rounds); bf16 at N = 32,
D = 256 (one): TRL's kernel and the naive path multiply bf16 in bf16, about 100 times slower than
fp32 on a CPU without AVX512-BF16/AMX, where chunklogits multiplies in fp32
(``set_cpu_gemm_dtype("auto")``).
"""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl
from bench.common import device, measure
from chunklogits import reference

trl_kernels = pytest.importorskip("trl.kernels")

VOCAB = 128256
ENTROPY_WEIGHT = 0.01
TEMPERATURE = 1.0
# (tokens N, hidden D, timed rounds) per dtype.
SHAPES = {torch.float32: (1024, 256, 2), torch.bfloat16: (32, 256, 1)}
# TRL's vocabulary width per tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16).
TRL_CHUNK = 32768


def _trl(h, w, y):
    logp, entropy, *_ = trl_kernels.ChunkedLogProbFunction.apply(
        h, w, None, y, TEMPERATURE, TRL_CHUNK, None, 1.0, ("log_probs", "entropy")
    )
    return logp, entropy


CASES = {
    "naive-upcast": lambda h, w, y: reference.token_logprobs(
        h, w, y, temperature=TEMPERATURE, return_entropy=True
    ),
    "trl-fused-lm-head": _trl,
    "chunklogits": lambda h, w, y: cl.token_logprobs(
        h, w, y, temperature=TEMPERATURE, return_entropy=True
    ),
}

_inputs: dict[torch.dtype, tuple] = {}
_exact: dict[torch.dtype, tuple] = {}


def inputs(dtype):
    """hidden ``[N, D]``, weight ``[V, D]`` (requiring grad), tokens and advantages ``[N]``."""
    if dtype not in _inputs:
        n, d, _ = SHAPES[dtype]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, d, generator=g) / d**0.5
        weight = torch.randn(VOCAB, d, generator=g) / d**0.25
        tokens = torch.randint(0, VOCAB, (n,), generator=g)
        advantages = torch.randn(n, generator=g)
        h, w = (t.to(device(), dtype).requires_grad_() for t in (hidden, weight))
        _inputs[dtype] = (h, w, tokens.to(device()), advantages.to(device()))
    return _inputs[dtype]


def exact(dtype):
    """fp64 log-probs, entropies and gradients of the objective, 128 rows at a time."""
    if dtype not in _exact:
        hidden, weight, tokens, advantages = inputs(dtype)
        w = weight.detach().double().requires_grad_()
        logps, entropies, grad_rows = [], [], []
        for r in range(0, hidden.shape[0], 128):
            h = hidden[r : r + 128].detach().double().requires_grad_()
            logp, entropy = reference.token_logprobs(
                h, w, tokens[r : r + 128], temperature=TEMPERATURE, return_entropy=True
            )
            objective = (advantages[r : r + 128] * logp).sum() + ENTROPY_WEIGHT * entropy.sum()
            objective.backward()
            logps.append(logp.detach())
            entropies.append(entropy.detach())
            grad_rows.append(h.grad)
        _exact[dtype] = (torch.cat(logps), torch.cat(entropies), torch.cat(grad_rows), w.grad)
    return _exact[dtype]


@pytest.mark.parametrize("impl", list(CASES))
@pytest.mark.parametrize("dtype", list(SHAPES), ids=lambda d: str(d).removeprefix("torch."))
def test_grpo_logprob_entropy_step(benchmark, dtype, impl):
    hidden, weight, tokens, advantages = inputs(dtype)
    fn = CASES[impl]
    outputs = []

    def reset():
        hidden.grad = weight.grad = None

    def step():
        logp, entropy = fn(hidden, weight, tokens)
        objective = (advantages * logp).sum() + ENTROPY_WEIGHT * entropy.sum()
        objective.backward()
        outputs.append((logp.detach(), entropy.detach()))

    n, d, rounds = SHAPES[dtype]
    benchmark.group = f"GRPO log-probs + entropy fwd+bwd {str(dtype)[6:]} N={n} D={d} V={VOCAB}"
    returned = hidden.nbytes + weight.nbytes
    measure(benchmark, step, reset=reset, returned_bytes=returned, rounds=rounds)
    step()  # once more, for the gradients
    exact_logp, exact_entropy, exact_grad_hidden, exact_grad_weight = exact(dtype)
    logp, entropy = outputs[-1]
    errors = {
        "logprob_max_error": (logp, exact_logp),
        "entropy_max_error": (entropy, exact_entropy),
        "grad_hidden_max_error": (hidden.grad, exact_grad_hidden),
        "grad_weight_max_error": (weight.grad, exact_grad_weight),
    }
    for key, (ours, truth) in errors.items():
        benchmark.extra_info[key] = (ours.double() - truth).abs().max().item()
    reset()
