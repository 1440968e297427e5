"""token_logprobs / entropy / logsumexp against the naive oracle, TRL's and verl's formulas."""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl
from chunklogits import reference
from tests.helpers import (
    assert_accuracy_within_rounding,
    assert_as_accurate,
    assert_top_k_within_rounding,
    confident_head,
    per_position_temperature,
    seeded,
)
from tests.test_loss import make_inputs


def outputs_and_grads(fn, hidden, weight, bias, tokens, entropy=True, **kw):
    """``(logprobs, entropy, grads...)`` of a random linear combination of both outputs
    (``entropy=False``: ``(logprobs, grads...)`` of the log-probs')."""
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None
        for t in (hidden, weight, bias)
    ]
    out = fn(leaves[0], leaves[1], tokens, bias=leaves[2], return_entropy=entropy, **kw)
    outs = out if entropy else (out,)
    g = seeded(3)
    upstream = [torch.randn(tokens.shape, generator=g) for _ in range(2)]
    sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, upstream, strict=False)).backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


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


# --- topk_logprobs -----------------------------------------------------------------------------


def check_topk(hidden, weight, bias, k, dtype, blockings, **options):
    """``topk_logprobs`` against the naive twin: the indices pick the ``k`` largest of the model's
    own logits, in descending order, each once: the naive twin's up to the GEMM's rounding
    (``assert_top_k_within_rounding``); the values are as accurate as the naive log-softmax at
    those indices, against fp64."""
    transform = {key: options[key] for key in ("softcap", "logit_scale") if key in options}
    decision = reference.model_logits(hidden, weight, bias=bias, **transform).float()
    naive_logp = reference.logits(hidden, weight, bias=bias, **options).log_softmax(-1)
    f64 = [t.double() for t in (hidden, weight, bias)]
    exact_logp = reference.logits(*f64[:2], bias=f64[2], **options).log_softmax(-1)
    for shards, chunk_size in blockings:
        values, indices = cl.topk_logprobs(
            hidden, weight, k, bias=bias, shards=shards, chunk_size=chunk_size, **options
        )
        assert values.shape == indices.shape == (*hidden.shape[:-1], k)
        assert values.dtype == torch.float32 and indices.dtype == torch.long
        assert not values.requires_grad
        where = f"shards={shards}, chunk_size={chunk_size}, {options}"
        assert_top_k_within_rounding(indices, decision, dtype, where)
        assert_as_accurate(
            values, naive_logp.gather(-1, indices), exact_logp.gather(-1, indices), dtype, where
        )


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.6}, {"softcap": 2.0, "temperature": 1.4}, {"logit_scale": 0.5}],
    ids=lambda o: ",".join(o) or "plain",
)
@pytest.mark.parametrize("k", [1, 5, 507])
def test_topk_logprobs_match_oracle(k, options):
    hidden, weight, bias, _ = make_inputs((3, 17), 507, 123, torch.float32, bias=True)
    blockings = [(1, None), (7, 4)] + [(507, None)] * (k == 5)
    check_topk(
        *(t.detach() for t in (hidden, weight, bias)), k, torch.float32, blockings, **options
    )


@pytest.mark.parametrize(
    "options", [{}, {"softcap": 1.5, "temperature": 0.7}], ids=["plain", "softcap"]
)
@pytest.mark.parametrize("k", [1, 20])
def test_topk_logprobs_half_precision(cpu_gemm, k, options):
    # Tokens chosen on the model's bf16 logits (ties are frequent: a softcap of 1.5 leaves few
    # distinct bf16 values) whichever dtype the block GEMMs run in.
    hidden, weight, bias, _ = make_inputs((2, 11), 251, 40, torch.bfloat16, bias=True)
    check_topk(
        *(t.detach() for t in (hidden, weight, bias)),
        k,
        torch.bfloat16,
        [(1, None), (6, 5)],
        **options,
    )


@pytest.mark.parametrize("k", [1, 3, 4, 7, 12])
@pytest.mark.parametrize("blocking", [(1, None), (3, 2), (12, 1), (5, 3)])
def test_topk_logprobs_ties_by_smaller_token_id(k, blocking):
    # Exact ties across shards and within them: logits 2 at ids {9, 2, 7}, 1 at {0, 5, 10, 11},
    # 0 elsewhere; every tie group straddles some k and some shard boundary.
    weight = torch.zeros(12, 2)
    weight[[9, 2, 7], 0] = 2.0
    weight[[0, 5, 10, 11], 0] = 1.0
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.5], [0.0, 0.0]])
    shards, chunk_size = blocking
    values, indices = cl.topk_logprobs(hidden, weight, k, shards=shards, chunk_size=chunk_size)
    order = [2, 7, 9, 0, 5, 10, 11, 1, 3, 4, 6, 8]
    assert indices[:2].tolist() == [order[:k]] * 2
    assert indices[2].tolist() == list(range(k))  # all equal: the smallest ids, ascending
    naive = reference.topk_logprobs(hidden, weight, k)
    assert torch.equal(indices, naive.indices)
    # The same as log_softmax(...).topk(k) with ties broken by the smaller token id.
    logp = reference.logits(hidden, weight).log_softmax(-1)
    torch.testing.assert_close(values, logp.gather(-1, indices))


def test_topk_logprobs_one_row_and_whole_vocabulary():
    # k = V: every token, sorted; the log-probs sum to 1 in probability.
    hidden, weight, _, _ = make_inputs((5,), 61, 12, torch.float64)
    values, indices = cl.topk_logprobs(hidden[0].detach(), weight.detach(), 61, shards=4)
    expected = reference.logits(hidden[0].detach(), weight.detach()).log_softmax(-1)
    torch.testing.assert_close(values, expected.sort(descending=True).values)
    torch.testing.assert_close(values, expected[indices])
    torch.testing.assert_close(values.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_head_topk_logprobs_match_oracle():
    hidden, weight, bias, _ = make_inputs((2, 7), 211, 32, torch.float32, bias=True)
    hidden, weight, bias = (t.detach() for t in (hidden, weight, bias))
    head = cl.ChunkedLMHead(weight, bias, shards=4, softcap=3.0, logit_scale=0.8)
    ours = head.topk_logprobs(hidden, 6, temperature=0.9)
    transform = dict(bias=bias, softcap=3.0, logit_scale=0.8)
    decision = reference.model_logits(hidden, weight, **transform)
    assert_top_k_within_rounding(ours.indices, decision, torch.float32, "head top-k")
    naive = reference.logits(hidden, weight, temperature=0.9, **transform).log_softmax(-1)
    exact = reference.logits(
        hidden.double(), weight.double(), temperature=0.9, **{**transform, "bias": bias.double()}
    ).log_softmax(-1)
    assert_as_accurate(
        ours.values,
        naive.gather(-1, ours.indices),
        exact.gather(-1, ours.indices),
        torch.float32,
        "head top-k",
    )


@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_nan_logits_give_nan_values_and_rank_last(where):
    # A NaN hidden row (every logit of that position NaN) or a NaN weight row (token 7 NaN at
    # every position): NaN log-probs wherever the naive log-softmax has them, tokens chosen among
    # the other logits (a NaN ranks as -inf), and the accuracies the naive comparisons give.
    g = seeded(7)
    hidden, weight = torch.randn(12, 16, generator=g), torch.randn(60, 16, generator=g)
    labels = torch.randint(0, 60, (12,), generator=g)
    if where == "hidden":
        hidden[3] = float("nan")
    else:
        weight[7] = float("nan")
    decision = reference.model_logits(hidden, weight)
    ranked = decision.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    naive_logp = reference.logits(hidden, weight, temperature=0.8).log_softmax(-1)
    exact_logp = reference.logits(hidden.double(), weight.double(), temperature=0.8)
    exact_logp = exact_logp.log_softmax(-1)
    for shards, chunk_size in [(1, None), (7, 5)]:
        blocking = dict(shards=shards, chunk_size=chunk_size)
        values, indices = cl.topk_logprobs(hidden, weight, 5, temperature=0.8, **blocking)
        assert_top_k_within_rounding(indices, ranked, torch.float32, f"{where} {blocking}")
        if where == "hidden":  # every logit NaN: all tied at -inf, the smallest ids
            assert indices[3].tolist() == [0, 1, 2, 3, 4]
        assert values.isnan().any()
        naive, exact = naive_logp.gather(-1, indices), exact_logp.gather(-1, indices)
        assert_as_accurate(values, naive, exact, torch.float32, f"{where} {blocking}")
        for top_k in (1, 3):
            ours = cl.token_accuracy(hidden, weight, labels, top_k=top_k, **blocking)
            assert_accuracy_within_rounding(ours, decision, labels, top_k, torch.float32)
        out = cl.linear_cross_entropy(
            hidden, weight, labels, return_token_accuracy=True, **blocking
        )
        assert out.loss.isnan() and reference.linear_cross_entropy(hidden, weight, labels).isnan()
        assert_accuracy_within_rounding(out.token_accuracy, decision, labels, 1, torch.float32)


def test_temperatures_beyond_fp32():
    # Below the smallest normal fp32 every logit overflows once divided (NaN log-probs, as the
    # naive code's): refused. Above fp32's largest the logits divide to 0: a uniform distribution,
    # which the values are, and the tokens are still the largest logits, not the smallest ids.
    hidden, weight, bias, _ = make_inputs((3, 5), 97, 16, torch.float32, bias=True)
    hidden, weight, bias = (t.detach() for t in (hidden, weight, bias))
    tokens = torch.randint(0, 97, (3, 5), generator=seeded(8))
    calls = {
        "token_logprobs": lambda **kw: cl.token_logprobs(hidden, weight, tokens, bias=bias, **kw),
        "logsumexp": lambda **kw: cl.logsumexp(hidden, weight, bias=bias, **kw),
        "topk_logprobs": lambda **kw: cl.topk_logprobs(hidden, weight, 4, bias=bias, **kw).values,
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"^temperature: expected a float >= 1\.17.*got 1e-40"):
            call(temperature=1e-40, shards=3)
    f64 = dict(bias=bias.double(), temperature=1e39)
    exact = reference.logits(hidden.double(), weight.double(), **f64)
    naive = reference.logits(hidden, weight, bias=bias, temperature=1e39)
    indices = cl.topk_logprobs(hidden, weight, 4, bias=bias, temperature=1e39, shards=3).indices
    decision = reference.model_logits(hidden, weight, bias=bias)
    assert_top_k_within_rounding(indices, decision, torch.float32, "temperature 1e39")
    assert (indices[..., 0] != 0).any()  # the case tells the lowest ids from the largest logits
    expected = {
        "token_logprobs": [
            t.log_softmax(-1).gather(-1, tokens[..., None])[..., 0] for t in (naive, exact)
        ],
        "logsumexp": [t.logsumexp(-1) for t in (naive, exact)],
        "topk_logprobs": [t.log_softmax(-1).gather(-1, indices) for t in (naive, exact)],
    }
    for name, call in calls.items():
        ours = call(temperature=1e39, shards=3)
        assert_as_accurate(ours, *expected[name], torch.float32, f"{name} at temperature 1e39")


@pytest.mark.parametrize(
    ("dtype", "case"),
    [(torch.float32, "gap-15"), (torch.float64, "gap-15"), (torch.float32, "gap-20")],
    ids=str,
)
def test_confident_token_logprobs(dtype, case):
    """log p of a confident token is formed as (z_t - max) - log(sum exp(z - max)), as the
    naive log_softmax does, not as z_t - lse, which loses eps * |lse| (RL's exp(logp - old_logp)
    ratios read these numbers): token_logprobs and topk_logprobs, in fp32 with the gradients.
    Not the entropy's: fp32 rounds sum exp(z - max) = 1 + 1e-7 to a multiple of 1.2e-7, which
    both computations share, and 1 - p_t in the entropy's gradient is then as wrong in either,
    each by its own rounding. In fp64 the values alone: there the naive computation is the
    exact one, and gradients such as 1 - p_t are nobody's to the last bit."""
    hidden, weight, bias, tokens = confident_head(case, dtype)
    f64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    if dtype == torch.float32:
        exact, naive, ours = (
            outputs_and_grads(fn, *inputs, tokens, entropy=False)
            for fn, inputs in [
                (reference.token_logprobs, f64),
                (reference.token_logprobs, (hidden, weight, bias)),
                (cl.token_logprobs, (hidden, weight, bias)),
            ]
        )
        names = ["logprobs", "grad hidden", "grad weight", "grad bias"]
    else:
        exact, naive, ours = (
            [fn(*inputs, tokens)]
            for fn, inputs in [
                (reference.token_logprobs, f64[:2]),
                (reference.token_logprobs, (hidden, weight)),
                (cl.token_logprobs, (hidden, weight)),
            ]
        )
        names = ["logprobs"]
    for name, o, n, e in zip(names, ours, naive, exact, strict=False):  # bias: None or not
        assert_as_accurate(o, n, e, dtype, f"{case} {name}")
    for k in (1, 2):
        exact = reference.topk_logprobs(*f64[:2], k, bias=f64[2])
        naive = reference.topk_logprobs(hidden, weight, k, bias=bias)
        top = cl.topk_logprobs(hidden, weight, k, bias=bias)
        assert torch.equal(top.indices, exact.indices)
        assert_as_accurate(top.values, naive.values, exact.values, dtype, f"{case} top-{k}")


@pytest.mark.parametrize("output", ["logprobs", "entropy", "lse"])
def test_rows_holding_an_infinite_logit_as_torch(output):
    """A negative logit scale turns a -inf bias into a +inf logit beside finite ones (and a
    -inf hidden entry gives a row of +-inf): such a row
    has lse +inf (torch.logsumexp's) and no distribution. Each output and its gradients are
    torch's, output by output: log-probs and entropy NaN, and NaN gradients at every token (the
    log_softmax backward's exp(NaN) * sum(grad)); the log-sum-exp's gradient NaN at the inf
    token only and exactly 0 at the others (exp(z - inf), no floor), so that a weight gradient
    times an infinite hidden entry is NaN, not a floor's -inf. fp64: the naive computation is
    the exact one, so NaN patterns and values must match."""
    dtype = torch.float64
    hidden = torch.tensor([[0.0011, -0.0002], [0.3, 0.7], [-torch.inf, 0.0]], dtype=dtype)
    weight = torch.tensor([[-2.1788, 0.5684], [1.0845, -1.3986], [0.25, 0.5]], dtype=dtype)
    bias = torch.tensor([0.4033, -torch.inf, 0.1], dtype=dtype)
    tokens = torch.tensor([0, 2, 0])
    results = []
    for lib in (cl, reference):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logprobs, entropy = lib.token_logprobs(
            *leaves[:2], tokens, bias=leaves[2], logit_scale=-1.5, return_entropy=True
        )
        lse = lib.logsumexp(*leaves[:2], bias=leaves[2], logit_scale=-1.5)
        out = {"logprobs": logprobs, "entropy": entropy, "lse": lse}[output]
        (out * torch.tensor([0.7, -1.3, 0.4], dtype=dtype)).sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    ours, exact = results
    if output == "lse":
        assert torch.equal(exact[0], torch.full((3,), torch.inf, dtype=dtype))
        assert exact[3][0] == 0.0  # a token finite in the first two rows, -inf in the last
    names = ["value", "grad hidden", "grad weight", "grad bias"]
    for name, o, e in zip(names, ours, exact, strict=True):
        assert_as_accurate(o, e, e, dtype, f"{output} {name}")


@pytest.mark.parametrize("shards", [None, 3])
def test_entropy_of_a_one_hot_row_is_the_naive_zero(cpu_gemm, shards):
    # Logits 300 to 900 below the maximum: each exp is raised to exp(log(tiny) + 1) = 3e-38 so
    # that CPU exp stays normal (_blocks._floor_), but those floored terms must weigh nothing in
    # the entropy: their exp(floor) * floor summed to 1e-35 where the naive fp32 entropy
    # underflows to 0 and the exact one is 1e-128.
    bias = torch.tensor([0.0, -300.0, -400.0, -500.0, -900.0, -350.0])
    hidden, weight = torch.zeros(2, 4), torch.zeros(6, 4)
    tokens = torch.tensor([0, 2])
    _, entropy = cl.token_logprobs(
        hidden, weight, tokens, bias=bias, return_entropy=True, shards=shards
    )
    _, naive = reference.token_logprobs(hidden, weight, tokens, bias=bias, return_entropy=True)
    _, exact = reference.token_logprobs(
        hidden.double(), weight.double(), tokens, bias=bias.double(), return_entropy=True
    )
    assert naive.eq(0).all() and (exact > 0).all()
    assert_as_accurate(entropy, naive, exact, torch.float32, "entropy")


# --- per-position temperatures -------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"softcap": 3.0}], ids=["plain", "softcap"])
@pytest.mark.parametrize(("shards", "chunk_size"), [(1, None), (5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_position_temperature_matches_oracle(cpu_gemm, dtype, shards, chunk_size, options):
    # temperature[..., None] divides each position's logits: log-probs, entropy and every
    # gradient as accurate as the naive computation's, over several shards and row chunks.
    hidden, weight, bias, _ = make_inputs((3, 17), 507, 123, dtype, bias=True)
    tokens = torch.randint(0, 507, (3, 17), generator=seeded(2))
    options = {"temperature": per_position_temperature((3, 17)), **options}
    f64 = [t.double() for t in (hidden, weight, bias)]
    exact = outputs_and_grads(reference.token_logprobs, *f64, tokens, **options)
    naive = outputs_and_grads(reference.token_logprobs, hidden, weight, bias, tokens, **options)
    blocking = {"shards": shards, "chunk_size": chunk_size}
    ours = outputs_and_grads(cl.token_logprobs, hidden, weight, bias, tokens, **blocking, **options)
    names = ["logprobs", "entropy", "grad hidden", "grad weight", "grad bias"]
    for name, o, n, e in zip(names, ours, naive, exact, strict=True):
        assert_as_accurate(o, n, e, dtype, f"{name} {blocking}")
    # The same temperatures flattened, and through the head.
    flat = {**options, "temperature": options["temperature"].flatten()}
    flat_ours = outputs_and_grads(
        cl.token_logprobs, hidden, weight, bias, tokens, **blocking, **flat
    )
    for name, o, f in zip(names, ours, flat_ours, strict=True):
        torch.testing.assert_close(f, o, rtol=0, atol=0, msg=name)
    transform = {key: value for key, value in options.items() if key != "temperature"}
    head = cl.ChunkedLMHead(weight.detach(), bias.detach(), shards=shards, **transform)
    head_logprobs = head.token_logprobs(
        hidden.detach(), tokens, temperature=options["temperature"], chunk_size=chunk_size
    )
    torch.testing.assert_close(head_logprobs, ours[0], rtol=0, atol=0)
    # logsumexp and top-k log-probs at the same temperatures.
    f64_lse = reference.logsumexp(*f64[:2], bias=f64[2], **options)
    naive_lse = reference.logsumexp(hidden, weight, bias=bias, **options)
    with torch.no_grad():
        lse = cl.logsumexp(hidden, weight, bias=bias, **blocking, **options)
    assert_as_accurate(lse, naive_lse, f64_lse, dtype, "logsumexp")
    check_topk(
        hidden.detach(), weight.detach(), bias.detach(), 5, dtype, [(shards, chunk_size)], **options
    )


def test_constant_temperature_tensor_equals_the_float():
    # A tensor of one temperature everywhere is the float's case: the same results.
    hidden, weight, bias, _ = make_inputs((2, 9), 211, 32, torch.float32, bias=True)
    tokens = torch.randint(0, 211, (2, 9), generator=seeded(3))
    blocking = {"shards": 3, "chunk_size": 4}
    for temperature in (0.7, 1.0):
        constant = torch.full((2, 9), temperature)
        results = [
            outputs_and_grads(
                cl.token_logprobs, hidden, weight, bias, tokens, temperature=t, **blocking
            )
            for t in (temperature, constant)
        ]
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        top = [
            cl.topk_logprobs(hidden.detach(), weight.detach(), 4, temperature=t, **blocking)
            for t in (temperature, constant)
        ]
        torch.testing.assert_close(top[1].values, top[0].values, rtol=1e-6, atol=1e-7)
        assert torch.equal(top[1].indices, top[0].indices)


def test_bad_per_position_temperatures_are_refused():
    hidden, weight, _, _ = make_inputs((2, 5), 40, 8, torch.float32)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    good = torch.ones(2, 5)
    bad = {
        r"temperature: expected a float or a tensor of shape hidden\.shape\[:-1\] = \(2, 5\) "
        r"\(or \(10,\) flat\), one per position, got shape \(5, 2, 1\)": good.reshape(5, 2, 1),
        r"temperature: expected a float or a floating-point tensor, got dtype torch\.int64": (
            good.long()
        ),
        r"temperature: expected hidden's device cpu, got meta": good.to("meta"),
        r"temperature: expected a tensor that does not require grad": torch.ones(
            2, 5, requires_grad=True
        ),
        r"temperature: expected finite values >= 1\.17.*got 0\.0": good.index_fill(
            1, torch.tensor([2]), 0.0
        ),
        r"temperature: expected finite values >= 1\.17.*got -1\.0": -good,
        r"temperature: expected finite values >= 1\.17.*got nan": good.index_fill(
            0, torch.tensor([1]), torch.nan
        ),
        r"temperature: expected finite values >= 1\.17.*got inf": good / 0,
    }
    calls = [
        lambda t: cl.token_logprobs(hidden, weight, tokens, temperature=t),
        lambda t: cl.topk_logprobs(hidden, weight, 3, temperature=t),
        lambda t: cl.logsumexp(hidden, weight, temperature=t),
        lambda t: cl.linear_cross_entropy(hidden, weight, tokens, temperature=t),
        lambda t: cl.linear_jsd(hidden, weight, hidden, weight, temperature=t),
    ]
    for call in calls:
        for message, temperature in bad.items():
            error = TypeError if "dtype" in message else ValueError
            with pytest.raises(error, match=message.replace("hidden", "(student_)?hidden")):
                call(temperature)


@pytest.mark.parametrize("shards", [1, 2])
def test_softcap_gradient_where_tanh_saturates(shards):
    # Regression (found by test_properties' test_token_logprobs_entropy_logsumexp: fp64, softcap
    # 0.7, temperature 1e-3): token 1's u / c = 8.9, where 1 - tanh^2 = 8e-8. Read off the
    # transformed logit (tanh = z * T / c), tanh carried two more roundings, which 1 - tanh^2
    # magnified to 3e-9 relative (1.7e-12 in the weight gradient, against the slack's 1e-12);
    # the engine now keeps apply_'s own tanh, as torch's tanh backward does.
    hidden = torch.tensor([[23.1149, -4.4014, -32.6818, 8.5265]], dtype=torch.float64)
    weight = torch.tensor(
        [[-1.0845, -1.3986, 0.4033, 0.8380], [-0.7193, -0.4033, -0.5966, 0.1820]],
        dtype=torch.float64,
    )
    tokens = torch.tensor([0])
    options = dict(temperature=1e-3, softcap=0.7)

    def weight_grad(fn, **kw):
        w = weight.clone().requires_grad_()
        logp, entropy = fn(hidden, w, tokens, return_entropy=True, **options, **kw)
        lse = (cl.logsumexp if fn is cl.token_logprobs else reference.logsumexp)(
            hidden, w, **options, **kw
        )
        (logp - entropy + 0.3 * lse).sum().backward()
        return w.grad

    # In fp64 the naive computation is the exact one: the slack relative to 1, as test_properties'
    # check_values gives it.
    exact = weight_grad(reference.token_logprobs)
    ours = weight_grad(cl.token_logprobs, shards=shards)
    assert_as_accurate(ours, exact, exact, torch.float64, "grad weight", scale=1.0)
