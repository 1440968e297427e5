"""token_logprobs / entropy / logsumexp against the naive oracle, TRL's and verl's formulas."""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl
from chunklogits import reference
from tests.helpers import assert_as_accurate, seeded
from tests.test_loss import make_inputs


def outputs_and_grads(fn, hidden, weight, bias, tokens, **kw):
    """``(logprobs, entropy, grads...)`` of a random linear combination of both outputs."""
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None
        for t in (hidden, weight, bias)
    ]
    logprobs, entropy = fn(leaves[0], leaves[1], tokens, bias=leaves[2], return_entropy=True, **kw)
    g = seeded(3)
    up_lp, up_ent = torch.randn(tokens.shape, generator=g), torch.randn(tokens.shape, generator=g)
    (
        (logprobs * up_lp.to(logprobs.dtype)).sum() + (entropy * up_ent.to(entropy.dtype)).sum()
    ).backward()
    return [logprobs.detach(), entropy.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.7}, {"softcap": 3.0, "temperature": 1.3}, {"logit_scale": 0.5}],
    ids=lambda o: ",".join(o) or "plain",
)
@pytest.mark.parametrize("shards", [1, 3, 8, 507])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_match_oracle(dtype, shards, options):
    hidden, weight, bias, _ = make_inputs((3, 17), 507, 123, dtype, bias=True)
    tokens = torch.randint(0, 507, (3, 17), generator=seeded(2))
    f64 = [t.double() for t in (hidden, weight, bias)]
    exact = outputs_and_grads(reference.token_logprobs, *f64, tokens, **options)
    naive = outputs_and_grads(reference.token_logprobs, hidden, weight, bias, tokens, **options)
    ours = outputs_and_grads(
        cl.token_logprobs, hidden, weight, bias, tokens, shards=shards, **options
    )
    names = ["logprobs", "entropy", "grad hidden", "grad weight", "grad bias"]
    for name, o, n, e in zip(names, ours, naive, exact, strict=True):
        assert o.shape == e.shape
        assert_as_accurate(o, n, e, dtype, f"{name} {options}")


def test_logprobs_equal_trl_and_verl_formulas():
    # TRL's selective_log_softmax: logits.gather(tokens) - logsumexp(logits); verl's
    # entropy_from_logits: logsumexp(logits) - (softmax(logits) * logits).sum(-1).
    hidden, weight, _, _ = make_inputs((2, 11), 300, 32, torch.float64)
    tokens = torch.randint(0, 300, (2, 11), generator=seeded(4))
    logits = (hidden @ weight.T) / 0.9
    trl = logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)
    verl = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    logprobs, entropy = cl.token_logprobs(
        hidden, weight, tokens, temperature=0.9, return_entropy=True, shards=7
    )
    torch.testing.assert_close(logprobs, trl)
    torch.testing.assert_close(entropy, verl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logsumexp_matches_oracle(dtype):
    hidden, weight, bias, _ = make_inputs((4, 9), 251, 40, dtype, bias=True)
    upstream = torch.randn(4, 9, generator=seeded(5))
    results = []
    for fn, cast in [
        (reference.logsumexp, torch.float64),
        (reference.logsumexp, dtype),
        (cl.logsumexp, dtype),
    ]:
        leaves = [t.detach().to(cast).requires_grad_() for t in (hidden, weight, bias)]
        lse = fn(leaves[0], leaves[1], bias=leaves[2], softcap=5.0, temperature=0.8)
        (lse * upstream.to(lse.dtype)).sum().backward()
        results.append([lse.detach()] + [t.grad for t in leaves])
    exact, naive, ours = results
    for name, o, n, e in zip(
        ["lse", "grad hidden", "grad weight", "grad bias"], ours, naive, exact, strict=True
    ):
        assert_as_accurate(o, n, e, dtype, name)


def test_entropy_alone_backpropagates():
    # Only the entropy reaches the loss: the log-prob statistics get no gradient at all.
    hidden, weight, _, _ = make_inputs((2, 6), 90, 12, torch.float64)
    tokens = torch.randint(0, 90, (2, 6), generator=seeded(6))
    ours = hidden.detach().clone().requires_grad_()
    cl.token_logprobs(ours, weight.detach(), tokens, return_entropy=True, shards=4)[
        1
    ].sum().backward()
    naive = hidden.detach().clone().requires_grad_()
    reference.token_logprobs(naive, weight.detach(), tokens, return_entropy=True)[
        1
    ].sum().backward()
    torch.testing.assert_close(ours.grad, naive.grad)
