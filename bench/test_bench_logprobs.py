"""Per-token log-probs and entropy of a linear head (what RL trainers compute for every response
token): chunklogits against the materialising baselines, in one run.

    pytest bench/test_bench_logprobs.py --benchmark-only --benchmark-json=out/logprobs.json

Groups: log-probs alone and with the entropy, without grad (old-policy / reference-model scoring)
and forward + backward of ``sum(adv * logprobs) (+ 0.01 * sum(entropy))`` (the policy update).
Each case records ``peak_mib``, ``working_mib`` (peak minus the returned gradients) and the
largest error of its log-probs and entropies against fp64 in ``extra_info``. A case a library
does not offer is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl
from bench.common import head_inputs, measure, unavailable
from chunklogits import reference
from chunklogits.benchmark import (
    entropy_from_logits,
    selective_log_softmax,
    verl_entropy_from_logits,
)

SHAPE = "llama3-head-2k-x-1024"
ENTROPY_WEIGHT = 0.01


def _selective(h, w, y):
    # TRL's selective_log_softmax = verl's logprobs_from_logits_v2 on bf16 logits.
    return selective_log_softmax((h @ w.T)[None], y[None])[0]


def _trl(h, w, y):
    logits = h @ w.T
    with torch.no_grad():  # TRL's entropy is a metric
        entropy = entropy_from_logits(logits)
    return selective_log_softmax(logits[None], y[None])[0], entropy


def _verl(h, w, y):
    logits = h @ w.T
    return selective_log_softmax(logits[None], y[None])[0], verl_entropy_from_logits(logits)


def _cce(h, w, y):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if h.is_cuda else "torch_compile"
    return -linear_cross_entropy(h, w, y, reduction="none", impl=impl)


# (name, with entropy): the log-probs alone, or the log-probs and the entropy.
CASES = {
    ("naive-upcast", False): lambda h, w, y: reference.token_logprobs(h, w, y),
    ("trl-verl-selective_log_softmax", False): _selective,
    ("cut-cross-entropy", False): _cce,
    ("chunklogits", False): lambda h, w, y: cl.token_logprobs(h, w, y),
    ("naive-upcast", True): lambda h, w, y: reference.token_logprobs(h, w, y, return_entropy=True),
    ("trl-entropy_from_logits", True): _trl,
    ("verl-entropy_from_logits", True): _verl,
    ("chunklogits", True): lambda h, w, y: cl.token_logprobs(h, w, y, return_entropy=True),
}

_exact: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def exact(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 log-probs and entropies of the bf16 inputs, 256 rows at a time."""
    if shape not in _exact:
        hidden, weight, tokens = head_inputs(shape)
        parts = []
        with torch.no_grad():
            w = weight.double()
            for rows in range(0, hidden.shape[0], 256):
                logp = (hidden[rows : rows + 256].double() @ w.T).log_softmax(-1)
                picked = logp.gather(-1, tokens[rows : rows + 256, None]).squeeze(-1)
                parts.append((picked, -(logp.exp() * logp).sum(-1)))
        _exact[shape] = tuple(torch.cat(p) for p in zip(*parts, strict=True))
    return _exact[shape]


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}{'+entropy' * c[1]}")
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_logprobs(benchmark, grad, case):
    impl, with_entropy = case
    reason = unavailable(impl)
    if impl == "trl-entropy_from_logits" and grad:
        reason = "TRL computes the entropy under no_grad (a metric), not in the objective"
    if reason:
        pytest.skip(reason)
    hidden, weight, tokens = head_inputs(SHAPE)
    fn = CASES[case]
    advantages = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    advantages = advantages.to(tokens.device)
    outputs = []

    def reset():
        hidden.grad = weight.grad = None

    def step():
        with torch.set_grad_enabled(grad):
            out = fn(hidden, weight, tokens)
            logp, entropy = out if with_entropy else (out, None)
            if grad:
                objective = (advantages * logp).sum()
                if entropy is not None and entropy.requires_grad:
                    objective = objective + ENTROPY_WEIGHT * entropy.sum()
                objective.backward()
        outputs.append((logp.detach(), None if entropy is None else entropy.detach()))

    benchmark.group = f"{'log-probs + entropy' if with_entropy else 'log-probs'} "
    benchmark.group += f"{'fwd+bwd' if grad else 'fwd (no grad)'} {SHAPE}"
    returned = hidden.nbytes + weight.nbytes if grad else 0
    measure(benchmark, step, reset=reset, returned_bytes=returned, rounds=2)
    exact_logp, exact_entropy = exact(SHAPE)
    logp, entropy = outputs[-1]
    benchmark.extra_info["logprob_max_error"] = (logp.double() - exact_logp).abs().max().item()
    if entropy is not None:
        error = (entropy.double() - exact_entropy).abs().max().item()
        benchmark.extra_info["entropy_max_error"] = error


LOW_TEMPERATURE = 0.01


@pytest.mark.parametrize("impl", ["naive-upcast", "chunklogits"])
def test_logprobs_low_temperature(benchmark, impl):
    """Log-probs at temperature 0.01 (no grad): the scaled logits spread so widely that a third of
    them lie more than 87 below their row's maximum, where CPU ``exp`` slows down because its
    result underflows. The block engine raises such values
    first (``_blocks._floor_``); the naive upcast does not. ``extra_info`` records the share of
    such logits and the largest log-prob error against fp64 over the first 256 rows."""
    hidden, weight, tokens = head_inputs(SHAPE)
    fn = reference.token_logprobs if impl == "naive-upcast" else cl.token_logprobs
    outputs = []

    def step():
        with torch.no_grad():
            outputs.append(fn(hidden, weight, tokens, temperature=LOW_TEMPERATURE))

    benchmark.group = f"log-probs at temperature {LOW_TEMPERATURE}, fwd (no grad) {SHAPE}"
    measure(benchmark, step, rounds=2)
    with torch.no_grad():
        z = hidden[:256].double() @ weight.double().T / LOW_TEMPERATURE
        share = (z - z.amax(1, keepdim=True) < -87).double().mean().item()
        exact = z.log_softmax(-1).gather(-1, tokens[:256, None]).squeeze(-1)
    benchmark.extra_info["share_far_below_max"] = share
    error = (outputs[-1][:256].double() - exact).abs().max().item()
    benchmark.extra_info["logprob_max_error"] = error
