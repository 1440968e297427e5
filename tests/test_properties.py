"""Property-based tests (Hypothesis): every public op against ``chunklogits/reference.py``.

Each property draws a head (shape, dtype, value pattern), the op's options and the engine's
settings (``shards``, ``chunk_size``, the block budget, the CPU GEMM dtype), and asserts that
the result either matches the reference under the project's accuracy rule (fp64 truth, the naive
same-dtype computation, ours: ``tests.helpers.assert_as_accurate``) or is a ``ValueError`` /
``TypeError`` naming the argument at fault. Decisions (top-k membership, token accuracy, greedy
and sampled tokens) are checked against the reference's decision logits (``model_logits``) up
to the rounding a block GEMM may differ by (``_decision_tolerance``): two values closer than
that may come in either order.

Profiles (registered in tests/conftest.py, chosen by the environment variable
``HYPOTHESIS_PROFILE``): ``ci`` (default) is derandomized with a bounded number of examples per
property, no deadline and the reproduction blob printed on failure, so that this file runs in
about 2 minutes on 2 cores; ``long`` draws thousands of random examples per property::

    HYPOTHESIS_PROFILE=long pytest tests/test_properties.py
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from torch import Tensor

import chunklogits as cl
from chunklogits import reference
from chunklogits.loss import LossOutput
from tests.helpers import assert_as_accurate, per_position_temperature

ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
IGNORE = -100


def _fraction_of_examples(fraction: float) -> settings:
    """The loaded profile's settings with a fraction of its examples (costly properties)."""
    return settings(max_examples=max(5, int(settings.default.max_examples * fraction)))


# --- drawn heads ---------------------------------------------------------------------------------


class Head(NamedTuple):
    """A drawn head: ``hidden [*lead, D]``, ``weight [V, D]``, ``bias [V]`` or None, all of
    ``dtype``; ``kept`` the vocabulary ids of finite bias (labels are drawn among them)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    kept: Tensor
    masked: bool

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


@st.composite
def heads(
    draw,
    *,
    dtypes=ALL_DTYPES,
    flat: bool | None = None,
    min_rows: int = 0,
    max_rows: int = 8,
    specials: bool = True,
    masks: bool = True,
    vocab: int | None = None,
    lead: tuple[int, ...] | None = None,
    max_vocab: int = 150,
    max_dim: int = 20,
):
    """Rows spanning several chunks and a vocabulary several shards wide (``blocking``); values
    with narrow or wide logit spreads, exact ties (repeated weight rows, zero hidden rows),
    ``-inf`` bias entries (scattered masked tokens or a padded vocabulary's tail) and rows of NaN
    or inf."""
    dtype = draw(st.sampled_from(dtypes))
    if flat is None:
        flat = draw(st.booleans())
    if lead is None and flat:
        lead = (draw(st.integers(min_rows, max_rows)),)
    elif lead is None:
        lead = (draw(st.integers(1, 3)), draw(st.integers(max(min_rows, 0), max_rows // 2 + 1)))
    vocab = vocab or draw(st.integers(1, max_vocab))
    dim = draw(st.integers(1, max_dim))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    spread = draw(st.sampled_from([1e-3, 1.0, 30.0]), label="spread")
    hidden = torch.randn(*lead, dim, generator=g, dtype=torch.float64) * spread / math.sqrt(dim)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    rows = hidden.view(-1, dim)
    if draw(st.booleans(), label="tied weight rows"):
        order = torch.randperm(vocab, generator=g)
        count = draw(st.integers(0, vocab - 1))
        weight[order[:count]] = weight[order[count]].clone()
    if rows.shape[0] and draw(st.booleans(), label="zero hidden rows"):
        rows[::3] = 0.0
    bias_kind = draw(
        st.sampled_from(["none", "random", "masked", "padded"] if masks else ["none", "random"]),
        label="bias",
    )
    bias = None if bias_kind == "none" else torch.randn(vocab, generator=g, dtype=torch.float64)
    kept = torch.arange(vocab)
    if bias_kind == "masked":
        kept = (torch.rand(vocab, generator=g) < 0.7).nonzero().squeeze(1)
        kept = kept if kept.numel() else torch.tensor([vocab - 1])
    elif bias_kind == "padded":
        kept = torch.arange(draw(st.integers(1, vocab)))
        weight[kept.numel() :] = 0.0
    if bias is not None and kept.numel() < vocab:
        bias = torch.full_like(bias, -math.inf).index_copy_(0, kept, bias[kept])
    special = draw(
        st.sampled_from([None, math.nan, math.inf, -math.inf])
        if specials and rows.shape[0]
        else st.just(None),
        label="special row",
    )
    if special is not None:
        # Never the last position of a sequence: shift=True drops it, and the reference's
        # gradient through a dropped NaN row (0 * NaN) is NaN where the truth has none.
        candidates = torch.arange(rows.shape[0]).reshape(lead)
        candidates = (candidates[..., :-1] if len(lead) == 2 else candidates).flatten()
        if candidates.numel():
            rows[candidates[draw(st.integers(0, candidates.numel() - 1))]] = special
    cast = [t.to(dtype) if t is not None else None for t in (hidden, weight, bias)]
    return Head(*cast, kept, kept.numel() < vocab)


@st.composite
def blocking(draw, rows: int, vocab: int):
    """``shards`` and ``chunk_size`` arguments (None: from the block budget) and a block budget
    (None: the default) for ``rows`` rows of a ``vocab``-wide head."""
    shards = draw(st.none() | st.integers(1, vocab), label="shards")
    chunk_size = draw(st.none() | st.integers(1, max(rows, 1) + 1), label="chunk_size")
    budget = draw(st.sampled_from([None, 2**16, 2**20]), label="block budget")
    gemm = draw(st.sampled_from(["model", "fp32"]), label="cpu gemm dtype")
    return dict(shards=shards, chunk_size=chunk_size), (budget, gemm)


@contextmanager
def engine(settings_: tuple[int | None, str]):
    """The block budget and the CPU GEMM dtype set for the block, restored after."""
    budget, gemm = settings_
    previous_gemm = cl.set_cpu_gemm_dtype(gemm)
    previous_budget = cl.set_block_budget(budget) if budget is not None else None
    try:
        yield
    finally:
        cl.set_cpu_gemm_dtype(previous_gemm)
        if previous_budget is not None:
            cl.set_block_budget(previous_budget)


def draw_labels(draw, head: Head, shape, shift: bool = False) -> Tensor:
    """Labels among the head's kept tokens, a drawn fraction (none, some, all) ignored, never
    those paired with a row of NaN or inf (the reference's gradient through an ignored NaN row
    is 0 * NaN; ignored rows are dropped before any logits are computed)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="label seed"))
    labels = head.kept[torch.randint(0, head.kept.numel(), shape, generator=g)]
    ignored = draw(st.sampled_from([0.0, 0.3, 1.0]), label="ignored fraction")
    ignored = torch.rand(shape, generator=g) < ignored
    special = ~head.hidden.isfinite().all(-1)
    if shift:
        special = torch.cat([torch.zeros_like(special[..., :1]), special[..., :-1]], -1)
    return labels.masked_fill(ignored & ~special, IGNORE)


def leaves(tensors, wants) -> list[Tensor | None]:
    """Fresh leaf copies of ``tensors``, each requiring grad as ``wants`` says."""
    return [
        None if t is None else t.detach().clone().requires_grad_(bool(want))
        for t, want in zip(tensors, wants, strict=True)
    ]


def as_f64(tensors) -> list[Tensor | None]:
    return [None if t is None else t.double() for t in tensors]


def check_values(ours, naive, exact, dtype: torch.dtype, what: str) -> None:
    """Shapes equal, then the accuracy rule (None: a gradient no run formed). In fp64 the naive
    computation is the exact one, so only the slack separates two roundings: results that
    cancel terms of order 1 (a divergence or a gradient near 0) get it relative to 1 at least
    (``scale`` of ``assert_as_accurate``)."""
    if exact is None:
        assert ours is None or not ours.abs().max().item(), f"{what}: a gradient where none is due"
        return
    assert ours is not None, f"{what}: missing"
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    scale = None
    if dtype == torch.float64:
        finite = exact[exact.isfinite()]
        scale = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    assert_as_accurate(ours.detach(), naive.detach(), exact.detach(), dtype, what, scale)


# --- decisions up to the GEMM rounding -----------------------------------------------------------


def _decision_tolerance(head: Head, softcap, logit_scale) -> tuple[Tensor, Tensor]:
    """The reference's decision logits ``d`` (``model_logits`` in fp64, ``[R, V]``) and per row
    how far our decision logits may lie from them: the rounding of a block GEMM (in fp32, or
    fp64 for fp64) besides the whole-matrix one, ``D * eps * sum_d |h_d w_vd| + |b_v|``, scaled
    by ``|logit_scale|``, plus two roundings to the model dtype. Twice that per row (ours and the
    reference's error) is the gap below which two values may come in either order."""
    hidden, weight, bias = head.hidden, head.weight, head.bias
    d = reference.model_logits(
        hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale
    ).double()
    d = d.reshape(-1, weight.shape[0])
    magnitude = hidden.double().abs().reshape(-1, weight.shape[1]) @ weight.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs().nan_to_num(posinf=0.0)
    gemm_eps = torch.finfo(torch.float64 if head.dtype == torch.float64 else torch.float32).eps
    model_eps = torch.finfo(head.dtype).eps
    scale = abs(logit_scale or 1.0)
    tol = (weight.shape[1] * gemm_eps + 2 * model_eps) * magnitude * scale + 2 * model_eps * d.abs()
    tol = tol.where(d.isfinite() & tol.isfinite(), 0.0)
    return d, 2 * tol.amax(-1, keepdim=True)


def assert_topk_decision(indices: Tensor, d: Tensor, row_tol: Tensor, k: int) -> None:
    """``indices [R, k]``: distinct tokens whose decision values equal the reference's ``k``
    largest (a stable descending sort), position by position, within the row's tolerance."""
    indices = indices.reshape(-1, k)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "top-k: a token chosen twice"
    d = d.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN ranks last
    expected = d.sort(dim=-1, descending=True, stable=True).values[:, :k]
    chosen = d.gather(-1, indices)
    same = (chosen == expected) | (chosen.isnan() & expected.isnan())
    close = (chosen - expected).abs() <= row_tol
    bad = ~(same | close)
    assert not bad.any(), (
        f"top-k: chosen decision values {chosen[bad.any(-1)].tolist()} != the reference's "
        f"{expected[bad.any(-1)].tolist()} (tolerance {row_tol[bad.any(-1)].flatten().tolist()})"
    )


def accuracy_bounds(d: Tensor, row_tol: Tensor, labels: Tensor, top_k: int):
    """Per label, whether it surely counts (fewer than ``top_k`` logits could be strictly above
    its own after rounding) and whether it possibly counts (fewer than ``top_k`` are surely
    above): the reference's rule ``#(d > d_label) < top_k`` at the two ends of the tolerance."""
    own = d.gather(-1, labels.clamp(min=0).reshape(-1, 1))
    surely_above = (d > own + row_tol).sum(-1)
    possibly_above = (d > own - row_tol).sum(-1) - (own > own - row_tol).squeeze(-1).long()
    kept = labels.reshape(-1) != IGNORE
    return (possibly_above < top_k) & kept, (surely_above < top_k) & kept, kept


def assert_accuracy(ours: Tensor, d, row_tol, labels, top_k: int, reduction: str) -> None:
    """Our token accuracy (a fraction, a count, or per label) between the bounds."""
    sure, possible, kept = accuracy_bounds(d, row_tol, labels, top_k)
    assert ours.dtype in (torch.float32, torch.float64) and not ours.requires_grad
    if reduction == "none":
        ours = ours.reshape(-1)
        assert ((ours == 1) | (ours == 0)).all() and (ours[~kept] == 0).all()
        assert (ours.bool() >= sure).all() and (ours.bool() <= possible).all(), (ours, sure)
        return
    count = ours * kept.sum() if reduction == "mean" else ours
    if reduction == "mean" and not kept.any():
        assert ours.isnan(), f"accuracy of no label: {ours}"
        return
    low, high = sure.sum().item(), possible.sum().item()
    assert low - 1e-4 <= count.item() <= high + 1e-4, (
        f"accuracy count {count} not in [{low}, {high}]"
    )


# --- linear_cross_entropy ------------------------------------------------------------------------


def weighted_reference(
    hidden,
    weight,
    labels,
    *,
    class_weight,
    reduction,
    num_items_in_batch,
    return_z_loss,
    return_token_accuracy,
    **options,
):
    """``reference.linear_cross_entropy`` with a class weight that requires grad: F.cross_entropy
    has no derivative in its ``weight``, so the reference's per-label losses (and z-loss terms)
    are weighted and reduced here as its docstring says."""
    per = reference.linear_cross_entropy(
        hidden, weight, labels, reduction="none", return_z_loss=True, **options
    )
    kept_labels = labels[..., 1:] if options.get("shift") else labels
    kept = kept_labels != options.get("ignore_index", IGNORE)
    # Ignored labels pass no gradient to the class weights, also where "mean" divides by a
    # total weight of 0 (NaN), as F.cross_entropy passes none to their rows: not 0 * inf.
    weights = class_weight.to(per.loss.dtype)[kept_labels.clamp(min=0)].where(kept, 0.0)

    def reduce(per_label: Tensor) -> Tensor:
        if reduction == "none":
            return per_label * weights
        total = (per_label * weights).sum()
        if reduction == "sum":
            return total
        return total / (num_items_in_batch if num_items_in_batch is not None else weights.sum())

    if not (return_z_loss or return_token_accuracy):
        return reduce(per.loss)
    accuracy = None
    if return_token_accuracy:
        accuracy = reference.linear_cross_entropy(
            hidden, weight, labels, reduction=reduction, return_token_accuracy=True, **options
        ).token_accuracy
    return LossOutput(reduce(per.loss), reduce(per.z_loss) if return_z_loss else None, accuracy)


def backward_grads(target: Tensor, inputs) -> tuple[bool, list[Tensor | None]]:
    """Whether ``target`` is differentiable, and the gradients of the inputs that require grad
    (a zero tensor where autograd leaves none; None for inputs that do not require grad)."""
    if target.requires_grad:
        target.backward()
    return target.requires_grad, [
        None
        if t is None or not t.requires_grad
        else (t.grad if t.grad is not None else torch.zeros_like(t))
        for t in inputs
    ]


def upstream_like(result: Tensor) -> Tensor:
    """A fixed non-uniform upstream gradient for a result of any shape."""
    return torch.linspace(0.5, 1.5, result.numel(), dtype=result.dtype).reshape(result.shape)


def loss_run(fn, tensors, wants, labels, options) -> tuple[bool, list]:
    """``(differentiable, [loss, z_loss, token_accuracy, *grads])`` of ``fn``, the gradients
    those of ``sum(up * loss) + 3 * sum(z_loss)``."""
    inputs = leaves(tensors, wants)
    hidden, weight, bias, class_weight = inputs
    out = fn(hidden, weight, labels, bias=bias, class_weight=class_weight, **options)
    if isinstance(out, Tensor):
        out = LossOutput(out, None, None)
    loss, z_term, accuracy = out
    target = (loss * upstream_like(loss)).sum()
    if z_term is not None:
        target = target + 3 * z_term.sum()
    differentiable, grads = backward_grads(target, inputs)
    return differentiable, [loss, z_term, accuracy, *grads]


def expect_refusal(call, names: list[str]) -> None:
    """``call()`` raises a ValueError or TypeError whose message names one of ``names``."""
    with pytest.raises((ValueError, TypeError)) as raised:
        call()
    message = str(raised.value)
    assert any(name in message for name in names), f"{message!r} names none of {names}"


@given(data=st.data())
def test_linear_cross_entropy(data):
    draw = data.draw
    head = draw(heads())
    lead = head.hidden.shape[:-1]
    shift = len(lead) == 2 and draw(st.booleans(), label="shift")
    labels = draw_labels(draw, head, lead, shift)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    # A smoothed target puts mass on masked tokens: an infinite loss without a gradient.
    smoothing = 0.0 if head.masked else draw(st.sampled_from([0.0, 0.1, 1.0]))
    options = dict(
        reduction=reduction,
        label_smoothing=smoothing,
        z_loss=draw(st.sampled_from([0.0, 1e-3, 0.5]), label="z_loss"),
        softcap=draw(st.sampled_from([None, 0.7, 5.0]), label="softcap"),
        logit_scale=draw(st.sampled_from([None, 0.5, -1.5]), label="logit_scale"),
        shift=shift,
        num_items_in_batch=draw(st.sampled_from([None, 3, torch.tensor(7.0)]), label="num items"),
        return_z_loss=draw(st.booleans(), label="return_z_loss"),
        return_token_accuracy=draw(st.booleans(), label="return_token_accuracy"),
    )
    weighting = draw(st.sampled_from([None, "fixed", "trained"]), label="class_weight")
    class_weight = None
    if weighting is not None:
        g = torch.Generator().manual_seed(1)
        class_weight = (torch.rand(head.weight.shape[0], generator=g) * 2).index_fill_(
            0, torch.arange(0, head.weight.shape[0], 5), 0.0
        )
        class_weight = class_weight.to(draw(st.sampled_from([torch.float32, head.dtype])))
    wants = [
        draw(st.booleans(), label=f"{name} requires grad") for name in ("hidden", "weight", "bias")
    ]
    wants.append(weighting == "trained")
    grad_in_forward = draw(st.sampled_from([None, True, False]), label="grad_in_forward")
    rows = lead.numel() if hasattr(lead, "numel") else math.prod(lead)
    blocks, engine_settings = draw(blocking(rows, head.weight.shape[0]))
    tensors = [head.hidden, head.weight, head.bias, class_weight]

    refused = []
    if options["num_items_in_batch"] is not None and reduction != "mean":
        refused.append("num_items_in_batch")
    if class_weight is not None and smoothing > 0:
        refused.append("class_weight")
    if grad_in_forward and (reduction == "none" or options["return_token_accuracy"]):
        refused.append("grad_in_forward")
    ours_options = dict(options, grad_in_forward=grad_in_forward, **blocks)
    with engine(engine_settings):
        if refused:
            expect_refusal(
                lambda: cl.linear_cross_entropy(
                    *tensors[:2], labels, bias=tensors[2], class_weight=class_weight, **ours_options
                ),
                refused,
            )
            return
        ours_differentiable, ours = loss_run(
            cl.linear_cross_entropy, tensors, wants, labels, ours_options
        )
    oracle = weighted_reference if weighting == "trained" else reference.linear_cross_entropy
    naive_differentiable, naive = loss_run(oracle, tensors, wants, labels, options)
    _, exact = loss_run(oracle, as_f64(tensors), wants, labels, options)
    assert ours_differentiable == naive_differentiable, "differentiable unlike the reference"
    names = [
        "loss",
        "z_loss",
        "token_accuracy",
        "grad hidden",
        "grad weight",
        "grad bias",
        "grad class_weight",
    ]
    for name, o, n, e in zip(names, ours, naive, exact, strict=True):
        if name == "token_accuracy":
            if e is None:
                assert o is None
                continue
            decision, row_tol = _decision_tolerance(
                head, options["softcap"], options["logit_scale"]
            )
            accuracy_labels = labels
            if options["shift"]:
                keep = torch.arange(lead[-1]).expand(lead) < lead[-1] - 1
                decision, row_tol = decision[keep.reshape(-1)], row_tol[keep.reshape(-1)]
                accuracy_labels = labels[..., 1:]
            assert_accuracy(o, decision, row_tol, accuracy_labels, 1, reduction)
        else:
            check_values(o, n, e, head.dtype, name)


# --- token_logprobs (+ entropy), logsumexp -------------------------------------------------------


def on_kept_vocabulary(head: Head, softcap=None, logit_scale=None):
    """The head restricted to its kept tokens and a function putting a kept-vocabulary weight
    or bias gradient back in place (0 at masked tokens): the reference's entropy and divergences
    are NaN at ``-inf`` logits (``0 * -inf``), where the truth drops those tokens. A softcap
    (``-inf -> -softcap``) or a negative scale (``-> +inf``) unmasks them: the whole head then.
    A row of NaN or inf hidden states has no distribution: every logit of it is NaN or +-inf
    (a masked token's ``NaN * w - inf`` is NaN), so that autograd through the whole head's
    ``log_softmax`` gives NaN at every token, the masked ones included: NaN there then."""
    unmasked = softcap is not None or (logit_scale or 1.0) < 0
    kept = torch.arange(head.weight.shape[0]) if unmasked else head.kept
    special = not bool(head.hidden.isfinite().all())

    def expand(grad: Tensor | None, full: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        fill = math.nan if special and kept.numel() < full.shape[0] else 0.0
        return torch.full_like(full, fill, dtype=grad.dtype).index_copy_(0, kept, grad)

    bias = None if head.bias is None else head.bias[kept]
    return head.weight[kept], bias, expand


def logprob_run(fn, tensors, wants, tokens, options) -> tuple[bool, list]:
    inputs = leaves(tensors, wants)
    logp, entropy = fn(inputs[0], inputs[1], tokens, bias=inputs[2], return_entropy=True, **options)
    lse = (cl.logsumexp if fn is cl.token_logprobs else reference.logsumexp)(
        inputs[0], inputs[1], bias=inputs[2], **options
    )
    target = (logp * upstream_like(logp)).sum() - entropy.sum() + (lse * 0.3).sum()
    differentiable, grads = backward_grads(target, inputs)
    return differentiable, [logp, entropy, lse, *grads]


@given(data=st.data())
def test_token_logprobs_entropy_logsumexp(data):
    draw = data.draw
    head = draw(heads())
    lead = head.hidden.shape[:-1]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="token seed"))
    tokens = head.kept[torch.randint(0, head.kept.numel(), lead, generator=g)]
    # A float, or one per position (a tensor of the positions' shape).
    temperature = draw(st.sampled_from([1.0, 0.3, 2.5, 1e-3, "per-position"]), label="temperature")
    if temperature == "per-position":
        temperature = per_position_temperature(lead, draw(st.integers(0, 2**16), label="T seed"))
    options = dict(
        temperature=temperature,
        softcap=draw(st.sampled_from([None, 0.7, 5.0]), label="softcap"),
        logit_scale=draw(st.sampled_from([None, 0.5, -1.5]), label="logit_scale"),
    )
    wants = [draw(st.booleans(), label=f"{n} requires grad") for n in ("hidden", "weight", "bias")]
    blocks, engine_settings = draw(blocking(math.prod(lead), head.weight.shape[0]))
    with engine(engine_settings):
        ours_differentiable, ours = logprob_run(
            cl.token_logprobs,
            [head.hidden, head.weight, head.bias],
            wants,
            tokens,
            dict(options, **blocks),
        )
    weight, bias, expand = on_kept_vocabulary(head, options["softcap"], options["logit_scale"])
    kept_tokens = (
        tokens if weight.shape == head.weight.shape else torch.searchsorted(head.kept, tokens)
    )
    results = []
    for tensors in ([head.hidden, weight, bias], as_f64([head.hidden, weight, bias])):
        differentiable, out = logprob_run(
            reference.token_logprobs, tensors, wants, kept_tokens, options
        )
        out[4], out[5] = expand(out[4], head.weight), expand(out[5], head.bias)
        results.append(out)
    special = ~head.hidden.isfinite().all(-1)
    if special.any() and weight.shape != head.weight.shape:
        # A row of NaN or inf has no distribution: its values are the whole head's (NaN where a
        # masked token's logit is inf - inf), not those of the kept vocabulary.
        whole_head = [head.hidden, head.weight, head.bias]
        for out, (h, w, b) in zip(results, (whole_head, as_f64(whole_head)), strict=True):
            with torch.no_grad():
                logp, entropy = reference.token_logprobs(
                    h, w, tokens, bias=b, return_entropy=True, **options
                )
                lse = reference.logsumexp(h, w, bias=b, **options)
            whole = (logp, entropy, lse)
            out[:3] = [torch.where(special, x, o) for x, o in zip(whole, out[:3], strict=True)]
    assert ours_differentiable == differentiable
    names = ["logprobs", "entropy", "logsumexp", "grad hidden", "grad weight", "grad bias"]
    for name, o, n, e in zip(names, ours, *results, strict=True):
        check_values(o, n, e, head.dtype, name)


# --- topk_logprobs, token_accuracy ---------------------------------------------------------------


@given(data=st.data())
def test_topk_logprobs_and_token_accuracy(data):
    draw = data.draw
    head = draw(heads())
    lead = head.hidden.shape[:-1]
    vocab = head.weight.shape[0]
    k = draw(st.integers(1, vocab), label="k")
    transform = dict(
        softcap=draw(st.sampled_from([None, 0.7, 5.0]), label="softcap"),
        logit_scale=draw(st.sampled_from([None, 0.5, -1.5]), label="logit_scale"),
    )
    temperature = draw(st.sampled_from([1.0, 0.3, 2.5, 1e-40, 1e39]), label="temperature")
    blocks, engine_settings = draw(blocking(math.prod(lead), vocab))
    args = dict(bias=head.bias, **transform)
    with engine(engine_settings):
        if temperature < torch.finfo(torch.float32).tiny:  # the logits would overflow in fp32
            expect_refusal(
                lambda: cl.topk_logprobs(
                    head.hidden, head.weight, k, temperature=temperature, **args, **blocks
                ),
                ["temperature"],
            )
            return
        values, indices = cl.topk_logprobs(
            head.hidden, head.weight, k, temperature=temperature, **args, **blocks
        )
    assert values.shape == indices.shape == (*lead, k)
    assert values.dtype == torch.promote_types(head.dtype, torch.float32)
    d, row_tol = _decision_tolerance(head, transform["softcap"], transform["logit_scale"])
    assert_topk_decision(indices, d, row_tol, k)
    logp = [
        reference.logits(h, w, bias=b, temperature=temperature, **transform).log_softmax(-1)
        for h, w, b in (
            [head.hidden, head.weight, head.bias],
            as_f64([head.hidden, head.weight, head.bias]),
        )
    ]
    check_values(
        values,
        logp[0].gather(-1, indices),
        logp[1].gather(-1, indices),
        head.dtype,
        "top-k log-probs",
    )

    top_k = draw(st.integers(1, vocab), label="top_k")
    shift = len(lead) == 2 and draw(st.booleans(), label="shift")
    labels = draw_labels(draw, head, lead, shift)
    with engine(engine_settings):
        accuracy = cl.token_accuracy(
            head.hidden, head.weight, labels, top_k=top_k, shift=shift, **args, **blocks
        )
    if shift:
        keep = torch.arange(lead[-1]).expand(lead) < lead[-1] - 1
        d, row_tol, labels = d[keep.reshape(-1)], row_tol[keep.reshape(-1)], labels[..., 1:]
    assert accuracy.shape == ()
    assert_accuracy(accuracy, d, row_tol, labels, top_k, "mean")


# --- linear_jsd ----------------------------------------------------------------------------------


@given(data=st.data())
def test_linear_jsd(data):
    draw = data.draw
    # The same tokens masked in both heads (a padded vocabulary): the truth drops them. That
    # truth holds for finite rows only: in a NaN or inf row a masked token's logit is NaN
    # (NaN * w - inf), not -inf, so rows of NaN or inf are drawn without masked tokens.
    masked = draw(st.booleans(), label="masked tokens")
    student = draw(heads(masks=False, specials=not masked))
    lead, vocab = student.hidden.shape[:-1], student.weight.shape[0]
    teacher = draw(
        heads(
            dtypes=(student.dtype,), lead=tuple(lead), vocab=vocab, masks=False,
            specials=not masked,
        )
    )  # fmt: skip
    if masked and vocab > 1:
        kept = torch.arange(draw(st.integers(1, vocab - 1)))
        student, teacher = (
            h._replace(
                bias=torch.zeros(vocab, dtype=h.dtype).index_fill_(
                    0, torch.arange(kept.numel(), vocab), -math.inf
                ),
                kept=kept,
                masked=True,
            )
            for h in (student, teacher)
        )
    beta = draw(
        st.sampled_from([0.0, 1.0, 0.5, 1e-12, 1 - 1e-7]) | st.floats(0.0, 1.0), label="beta"
    )
    reduction = draw(st.sampled_from(["batchmean", "sum", "mean", "none"]), label="reduction")
    shift = len(lead) == 2 and draw(st.booleans(), label="shift")
    labels = draw(st.none() | st.just("drawn"), label="labels")
    if labels is not None:
        both = student._replace(hidden=torch.cat([student.hidden, teacher.hidden], -1))
        labels = draw_labels(draw, both, lead, shift)
    options = dict(
        beta=beta,
        temperature=draw(st.sampled_from([1.0, 0.5, 3.0]), label="temperature"),
        reduction=reduction,
        shift=shift,
        num_items_in_batch=draw(st.sampled_from([None, 4]), label="num items"),
    )
    wants = [draw(st.booleans(), label=f"requires grad {i}") for i in range(6)]
    blocks, engine_settings = draw(blocking(math.prod(lead), vocab))

    def run(fn, s, t, **extra):
        inputs = leaves([s[0], s[1], t[0], t[1], s[2], t[2]], wants)
        out = fn(
            *inputs[:4], labels, student_bias=inputs[4], teacher_bias=inputs[5], **options, **extra
        )
        return [out, *backward_grads((out * upstream_like(out)).sum(), inputs)[1]]

    s_head, t_head = (list(h[:3]) for h in (student, teacher))
    with engine(engine_settings):
        if options["num_items_in_batch"] is not None and reduction == "none":
            expect_refusal(
                lambda: run(cl.linear_jsd, s_head, t_head, **blocks), ["num_items_in_batch"]
            )
            return
        ours = run(cl.linear_jsd, s_head, t_head, **blocks)
    results = []
    for cast in (lambda x: x, as_f64):
        heads_kept = []
        for h in (student, teacher):
            weight, bias, expand = on_kept_vocabulary(h)
            heads_kept.append(cast([h.hidden, weight, bias]))
        out = run(reference.linear_jsd, *heads_kept)
        for i in (2, 4, 6, 5):  # weights and biases back to the whole vocabulary
            full = [None, None, student.weight, None, teacher.weight, student.bias, teacher.bias]
            out[i] = expand(out[i], full[i]) if full[i] is not None else out[i]
        results.append(out)
    # jsd.mean() divides by the whole vocabulary; num_items_in_batch replaces that division
    # (reference.linear_jsd: jsd.sum() / num_items_in_batch), whatever the vocabulary.
    if reduction == "mean" and student.masked and options["num_items_in_batch"] is None:
        for out in results:
            out[:] = [x * kept.numel() / vocab if x is not None else None for x in out]
    names = [
        "jsd",
        "grad student hidden",
        "grad student weight",
        "grad teacher hidden",
        "grad teacher weight",
        "grad student bias",
        "grad teacher bias",
    ]
    for name, o, n, e in zip(names, ours, *results, strict=True):
        check_values(o, n, e, student.dtype, name)


# --- sample_next ---------------------------------------------------------------------------------


def acceptable_tokens(
    d: Tensor, row_tol: Tensor, tokens: Tensor, options: dict, dtype: torch.dtype
) -> Tensor:
    """Per row, whether ``tokens`` could be drawn (greedy: chosen) by HF's processors on logits
    within the tolerance of ``d``: the token kept (or the argmax) once its own logit is raised
    and every other lowered by the tolerance. Each filter (repetition penalty, temperature,
    top-k, top-p, min-p, the epsilon and eta cutoffs) only keeps a token more readily so (eta's
    threshold ``sqrt(eta) * exp(-H)`` rises with the push only where ``log p + H`` is above
    ``log sqrt(eta)``, not at the threshold). A ``logit_bias`` is added to the pushed logits.
    They are processed in fp32, or fp64 for an fp64 head (``dtype``), as the reference's: two
    fp64 logits that round to one fp32 value are no tie there."""
    rows = torch.arange(d.shape[0])
    push = torch.full_like(d, -1.0).index_put_((rows, tokens), torch.tensor(1.0, dtype=d.dtype))
    pushed = (d + push * row_tol / 2).to(torch.promote_types(dtype, torch.float32))
    scores = reference.next_token_scores(pushed, **options)
    if not options["do_sample"]:
        return scores[rows, tokens] >= scores.max(-1).values
    # Of tokens tied at top-p's crossing value HF keeps as many as its cumulative rule admits,
    # which ones following torch.sort's unstable order; sample_next's contract (docs/usage.md,
    # chunklogits/sampling.py) keeps as many, those of smallest index. So within each class of
    # tokens tied at top-p's input, the kept ones are moved to the class's smallest indices
    # (top-k, min-p and the cutoffs keep or drop a tie class whole).
    unfiltered = dict(top_p=1.0, min_p=None, epsilon_cutoff=None, eta_cutoff=None)
    before = reference.next_token_scores(pushed, **dict(options, **unfiltered))
    tied = before[:, :, None] == before[:, None, :]  # [R, V, V], -inf never kept
    kept = scores > -math.inf
    rank = (tied & torch.ones_like(tied[0]).tril(-1)).sum(-1)  # tied tokens of smaller index
    return (rank < (tied & kept[:, None, :]).sum(-1))[rows, tokens]


def draw_logit_bias(draw, g: torch.Generator, d: Tensor) -> dict:
    """``sample_next``'s ``logit_bias`` (``[R, K]`` tokens, ``-1`` ignored, and values; some
    tokens listed twice, some masked by ``-inf``) and ``logit_bias_only``, drawn for the
    decision logits ``d [R, V]``: where they would leave a row without a finite logit (no
    distribution to draw from), the ``-inf`` values are made finite, then ``only`` is off."""
    count = draw(st.sampled_from([None, 1, 3, 8]), label="logit_bias tokens")
    if count is None:
        return dict(logit_bias=None, logit_bias_only=False)
    rows, vocab = d.shape
    tokens = torch.randint(-1, vocab, (rows, count), generator=g)
    choices = torch.tensor([-math.inf, -1.5, 0.25, 4.0])
    values = choices[torch.randint(0, 4, (rows, count), generator=g)]
    only = draw(st.booleans(), label="logit_bias_only")

    def masks_a_row(values: Tensor, only: bool) -> bool:
        dense = reference.dense_bias((tokens, values), vocab, only).double()
        return bool(((dense if only else d + dense) == -math.inf).all(-1).any())

    if masks_a_row(values, only):
        values = values.nan_to_num(neginf=-1.5)
    only = only and not masks_a_row(values, only)
    return dict(logit_bias=(tokens, values), logit_bias_only=only)


@given(data=st.data())
def test_sample_next(data):
    draw = data.draw
    head = draw(heads(flat=True, min_rows=1, specials=False))
    rows, vocab = head.hidden.shape[0], head.weight.shape[0]
    transform = dict(
        softcap=draw(st.sampled_from([None, 0.7, 5.0]), label="softcap"),
        logit_scale=draw(st.sampled_from([None, 0.5, -1.5]), label="logit_scale"),
    )
    options = dict(
        do_sample=draw(st.booleans(), label="do_sample"),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0, 1e-3]), label="temperature"),
        top_k=draw(st.sampled_from([0, 1, 3, 50, vocab]), label="top_k"),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.3, 1e-6]), label="top_p"),
        min_p=draw(st.sampled_from([None, 0.0, 0.1, 0.9]), label="min_p"),
        repetition_penalty=draw(st.sampled_from([1.0, 1.5, 0.7]), label="repetition_penalty"),
        epsilon_cutoff=draw(st.sampled_from([None, 1e-4, 0.05, 0.3]), label="epsilon_cutoff"),
        eta_cutoff=draw(st.sampled_from([None, 1e-4, 0.02, 0.5]), label="eta_cutoff"),
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="prev seed"))
    prev = torch.randint(-1, vocab, (rows, draw(st.integers(0, 5))), generator=g)
    seed = draw(st.integers(0, 2**32), label="seed")
    blocks, engine_settings = draw(blocking(rows, vocab))
    d, row_tol = _decision_tolerance(head, transform["softcap"], transform["logit_scale"])
    options.update(draw_logit_bias(draw, g, d))
    if options["logit_bias"] is not None:
        # The values are added in fp32 (fp64 for fp64), rounded to their sums' magnitude.
        eps = torch.finfo(torch.promote_types(head.dtype, torch.float32)).eps
        dense = reference.dense_bias(options["logit_bias"], vocab).double()
        row_tol = row_tol + 4 * eps * dense.nan_to_num(0.0, 0.0, 0.0).abs().amax(-1, keepdim=True)
    call = lambda: cl.sample_next(  # noqa: E731
        head.hidden,
        head.weight,
        bias=head.bias,
        prev_tokens=prev,
        seed=seed,
        return_logprobs=True,
        **transform,
        **options,
        **blocks,
    )
    with engine(engine_settings):
        if not options["logit_bias_only"] and ((d == math.inf).any() or d.isnan().any()):
            # No distribution to draw from (a +inf logit: a masked token under a negative scale;
            # logit_bias_only replaces every logit).
            expect_refusal(call, ["hidden_last"])
            return
        out = call()
    assert out.tokens.shape == (rows,) and out.tokens.dtype == torch.long
    fine = acceptable_tokens(d, row_tol, out.tokens, dict(options, prev_tokens=prev), head.dtype)
    assert fine.all(), f"rows {(~fine).nonzero().flatten().tolist()} drew {out.tokens.tolist()}"
    # The naive log-probs: the model's logits log_softmax-ed in fp32 (fp64 for fp64), as
    # generate() and the reference compute them; not in fp64, which would hold ours to a
    # log-sum beyond fp32 (log(1 + 8.6e-6) rounded in fp32 is off by 1.4e-8).
    raw = [
        reference.model_logits(h, w, bias=b, **transform)
        .to(torch.promote_types(h.dtype, torch.float32))
        .log_softmax(-1)
        .double()
        for h, w, b in (
            [head.hidden, head.weight, head.bias],
            as_f64([head.hidden, head.weight, head.bias]),
        )
    ]
    pick = out.tokens[:, None]
    check_values(
        out.raw_logprobs,
        raw[0].gather(1, pick).squeeze(1),
        raw[1].gather(1, pick).squeeze(1),
        head.dtype,
        "raw log-probs",
    )


# --- ChunkedLMHead -------------------------------------------------------------------------------


@given(data=st.data())
def test_chunked_lm_head_methods(data):
    draw = data.draw
    head = draw(heads(min_rows=1, specials=False))
    lead, vocab = head.hidden.shape[:-1], head.weight.shape[0]
    transform = dict(
        softcap=draw(st.sampled_from([None, 0.7, 5.0]), label="softcap"),
        logit_scale=draw(st.sampled_from([None, 0.5, 1.5]), label="logit_scale"),
    )
    shards = draw(st.none() | st.integers(1, vocab), label="shards")
    chunk_size = draw(st.none() | st.integers(1, math.prod(lead) + 1), label="chunk_size")
    _, engine_settings = draw(blocking(math.prod(lead), vocab))
    labels = draw_labels(draw, head, lead)
    module = cl.ChunkedLMHead(
        head.weight.clone().requires_grad_(),
        None if head.bias is None else head.bias.clone().requires_grad_(),
        shards=shards,
        **transform,
    )
    hidden = head.hidden.clone().requires_grad_()
    k = draw(st.integers(1, vocab), label="k")
    with engine(engine_settings):
        out = module.loss(
            hidden, labels, z_loss=1e-3, chunk_size=chunk_size, return_token_accuracy=True
        )
        (out.loss * 1.0).backward()
        tokens = head.kept[labels.clamp(min=0) % head.kept.numel()]
        logp = module.token_logprobs(head.hidden, tokens, temperature=0.7, chunk_size=chunk_size)
        top = module.topk_logprobs(head.hidden, k, chunk_size=chunk_size)
        accuracy = module.token_accuracy(head.hidden, labels, top_k=k, chunk_size=chunk_size)
        greedy = module.sample_next(head.hidden.reshape(-1, head.hidden.shape[-1]), do_sample=False)
    grads = [hidden.grad, module.weight.grad, None if module.bias is None else module.bias.grad]
    results = []
    for tensors in (
        [head.hidden, head.weight, head.bias],
        as_f64([head.hidden, head.weight, head.bias]),
    ):
        h, w, b = leaves(tensors, [True, True, True])
        expected = reference.linear_cross_entropy(h, w, labels, bias=b, z_loss=1e-3, **transform)
        expected.backward()
        lp = reference.token_logprobs(
            *tensors[:2], tokens, bias=tensors[2], temperature=0.7, **transform
        )
        results.append([expected, h.grad, w.grad, None if b is None else b.grad, lp])
    names = ["loss", "grad hidden", "grad weight", "grad bias", "token_logprobs"]
    for name, o, n, e in zip(names, [out.loss, *grads, logp], *results, strict=True):
        check_values(o, n, e, head.dtype, f"head {name}")
    d, row_tol = _decision_tolerance(head, transform["softcap"], transform["logit_scale"])
    assert_accuracy(out.token_accuracy, d, row_tol, labels, 1, "mean")
    assert_accuracy(accuracy, d, row_tol, labels, k, "mean")
    assert_topk_decision(top.indices, d, row_tol, k)
    assert_topk_decision(greedy[:, None], d, row_tol, 1)


# --- autograd's contract on default settings -----------------------------------------------------


def differentiable_ops(draw, dtype, vocab: int):
    """A drawn differentiable op as ``(name, fn(hidden, weight, bias, class_weight) -> Tensor,
    labels)`` over hidden ``[2, 3, D]`` on default settings, options drawn."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="label seed"))
    labels = torch.randint(0, vocab, (2, 3), generator=g).masked_fill(
        torch.rand(2, 3, generator=g) < 0.3, IGNORE
    )
    labels[:, -1] = 0  # a label that counts, with shift too: "mean" is no 0 / 0
    name = draw(
        st.sampled_from(["loss", "token_logprobs", "entropy", "logsumexp", "jsd", "head.loss"]),
        label="op",
    )
    softcap = draw(st.sampled_from([None, 2.0]), label="softcap")
    if name in ("loss", "head.loss"):
        options = dict(
            reduction=draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
            z_loss=draw(st.sampled_from([0.0, 1e-2]), label="z_loss"),
            shift=draw(st.booleans(), label="shift"),
        )
        weighted = draw(st.booleans(), label="class_weight")

        def fn(h, w, b, c):
            c = c if weighted else None
            if name == "head.loss":
                return cl.ChunkedLMHead(w * 1, None if b is None else b * 1, softcap=softcap).loss(
                    h, labels, class_weight=c, **options
                )
            return cl.linear_cross_entropy(
                h, w, labels, bias=b, class_weight=c, softcap=softcap, **options
            )

        return name, fn, dict(options, class_weight=weighted, softcap=softcap)
    tokens = labels.clamp(min=0)
    temperature = draw(st.sampled_from([1.0, 0.6, "per-position"]), label="temperature")
    if temperature == "per-position":  # the callers' positions: hidden [2, 3, D]
        temperature = per_position_temperature((2, 3))
    if name == "jsd":
        beta = draw(st.sampled_from([0.0, 0.4, 1.0]), label="beta")

        def fn(h, w, b, c):
            return cl.linear_jsd(
                h,
                w,
                h.flip(0),
                w.flip(0),
                labels,
                beta=beta,
                student_bias=b,
                temperature=temperature,
                reduction="none",
            )

        return name, fn, dict(beta=beta, temperature=temperature)

    def fn(h, w, b, c):
        kw = dict(bias=b, softcap=softcap, temperature=temperature)
        if name == "logsumexp":
            return cl.logsumexp(h, w, **kw)
        return cl.token_logprobs(h, w, tokens, return_entropy=True, **kw)[name == "entropy"]

    return name, fn, dict(softcap=softcap, temperature=temperature)


@_fraction_of_examples(0.6)
@given(data=st.data())
def test_backward_twice_with_retain_graph(data):
    # Each backward adds the same gradient: after two, twice one backward's, which a fresh graph
    # of the same op gives; that one is checked against the reference by the properties above.
    draw = data.draw
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), label="dtype")
    vocab, dim = draw(st.integers(1, 40), label="V"), draw(st.integers(1, 8), label="D")
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(2, 3, dim, generator=g),
        torch.randn(vocab, dim, generator=g),
        torch.randn(vocab, generator=g),
        torch.rand(vocab, generator=g),
    ]
    tensors = [t.to(dtype) for t in tensors]
    name, fn, options = differentiable_ops(draw, dtype, vocab)
    note(f"{name} {options}")
    once, twice = leaves(tensors, [True] * 4), leaves(tensors, [True] * 4)
    result = fn(*once)
    backward_grads((result * upstream_like(result)).sum(), once)
    result = fn(*twice)
    target = (result * upstream_like(result)).sum()
    target.backward(retain_graph=True)
    target.backward()
    for what, a, b in zip(["hidden", "weight", "bias", "class_weight"], once, twice, strict=True):
        if a.grad is None:
            assert b.grad is None, what
            continue
        torch.testing.assert_close(b.grad, 2 * a.grad, msg=f"{name}: grad {what} after two")


@_fraction_of_examples(0.4)
@given(data=st.data())
def test_gradcheck_on_default_settings(data):
    draw = data.draw
    vocab, dim = draw(st.integers(1, 9), label="V"), draw(st.integers(1, 4), label="D")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    tensors = [
        torch.randn(2, 3, dim, generator=g, dtype=torch.float64),
        torch.randn(vocab, dim, generator=g, dtype=torch.float64),
        torch.randn(vocab, generator=g, dtype=torch.float64),
        torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1,
    ]
    name, fn, options = differentiable_ops(draw, torch.float64, vocab)
    note(f"{name} {options}")
    wanted = [draw(st.booleans(), label=f"requires grad {i}") for i in range(4)]
    wanted[3] = wanted[3] and options.get("class_weight", False)
    assume(any(wanted))
    inputs = tuple(leaves(tensors, wanted))
    assert torch.autograd.gradcheck(fn, inputs)


# --- bad arguments --------------------------------------------------------------------------------

_H, _W = torch.randn(2, 3, 4), torch.randn(10, 4)
_Y = torch.randint(0, 10, (2, 3))
_BAD = {
    "shards": (
        lambda v: cl.linear_cross_entropy(_H, _W, _Y, shards=v),
        st.sampled_from([0, -1, 11, 1.5]),
    ),
    "chunk_size": (
        lambda v: cl.token_logprobs(_H, _W, _Y, chunk_size=v),
        st.sampled_from([0, -2, 1.0]),
    ),
    "labels": (
        lambda v: cl.linear_cross_entropy(_H, _W, _Y.masked_fill(_Y[0, 0] == _Y, v)),
        st.sampled_from([10, 11, -1, -101]),
    ),
    "tokens": (
        lambda v: cl.token_logprobs(_H, _W, _Y.masked_fill(_Y[0, 0] == _Y, v)),
        st.sampled_from([10, -1]),
    ),
    "reduction": (
        lambda v: cl.linear_cross_entropy(_H, _W, _Y, reduction=v),
        st.sampled_from(["avg", None]),
    ),
    "label_smoothing": (
        lambda v: cl.linear_cross_entropy(_H, _W, _Y, label_smoothing=v),
        st.sampled_from([-0.1, 1.5, math.nan]),
    ),
    "z_loss": (
        lambda v: cl.linear_cross_entropy(_H, _W, _Y, z_loss=v),
        st.sampled_from([-1e-3, math.nan]),
    ),
    "num_items_in_batch": (
        lambda v: cl.linear_cross_entropy(_H, _W, _Y, num_items_in_batch=v),
        st.sampled_from([0, -3, torch.tensor(0), torch.tensor(-2.0)]),
    ),
    "temperature": (
        lambda v: cl.token_logprobs(_H, _W, _Y, temperature=v),
        st.sampled_from([0.0, -1.0, math.nan, math.inf]),
    ),
    "logit_scale": (
        lambda v: cl.logsumexp(_H, _W, logit_scale=v),
        st.sampled_from([0.0, math.nan]),
    ),
    "softcap": (lambda v: cl.logsumexp(_H, _W, softcap=v), st.sampled_from([0.0, -2.0, math.nan])),
    "k": (lambda v: cl.topk_logprobs(_H, _W, v), st.sampled_from([0, 11, None, 2.0])),
    "top_k": (lambda v: cl.token_accuracy(_H, _W, _Y, top_k=v), st.sampled_from([0, 11, 1.0])),
    "beta": (
        lambda v: cl.linear_jsd(_H, _W, _H, _W, beta=v),
        st.sampled_from([-0.1, 1.1, math.nan]),
    ),
    "top_p": (
        lambda v: cl.sample_next(_H[0], _W, top_p=v, seed=0),
        st.sampled_from([0.0, 1.5, math.nan]),
    ),
    "min_p": (lambda v: cl.sample_next(_H[0], _W, min_p=v, seed=0), st.sampled_from([-0.1, 1.5])),
    "repetition_penalty": (
        lambda v: cl.sample_next(_H[0], _W, repetition_penalty=v, seed=0, prev_tokens=_Y),
        st.sampled_from([0.0, -1.0]),
    ),
    "weight": (lambda v: cl.logsumexp(_H, v), st.sampled_from([_W.double(), _W[:, :3], _W[:0]])),
    "bias": (
        lambda v: cl.logsumexp(_H, _W, bias=v),
        st.sampled_from([torch.zeros(9), torch.zeros(10).double()]),
    ),
}


@given(name=st.sampled_from(sorted(_BAD)), data=st.data())
def test_bad_arguments_are_refused_by_name(name, data):
    call, values = _BAD[name]
    value = data.draw(values, label=name)
    expect_refusal(lambda: call(value), [name])


def test_reference_z_loss_of_no_counted_label_has_zero_gradient():
    # Regression (found by test_chunked_lm_head_methods): "mean" over no counted label is 0 / 0,
    # and the reference's z-loss term sent NaN to the rows' gradients where F.cross_entropy
    # sends 0 (as chunklogits does, with or without z_loss).
    hidden, weight = torch.randn(3, 4, requires_grad=True), torch.randn(6, 4)
    loss = reference.linear_cross_entropy(hidden, weight, torch.full((3,), IGNORE), z_loss=1e-2)
    loss.backward()
    assert loss.isnan() and torch.equal(hidden.grad, torch.zeros(3, 4))
    ours = hidden.detach().clone().requires_grad_()
    cl.linear_cross_entropy(ours, weight, torch.full((3,), IGNORE), z_loss=1e-2).backward()
    assert torch.equal(ours.grad, hidden.grad)


def test_reference_ignored_row_with_an_infinite_logit_has_zero_gradient():
    # Regression (found by test_linear_cross_entropy, blob
    # AXicc2RgdGQCQwZHBgYGCO3ICCbBPAawOEwACAGOZgVj): a -inf bias under a negative logit_scale is
    # a +inf logit in every row; F.cross_entropy's backward sent 0 * NaN = NaN to the ignored
    # rows and to the bias, where chunklogits, which drops them, gives 0.
    hidden, weight = torch.randn(3, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    labels = torch.tensor([0, IGNORE, IGNORE])
    results = []
    for fn in (reference.linear_cross_entropy, cl.linear_cross_entropy):
        h, b = leaves([hidden, torch.tensor([0.5, -math.inf], dtype=torch.float64)], [True, True])
        loss = fn(h, weight, labels, bias=b, logit_scale=-1.5, reduction="none")
        loss.sum().backward()
        results.append([loss.detach(), h.grad, b.grad])
    for what, expected, ours in zip(["loss", "grad hidden", "grad bias"], *results, strict=True):
        torch.testing.assert_close(ours, expected, equal_nan=True, msg=what)
    assert results[0][1][1:].eq(0).all() and results[0][1][0].isnan().all()
