"""linear_cross_entropy against the naive materialising oracle (reference.py) and fp64 truth."""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl
from chunklogits import reference
from tests.helpers import assert_as_accurate, seeded


def make_inputs(shape, vocab, dim, dtype, ignored=0.0, bias=False, seed=0):
    """hidden ``shape + (D,)``, weight ``[V, D]`` with some rows equal to hidden rows (peaked
    softmaxes, as in apple/ml-cross-entropy's tests), labels with a fraction ignored."""
    g = seeded(seed)
    hidden = torch.randn(*shape, dim, generator=g) / dim**0.5
    weight = torch.randn(vocab, dim, generator=g)
    shared = min(hidden[..., 0].numel(), vocab) // 2
    weight[:shared] = hidden.reshape(-1, dim)[:shared] * 4
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: round(ignored * flat.numel())]] = -100
    b = torch.randn(vocab, generator=g) * 0.1 if bias else None
    tensors = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return (*tensors, labels)


def run(fn, hidden, weight, bias, labels, upstream=None, **kw):
    """Loss and gradients of ``fn`` at ``(hidden, weight, bias)`` cast to the dtype of ``hidden``
    given (fp64 copies make the ground truth)."""
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None
        for t in (hidden, weight, bias)
    ]
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    target = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    target.backward()
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def check_against_oracle(hidden, weight, bias, labels, dtype, upstream=None, **kw):
    to64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    exact = run(reference.linear_cross_entropy, *to64, labels, upstream, **kw)
    naive = run(reference.linear_cross_entropy, hidden, weight, bias, labels, upstream, **kw)
    ours = run(cl.linear_cross_entropy, hidden, weight, bias, labels, upstream, **kw)
    names = ["loss", "grad hidden", "grad weight", "grad bias"]
    for name, o, n, e in zip(names, ours, naive, exact, strict=False):
        assert o.shape == e.shape, f"{name}: shape {tuple(o.shape)} != {tuple(e.shape)}"
        assert_as_accurate(o, n, e, dtype, f"{name} {kw}")
    return ours, exact


@pytest.mark.parametrize("shards", [1, 3, 8, 507])
@pytest.mark.parametrize("ignored", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_oracle(dtype, reduction, ignored, shards):
    hidden, weight, _, labels = make_inputs((3, 41), 507, 123, dtype, ignored)
    upstream = torch.rand(labels.shape, generator=seeded(1)) if reduction == "none" else None
    check_against_oracle(
        hidden, weight, None, labels, dtype, upstream, reduction=reduction, shards=shards
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp16_matches_oracle(reduction):
    # fp16 GEMMs are slow on CPUs without native support: tiny shapes only.
    hidden, weight, bias, labels = make_inputs((2, 9), 67, 19, torch.float16, 0.3, bias=True)
    upstream = torch.rand(labels.shape, generator=seeded(1)) if reduction == "none" else None
    check_against_oracle(
        hidden, weight, bias, labels, torch.float16, upstream, reduction=reduction, shards=3
    )


@pytest.mark.parametrize(
    "options",
    [
        {"shift": True},
        {"label_smoothing": 0.1},
        {"z_loss": 1e-3},
        {"softcap": 3.0},
        {"logit_scale": 0.0625},
        {"shift": True, "label_smoothing": 0.2, "z_loss": 1e-4, "softcap": 2.5, "logit_scale": 1.5},
    ],
    ids=lambda o: ",".join(o),
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_options_match_oracle(dtype, reduction, options):
    hidden, weight, bias, labels = make_inputs((4, 23), 301, 48, dtype, 0.3, bias=True)
    upstream = None
    if reduction == "none":
        shape = labels[..., 1:].shape if options.get("shift") else labels.shape
        upstream = torch.rand(shape, generator=seeded(1))
    check_against_oracle(
        hidden, weight, bias, labels, dtype, upstream, reduction=reduction, shards=5, **options
    )


@pytest.mark.parametrize("num_items", [300, torch.tensor(77)], ids=["int", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_num_items_in_batch(dtype, num_items):
    hidden, weight, bias, labels = make_inputs((4, 23), 301, 48, dtype, 0.3, bias=True)
    _, exact = check_against_oracle(
        hidden, weight, bias, labels, dtype, shift=True, num_items_in_batch=num_items
    )
    summed = reference.linear_cross_entropy(
        hidden.double(), weight.double(), labels, bias=bias.double(), shift=True, reduction="sum"
    )
    torch.testing.assert_close(exact[0], summed.detach() / num_items)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    hidden, weight, _, labels = make_inputs((2, 7), 50, 16, torch.float32, ignored=1.0)
    upstream = torch.ones(labels.shape) if reduction == "none" else None
    ours = run(cl.linear_cross_entropy, hidden, weight, None, labels, upstream, reduction=reduction)
    naive = run(
        reference.linear_cross_entropy, hidden, weight, None, labels, upstream, reduction=reduction
    )
    for o, n in zip(ours, naive, strict=True):
        torch.testing.assert_close(o, n, equal_nan=True)


def test_leading_dims_and_1d():
    hidden, weight, _, labels = make_inputs((2, 3, 5), 40, 8, torch.float32, 0.2)
    check_against_oracle(hidden, weight, None, labels, torch.float32, reduction="sum")
    first = int((labels.view(-1) != -100).nonzero()[0])
    one_hidden, one_label = hidden.detach().view(-1, 8)[first], labels.view(-1)[first]
    single = cl.linear_cross_entropy(one_hidden, weight.detach(), one_label)
    expected = reference.linear_cross_entropy(one_hidden, weight.detach(), one_label)
    assert single.isfinite()
    torch.testing.assert_close(single, expected)


def test_result_independent_of_blocking():
    hidden, weight, bias, labels = make_inputs((4, 33), 507, 64, torch.float32, 0.3, bias=True)
    results = [
        run(
            cl.linear_cross_entropy,
            hidden,
            weight,
            bias,
            labels,
            shards=s,
            chunk_size=c,
            softcap=4.0,
        )
        for s, c in [(1, None), (3, 7), (8, 1), (507, 64), (None, None)]
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_weight_skips_its_gradient():
    hidden, weight, _, labels = make_inputs((2, 8), 64, 16, torch.float32)
    weight.requires_grad_(False)
    loss = cl.linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    expected = hidden.detach().clone().requires_grad_()
    reference.linear_cross_entropy(expected, weight, labels).backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, expected.grad)


def test_double_backward_is_not_silently_wrong():
    hidden, weight, _, labels = make_inputs((2, 8), 64, 16, torch.float64)
    loss = cl.linear_cross_entropy(hidden, weight, labels)
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_no_grad_inference_matches():
    hidden, weight, _, labels = make_inputs((3, 10), 99, 20, torch.bfloat16, 0.3)
    with torch.no_grad():
        ours = cl.linear_cross_entropy(hidden, weight, labels, reduction="none")
        naive = reference.linear_cross_entropy(hidden, weight, labels, reduction="none")
        exact = reference.linear_cross_entropy(
            hidden.double(), weight.double(), labels, reduction="none"
        )
    assert not ours.requires_grad
    assert_as_accurate(ours, naive, exact, torch.bfloat16, "no_grad loss")


def test_both_cpu_compute_paths(cpu_gemm):
    # CPUs differ in which GEMM dtype is fast; whichever the block GEMMs run in, the result meets
    # the oracle.
    hidden, weight, bias, labels = make_inputs((2, 30), 211, 40, torch.bfloat16, 0.3, bias=True)
    upstream = torch.rand(labels.shape, generator=seeded(1))
    check_against_oracle(
        hidden,
        weight,
        bias,
        labels,
        torch.bfloat16,
        upstream,
        reduction="none",
        shards=4,
        softcap=6.0,
    )
