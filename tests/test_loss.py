"""linear_cross_entropy against the naive materialising oracle (reference.py) and fp64 truth."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import chunklogits as cl
from chunklogits import reference
from tests.helpers import (
    assert_accuracy_within_rounding,
    assert_as_accurate,
    confident_head,
    per_position_temperature,
    run_ranks,
    seeded,
)


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


def check_against_oracle(
    hidden, weight, bias, labels, dtype, upstream=None, ours_fn=cl.linear_cross_entropy, **kw
):
    to64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    exact = run(reference.linear_cross_entropy, *to64, labels, upstream, **kw)
    naive = run(reference.linear_cross_entropy, hidden, weight, bias, labels, upstream, **kw)
    ours = run(ours_fn, hidden, weight, bias, labels, upstream, **kw)
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
    with pytest.raises(RuntimeError, match="create_graph: chunklogits ops have no second-order"):
        torch.autograd.grad(loss, hidden, create_graph=True)


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


# --- class_weight, return_z_loss, return_token_accuracy, token_accuracy --------------------------


def class_weights(vocab: int, seed: int = 7) -> torch.Tensor:
    """Per-class weights in [0, 2], some exactly 0 (a class that never counts)."""
    weights = torch.rand(vocab, generator=seeded(seed)) * 2
    weights[::5] = 0.0
    return weights


@pytest.mark.parametrize("shards", [1, 4, 301])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_weight_matches_oracle(dtype, reduction, shards):
    hidden, weight, bias, labels = make_inputs((4, 23), 301, 48, dtype, 0.3, bias=True)
    upstream = torch.rand(labels.shape, generator=seeded(1)) if reduction == "none" else None
    check_against_oracle(
        hidden, weight, bias, labels, dtype, upstream, reduction=reduction, shards=shards,
        class_weight=class_weights(301), z_loss=1e-3, softcap=7.0,
    )  # fmt: skip


def test_class_weight_equals_torch_cross_entropy():
    # F.cross_entropy(weight=): the weighted sum over the summed weights of the kept labels.
    hidden, weight, _, labels = make_inputs((3, 19), 211, 32, torch.float64, 0.3)
    weights = class_weights(211).double()
    ours = cl.linear_cross_entropy(hidden, weight, labels, class_weight=weights, shards=6)
    logits = (hidden @ weight.T).flatten(0, 1)
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels.flatten(), weight=weights))
    with_items = cl.linear_cross_entropy(
        hidden, weight, labels, class_weight=weights, num_items_in_batch=50
    )
    summed = F.cross_entropy(logits, labels.flatten(), weight=weights, reduction="sum")
    torch.testing.assert_close(with_items, summed / 50)


def loss_output_and_grads(fn, hidden, weight, bias, labels, **kw):
    """The three fields of ``fn(..., return_z_loss=True, return_token_accuracy=True)`` and the
    gradients of ``loss + 3 * z_loss`` (the z-loss output is differentiable too)."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fn(
        *leaves[:2], labels, bias=leaves[2], return_z_loss=True, return_token_accuracy=True, **kw
    )
    assert type(out).__name__ == "LossOutput"
    upstream = torch.rand(out.loss.shape, generator=seeded(1), dtype=torch.float64)
    ((out.loss + 3 * out.z_loss) * upstream.to(out.loss.dtype)).sum().backward()
    return [t.detach() for t in out] + [t.grad for t in leaves]


@pytest.mark.parametrize("class_weighted", [False, True], ids=["unweighted", "class_weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_and_token_accuracy_outputs_match_oracle(dtype, reduction, class_weighted):
    hidden, weight, bias, labels = make_inputs((3, 29), 257, 40, dtype, 0.3, bias=True)
    labels = labels_near_the_top(hidden, weight, bias, labels, softcap=4.0)
    options = dict(reduction=reduction, z_loss=2e-3, softcap=4.0, shift=True)
    if class_weighted:
        options["class_weight"] = class_weights(257)
    f64 = [t.double() for t in (hidden, weight, bias)]
    exact = loss_output_and_grads(reference.linear_cross_entropy, *f64, labels, **options)
    naive = loss_output_and_grads(
        reference.linear_cross_entropy, hidden, weight, bias, labels, **options
    )
    ours = loss_output_and_grads(
        cl.linear_cross_entropy, hidden, weight, bias, labels, shards=5, **options
    )
    names = ["loss", "z_loss", "token_accuracy", "grad hidden", "grad weight", "grad bias"]
    for name, o, n, e in zip(names, ours, naive, exact, strict=True):
        assert o.shape == e.shape, name
        if name == "token_accuracy":
            # A decision on the model's own logits: the naive same-dtype result, up to labels
            # within the GEMM's rounding of a tie.
            decision = reference.model_logits(hidden, weight, bias=bias, softcap=4.0)[:, :-1]
            assert_accuracy_within_rounding(
                o, decision.float(), labels[:, 1:], 1, dtype, reduction=reduction
            )
        else:
            assert_as_accurate(o, n, e, dtype, name)
    plain = cl.linear_cross_entropy(
        hidden.detach(), weight.detach(), labels, bias=bias.detach(), shards=5, **options
    )
    torch.testing.assert_close(ours[0], plain, rtol=0, atol=0)


def test_return_flags_give_the_fields_asked_for():
    hidden, weight, _, labels = make_inputs((2, 9), 67, 16, torch.float32, 0.2)
    only_z = cl.linear_cross_entropy(hidden, weight, labels, z_loss=1e-2, return_z_loss=True)
    only_accuracy = cl.linear_cross_entropy(hidden, weight, labels, return_token_accuracy=True)
    assert only_z.token_accuracy is None and only_accuracy.z_loss is None
    # Without z_loss the returned term is 0 and the loss the plain one.
    no_z = cl.linear_cross_entropy(hidden, weight, labels, return_z_loss=True)
    assert no_z.z_loss.item() == 0.0
    torch.testing.assert_close(no_z.loss, cl.linear_cross_entropy(hidden, weight, labels))
    lse = reference.logits(hidden, weight).logsumexp(-1)[labels != -100]
    torch.testing.assert_close(only_z.z_loss, 1e-2 * lse.square().mean())


def labels_near_the_top(hidden, weight, bias, labels, softcap=None, seed=5):
    """``labels`` with about half the kept positions moved to one of the model's three largest
    logits (so that accuracy is neither 0 nor 1, and half-precision ties come up)."""
    decision = reference.model_logits(
        hidden.detach(), weight.detach(), bias=None if bias is None else bias.detach(),
        softcap=softcap,
    ).float()  # fmt: skip
    g = seeded(seed)
    rank = torch.randint(0, 3, labels.shape, generator=g)
    near = decision.topk(3, dim=-1).indices.gather(-1, rank[..., None]).squeeze(-1)
    # With shift=True position t's label is read at t - 1: move labels one step to the right.
    near = torch.cat([near[..., -1:], near[..., :-1]], -1)
    moved = (torch.rand(labels.shape, generator=g) < 0.5) & (labels != -100)
    return torch.where(moved, near, labels)


ACCURACY_OPTIONS = [{}, {"softcap": 1.5}, {"logit_scale": 0.5, "softcap": 2.0}]


def check_token_accuracy(shape, vocab, dim, dtype, top_k, options, blockings):
    hidden, weight, bias, labels = make_inputs(shape, vocab, dim, dtype, 0.3, bias=True)
    labels = labels_near_the_top(hidden, weight, bias, labels, options.get("softcap"))
    args = (hidden.detach(), weight.detach(), labels)
    kw = dict(bias=bias.detach(), top_k=top_k, shift=True, **options)
    naive = reference.token_accuracy(*args, **kw)
    assert 0.1 < naive < 0.9  # the case tells right from wrong
    transform = dict(bias=bias.detach(), **options)
    decision = reference.model_logits(*args[:2], **transform).float()[:, :-1]
    for shards, chunk_size in blockings:
        ours = cl.token_accuracy(*args, shards=shards, chunk_size=chunk_size, **kw)
        assert not ours.requires_grad
        assert_accuracy_within_rounding(ours, decision, labels[:, 1:], top_k, dtype)


@pytest.mark.parametrize("options", ACCURACY_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_token_accuracy_matches_oracle(top_k, options):
    # One shard per vocabulary entry is slow: once.
    blockings = [(1, None), (7, 5)] + [(507, None)] * (top_k == 2)
    check_token_accuracy((3, 31), 507, 123, torch.float32, top_k, options, blockings)


@pytest.mark.parametrize("options", ACCURACY_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("top_k", [1, 5])
def test_token_accuracy_half_precision(cpu_gemm, top_k, options):
    # The comparisons are made on the model's bf16 logits (ties are frequent) on both GEMM paths.
    blockings = [(1, None), (7, 5)]
    check_token_accuracy((2, 29), 251, 40, torch.bfloat16, top_k, options, blockings)


def test_token_accuracy_counts_ties_with_the_kth_logit():
    # Three logits equal to 1, the rest below: each tied label counts for top_k=1.
    weight = torch.zeros(6, 2)
    weight[[1, 3, 4], 0] = 1.0
    hidden = torch.tensor([[1.0, 0.0]] * 4)
    labels = torch.tensor([1, 3, 4, 0])
    assert cl.token_accuracy(hidden, weight, labels, shards=3).item() == 0.75
    assert cl.token_accuracy(hidden, weight, labels, top_k=4, shards=3).item() == 1.0


def test_token_accuracy_equals_trls_mean_token_accuracy():
    # TRL's SFTTrainer: argmax of the shifted logits == shifted labels, over labels != -100
    # (fp32 logits of random data have no ties, so argmax and "nothing greater" agree).
    hidden, weight, _, labels = make_inputs((2, 40), 97, 16, torch.float32, 0.2)
    labels = labels_near_the_top(hidden, weight, None, labels)
    logits = reference.logits(hidden.detach(), weight.detach())
    shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
    mask = shift_labels != -100
    correct = (shift_logits.argmax(-1) == shift_labels) & mask
    trl = correct.sum() / mask.sum()
    naive = reference.token_accuracy(hidden.detach(), weight.detach(), labels, shift=True)
    torch.testing.assert_close(naive, trl.float())
    ours = cl.token_accuracy(hidden.detach(), weight.detach(), labels, shift=True, shards=3)
    assert_accuracy_within_rounding(ours, shift_logits, shift_labels, 1, torch.float32)


def test_token_accuracy_of_nothing_is_nan():
    hidden, weight, _, labels = make_inputs((2, 5), 30, 8, torch.float32, ignored=1.0)
    assert cl.token_accuracy(hidden, weight, labels).isnan()
    out = cl.linear_cross_entropy(hidden, weight, labels, return_token_accuracy=True)
    assert (
        out.token_accuracy.isnan()
        == reference.linear_cross_entropy(
            hidden, weight, labels, return_token_accuracy=True
        ).token_accuracy.isnan()
    )


def test_head_methods_match_oracle():
    hidden, weight, bias, labels = make_inputs((2, 19), 211, 32, torch.bfloat16, 0.2, bias=True)
    hidden, weight, bias = (t.detach() for t in (hidden, weight, bias))
    labels = labels_near_the_top(hidden, weight, bias, labels, softcap=3.0)
    head = cl.ChunkedLMHead(weight, bias, shards=3, softcap=3.0, logit_scale=0.8)
    transform = dict(bias=bias, softcap=3.0, logit_scale=0.8)
    accuracy = head.token_accuracy(hidden, labels, top_k=2, shift=True)
    decision = reference.model_logits(hidden, weight, **transform).float()[:, :-1]
    assert_accuracy_within_rounding(accuracy, decision, labels[:, 1:], 2, torch.bfloat16)
    options = dict(shift=True, class_weight=class_weights(211), return_token_accuracy=True)
    out = head.loss(hidden, labels, **options)
    naive = reference.linear_cross_entropy(hidden, weight, labels, **options, **transform)
    f64 = dict(bias=bias.double(), softcap=3.0, logit_scale=0.8)
    exact = reference.linear_cross_entropy(
        hidden.double(), weight.double(), labels, **options, **f64
    )
    assert_as_accurate(out.loss, naive.loss, exact.loss, torch.bfloat16, "head loss")
    assert_accuracy_within_rounding(out.token_accuracy, decision, labels[:, 1:], 1, torch.bfloat16)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (
            lambda h, w, y: cl.linear_cross_entropy(h, w, y, class_weight=torch.ones(30)),
            ValueError,
            ["class_weight", "[V] = [40]", "(30,)"],
        ),
        (
            lambda h, w, y: cl.linear_cross_entropy(h, w, y, class_weight=torch.ones(40, 1)),
            ValueError,
            ["class_weight", "[V]", "(40, 1)"],
        ),
        (
            lambda h, w, y: cl.linear_cross_entropy(
                h, w, y, class_weight=torch.ones(40, dtype=torch.long)
            ),
            TypeError,
            ["class_weight", "floating-point", "int64"],
        ),
        (
            lambda h, w, y: cl.linear_cross_entropy(
                h, w, y, class_weight=torch.ones(40), label_smoothing=0.1
            ),
            ValueError,
            ["class_weight", "label_smoothing", "0.1"],
        ),
        (
            lambda h, w, y: cl.linear_cross_entropy(h, w, y, return_token_accuracy=1),
            TypeError,
            ["return_token_accuracy", "bool", "1"],
        ),
        (
            lambda h, w, y: cl.linear_cross_entropy(h, w, y, return_z_loss="yes"),
            TypeError,
            ["return_z_loss", "bool", "'yes'"],
        ),
        (lambda h, w, y: cl.token_accuracy(h, w, y, top_k=0), ValueError, ["top_k", ">= 1", "0"]),
        (
            lambda h, w, y: cl.token_accuracy(h, w, y, top_k=41),
            ValueError,
            ["top_k", "[1, V = 40]", "41"],
        ),
        (lambda h, w, y: cl.token_accuracy(h, w, y, top_k=1.0), TypeError, ["top_k", "int"]),
        (
            lambda h, w, y: cl.token_accuracy(h, w, y, top_k=None),
            TypeError,
            ["top_k: expected an int, got NoneType"],
        ),
        (
            lambda h, w, y: cl.token_accuracy(h, w, y[:, :-1]),
            ValueError,
            ["labels", "(2, 5)", "(2, 4)"],
        ),
        (lambda h, w, y: cl.topk_logprobs(h, w, 0), ValueError, ["k", ">= 1", "0"]),
        (lambda h, w, y: cl.topk_logprobs(h, w, 41), ValueError, ["k", "[1, V = 40]", "41"]),
        (
            lambda h, w, y: cl.topk_logprobs(h, w, None),
            TypeError,
            ["k: expected an int, got NoneType"],
        ),
        (
            lambda h, w, y: cl.topk_logprobs(h, w, 3, temperature=0.0),
            ValueError,
            ["temperature", "> 0", "0.0"],
        ),
    ],
)
def test_bad_arguments_of_the_new_options(call, error, words):
    hidden, weight, labels = torch.randn(2, 5, 8), torch.randn(40, 8), torch.randint(0, 40, (2, 5))
    with pytest.raises(error) as raised:
        call(hidden, weight, labels)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


# --- grad_in_forward: the gradients computed during the forward pass ----------------------------

_FUSED_OPTIONS = [
    {},
    {"reduction": "sum"},
    {"shift": True, "num_items_in_batch": 50},
    {"label_smoothing": 0.1, "z_loss": 1e-3},
    {"softcap": 3.0, "logit_scale": 1.5, "reduction": "sum"},
    {"shift": True, "label_smoothing": 0.2, "z_loss": 1e-4, "softcap": 2.5, "chunk_size": 7},
]


@pytest.mark.parametrize("options", _FUSED_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("grad_in_forward", [True, False, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_in_forward_matches_oracle(dtype, grad_in_forward, options):
    # Ignored labels, a bias, an odd vocabulary and several shards and chunks throughout.
    hidden, weight, bias, labels = make_inputs((4, 23), 301, 48, dtype, 0.3, bias=True)
    ours = functools.partial(cl.linear_cross_entropy, grad_in_forward=grad_in_forward)
    options = {"shards": 5, **options}
    check_against_oracle(hidden, weight, bias, labels, dtype, ours_fn=ours, **options)


def test_grad_in_forward_both_cpu_compute_paths(cpu_gemm):
    hidden, weight, bias, labels = make_inputs((2, 30), 211, 40, torch.bfloat16, 0.3, bias=True)
    ours = functools.partial(cl.linear_cross_entropy, grad_in_forward=True)
    check_against_oracle(
        hidden, weight, bias, labels, torch.bfloat16, ours_fn=ours, shards=4, softcap=6.0
    )


def test_grad_in_forward_default_budget_plan():
    # No shards / chunk_size given: the plan keeps whole rows of the vocabulary within a small
    # budget, so several row chunks and shards are walked.
    hidden, weight, bias, labels = make_inputs((8, 40), 5000, 32, torch.float32, 0.2, bias=True)
    previous = cl.set_block_budget(2**17)
    try:
        plan = cl._blocks.plan_blocks(320, 5000, torch.float32, hidden.device, kept_vocab=5000)
        assert plan.chunk_size < 320 and len(plan.shards) > 1
        ours = functools.partial(cl.linear_cross_entropy, grad_in_forward=True)
        check_against_oracle(hidden, weight, bias, labels, torch.float32, ours_fn=ours)
    finally:
        cl.set_block_budget(previous)


@pytest.mark.parametrize(
    ("dtype", "weight_grad", "reduction", "budget", "expected"),
    [
        (torch.float32, True, "mean", None, True),  # the fp32 weight gradient is its own sum
        # A frozen half-precision weight: nothing to sum, no copy where its GEMMs run in its
        # dtype (an fp32 copy of it where they run in fp32), and not where AMX makes them cheap.
        (torch.bfloat16, False, "sum", None, "native"),
        (torch.bfloat16, True, "mean", None, False),  # would need an fp32 [V, D] sum
        (torch.float32, True, "none", None, False),  # no scalar loss
        # The budget holds the whole vocabulary's logits for fewer than 128 of the 300 rows.
        (torch.float32, True, "mean", 2**17, False),
    ],
)
def test_grad_in_forward_default_decides(
    monkeypatch, cpu_gemm, dtype, weight_grad, reduction, budget, expected
):
    # The rule reads dtypes, the instruction set and the budget only.
    from chunklogits import _blocks

    calls = []
    fused = _blocks._fused_loss_blocks
    monkeypatch.setattr(_blocks, "_fused_loss_blocks", lambda *a: calls.append(1) or fused(*a))
    if budget is not None:
        monkeypatch.setitem(_blocks._settings, "block_budget", budget)
    hidden, weight, bias, labels = make_inputs((3, 100), 203, 24, dtype, 0.2, bias=True)
    weight.requires_grad_(weight_grad)
    results = []
    for fn, cast in [(cl.linear_cross_entropy, dtype), (reference.linear_cross_entropy, dtype),
                     (reference.linear_cross_entropy, torch.float64)]:  # fmt: skip
        h = hidden.detach().to(cast).requires_grad_()
        loss = fn(h, weight.to(cast), labels, bias=bias.to(cast), reduction=reduction)
        loss.sum().backward()
        results.append((loss.detach(), h.grad))
    for ours, naive, exact in zip(*results, strict=True):
        assert_as_accurate(ours, naive, exact, dtype, "loss and hidden gradient")
    if expected == "native":
        native = _blocks.block_compute_dtype(dtype, hidden.device) == dtype
        expected = native and not torch.cpu._is_amx_tile_supported()
    assert bool(calls) == expected


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_half_precision_products_added_a_slice_at_a_time(monkeypatch, grad_in_forward):
    # bf16 block GEMMs: each gradient product is converted to fp32 a few rows at a time before
    # it is added to the fp32 sums (here one row at a time, several shards and row chunks).
    from chunklogits import _blocks

    previous = cl.set_cpu_gemm_dtype("model")
    try:
        hidden, weight, bias, labels = make_inputs((2, 30), 300, 24, torch.bfloat16, 0.1, True)
        ours = functools.partial(
            cl.linear_cross_entropy, shards=3, chunk_size=16, grad_in_forward=grad_in_forward
        )
        args = (hidden, weight, bias, labels, torch.bfloat16)
        whole, _ = check_against_oracle(*args, ours_fn=ours)
        monkeypatch.setattr(_blocks, "_CONVERTED_NUMEL", 30)
        sliced, _ = check_against_oracle(*args, ours_fn=ours)
    finally:
        cl.set_cpu_gemm_dtype(previous)
    for a, b in zip(whole, sliced, strict=True):  # the same additions, in slices
        assert torch.equal(a, b)


def test_grad_in_forward_without_grad_is_the_loss():
    hidden, weight, bias, labels = make_inputs((3, 10), 99, 20, torch.float32, 0.3, bias=True)
    with torch.no_grad():
        ours = cl.linear_cross_entropy(hidden, weight, labels, bias=bias, grad_in_forward=True)
    exact = reference.linear_cross_entropy(
        hidden.double(), weight.double(), labels, bias=bias.double()
    )
    naive = reference.linear_cross_entropy(hidden, weight, labels, bias=bias)
    assert not ours.requires_grad
    assert_as_accurate(ours, naive.detach(), exact.detach(), torch.float32, "no_grad loss")


def test_grad_in_forward_with_the_statistics_in_the_result():
    # A result that uses the per-row statistics besides the fused loss (as a returned z-loss
    # would): their gradient is added by a recomputing pass, on top of the scaled fused one.
    from chunklogits import _blocks

    hidden, weight, bias, labels = make_inputs((2, 20), 150, 16, torch.float64, 0.2, bias=True)
    flat = labels.reshape(-1)
    index = (flat != -100).nonzero().squeeze(1)
    plan = _blocks.plan_blocks(index.numel(), 150, torch.float64, hidden.device, shards=3,
                               chunk_size=9, kept_vocab=150)  # fmt: skip
    stats, total = _blocks.row_stats(
        hidden.reshape(-1, 16), weight, bias, index=index, targets=flat[index], plan=plan,
        row_loss=lambda s, _: -s.logprob,
    )  # fmt: skip
    (0.5 * total + stats.lse.square().sum()).backward()
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(leaves[0].reshape(-1, 16)[index], leaves[1], leaves[2])
    lse = logits.logsumexp(-1)
    expected = 0.5 * (lse - logits.gather(1, flat[index, None]).squeeze(1)).sum()
    (expected + lse.square().sum()).backward()
    for ours, theirs in zip((hidden, weight, bias), leaves, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-12)


def test_grad_in_forward_bad_values():
    hidden, weight, _, labels = make_inputs((2, 8), 64, 16, torch.float32)
    with pytest.raises(ValueError, match="grad_in_forward: True needs a scalar loss"):
        cl.linear_cross_entropy(hidden, weight, labels, reduction="none", grad_in_forward=True)
    with pytest.raises(TypeError, match="grad_in_forward: expected True, False or None, got 1"):
        cl.linear_cross_entropy(hidden, weight, labels, grad_in_forward=1)


def _fused_ranks_worker(rank: int, world: int, dtype: torch.dtype, options: dict) -> list:
    import torch.distributed as dist

    hidden, weight, bias, labels = make_inputs((3, 19), 203, 24, dtype, 0.2, bias=True)
    bounds = [0, 80, 203]  # uneven slices
    leaves = [
        t.detach()[bounds[rank] : bounds[rank + 1]].clone().requires_grad_() if t is not hidden
        else t.detach().clone().requires_grad_()
        for t in (hidden, weight, bias)
    ]  # fmt: skip
    loss = cl.linear_cross_entropy(
        leaves[0], leaves[1], labels, bias=leaves[2], process_group=dist.group.WORLD,
        grad_in_forward=True, chunk_size=7, **options,
    )  # fmt: skip
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_in_forward_two_ranks(dtype):
    options = {"shift": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}
    hidden, weight, bias, labels = make_inputs((3, 19), 203, 24, dtype, 0.2, bias=True)
    to64 = [t.double() for t in (hidden, weight, bias)]
    exact = run(reference.linear_cross_entropy, *to64, labels, **options)
    naive = run(reference.linear_cross_entropy, hidden, weight, bias, labels, **options)
    ranks = run_ranks(_fused_ranks_worker, 2, dtype, options)
    bounds = [0, 80, 203]
    for rank, ours in enumerate(ranks):
        part = slice(bounds[rank], bounds[rank + 1])
        names = ["loss", "grad hidden", "grad weight", "grad bias"]
        for i, (name, o, n, e) in enumerate(zip(names, ours, naive, exact, strict=True)):
            n, e = (n[part], e[part]) if i >= 2 else (n, e)
            assert_as_accurate(o, n, e, dtype, f"rank {rank} {name}")


# --- grad_in_forward with class weights, the returned z-loss and the token accuracy -----------

_FUSED_NEW_OPTIONS = [
    {"class_weight": True},
    {"class_weight": True, "reduction": "sum", "z_loss": 1e-3},
    {"return_z_loss": True, "z_loss": 1e-3, "shift": True},
    {"class_weight": True, "return_z_loss": True, "z_loss": 1e-2, "num_items_in_batch": 30},
    {"return_token_accuracy": True},
    {"return_token_accuracy": True, "return_z_loss": True, "class_weight": True, "z_loss": 1e-3},
]


@pytest.mark.parametrize("options", _FUSED_NEW_OPTIONS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("grad_in_forward", [True, False, None])
def test_grad_in_forward_with_the_new_options(monkeypatch, grad_in_forward, options):
    from chunklogits import _blocks

    calls = []
    fused = _blocks._fused_loss_blocks
    monkeypatch.setattr(_blocks, "_fused_loss_blocks", lambda *a: calls.append(1) or fused(*a))
    hidden, weight, bias, labels = make_inputs((3, 17), 203, 24, torch.float32, 0.2, bias=True)
    options = dict(options)
    if options.pop("class_weight", False):
        options["class_weight"] = class_weights(203)
    accuracy = options.get("return_token_accuracy", False)
    if grad_in_forward and accuracy:
        with pytest.raises(ValueError, match="grad_in_forward: True does not serve"):
            cl.linear_cross_entropy(
                hidden, weight, labels, bias=bias, grad_in_forward=True, **options
            )
        return
    results = []
    for fn, cast, extra in [
        (cl.linear_cross_entropy, torch.float32, {"grad_in_forward": grad_in_forward, "shards": 3}),
        (reference.linear_cross_entropy, torch.float32, {}),
        (reference.linear_cross_entropy, torch.float64, {}),
    ]:
        leaves = [t.detach().to(cast).requires_grad_() for t in (hidden, weight, bias)]
        opts = dict(options)
        if "class_weight" in opts:
            opts["class_weight"] = opts["class_weight"].to(cast)
        out = fn(leaves[0], leaves[1], labels, bias=leaves[2], **opts, **extra)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        results.append((out, [t.grad for t in leaves]))
    (ours, ours_grads), (naive, naive_grads), (exact, exact_grads) = results
    if isinstance(ours, torch.Tensor):
        ours, naive, exact = (ours,), (naive,), (exact,)
    else:
        if ours.token_accuracy is not None:
            decision = reference.model_logits(hidden, weight, bias=bias).detach()
            reduction = options.get("reduction", "mean")
            assert_accuracy_within_rounding(
                ours.token_accuracy, decision, labels, 1, torch.float32, reduction=reduction
            )
        ours, naive, exact = ([x for x in out[:2] if x is not None] for out in (ours, naive, exact))
    for o, n, e in zip(ours, naive, exact, strict=True):
        assert_as_accurate(o.detach(), n.detach(), e.detach(), torch.float32, f"{options}")
    for o, n, e in zip(ours_grads, naive_grads, exact_grads, strict=True):
        assert_as_accurate(o, n, e, torch.float32, f"grads {options}")
    # fp32 weight on the CPU: None fuses unless the token accuracy is asked for.
    assert bool(calls) == (grad_in_forward is not False and not accuracy)


# --- the loss as an autograd op: repeated backward, gradcheck, class weights with a gradient ---


def counting_fused_calls(monkeypatch) -> list:
    """Patch ``_fused_loss_blocks`` to record each call's ``_FusedGrads`` as weak references
    (None where absent), so as not to keep them alive, with the address of the weight's
    (``data_ptr``); returns the record, a ``(references, address)`` pair per call."""
    import weakref

    from chunklogits import _blocks

    calls = []
    fused = _blocks._fused_loss_blocks

    def recorded(*args):
        result = fused(*args)
        grads = result[2]
        references = [None if g is None else weakref.ref(g) for g in grads]
        calls.append((references, None if grads.weight is None else grads.weight.data_ptr()))
        return result

    monkeypatch.setattr(_blocks, "_fused_loss_blocks", recorded)
    return calls


_REPEATED_OPTIONS = [
    {},
    {"bias": True, "shards": 3},
    {"class_weight": True, "z_loss": 1e-3, "bias": True},
    {"class_weight": True, "reduction": "sum", "chunk_size": 256},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "shift": True, "chunk_size": 256, "shards": 2},
    {"return_z_loss": True, "z_loss": 1e-2, "class_weight": True},
]


@pytest.mark.parametrize("options", _REPEATED_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_backward_twice_doubles_the_gradients(monkeypatch, dtype, options):
    # The default takes the fused path for these weights (asserted), and a second backward
    # through the retained graph adds the same gradients again, as for any autograd op (it used
    # to raise "grad_in_forward=True: backward through the same loss twice"). 330 rows of which
    # 264 are kept: two row chunks with chunk_size=256.
    calls = counting_fused_calls(monkeypatch)
    options = dict(options)
    with_bias = options.pop("bias", False)
    hidden, weight, bias, labels = make_inputs((3, 110), 203, 24, dtype, 0.2, bias=with_bias)
    if options.pop("class_weight", False):
        options["class_weight"] = class_weights(203).to(dtype).requires_grad_()
    leaves = [t for t in (hidden, weight, bias, options.get("class_weight")) if t is not None]
    out = cl.linear_cross_entropy(hidden, weight, labels, bias=bias, **options)
    loss = out if isinstance(out, torch.Tensor) else out.loss + 3 * out.z_loss
    assert len(calls) == 1
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in leaves]
    loss.backward()
    for t, g in zip(leaves, once, strict=True):
        torch.testing.assert_close(t.grad, 2 * g, rtol=0, atol=0)
    # The first backward's gradients are the oracle's.
    results = []
    for cast in (dtype, torch.float64):
        copies = [t.detach().to(cast).requires_grad_() for t in leaves]
        opts = dict(options)
        if "class_weight" in opts:
            opts["class_weight"] = copies[-1]
        bias_copy = copies[2] if with_bias else None
        ref = reference.linear_cross_entropy(copies[0], copies[1], labels, bias=bias_copy, **opts)
        (ref if isinstance(ref, torch.Tensor) else ref.loss + 3 * ref.z_loss).backward()
        results.append([t.grad for t in copies])
    for ours, naive, exact in zip(once, *results, strict=True):
        assert_as_accurate(ours, naive, exact, dtype, f"first backward {options}")


def test_fused_gradients_are_returned_or_copied(monkeypatch):
    # The fused gradients live with the graph. A backward that frees it returns the weight's
    # (fp32) as the gradient itself, no copy; one that retains it returns copies and keeps them
    # for the next, which returns the same values.
    import gc

    calls = counting_fused_calls(monkeypatch)
    hidden, weight, bias, labels = make_inputs((2, 30), 211, 16, torch.float32, 0.2, bias=True)
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    reference.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2]).backward()
    loss = cl.linear_cross_entropy(hidden, weight, labels, bias=bias)
    loss.backward()
    assert weight.grad.data_ptr() == calls[0][1]
    for ours, exact in zip((hidden, weight, bias), leaves, strict=True):
        torch.testing.assert_close(ours.grad.double(), exact.grad, rtol=1e-5, atol=1e-6)
        ours.grad = None
    loss = cl.linear_cross_entropy(hidden, weight, labels, bias=bias)
    saved = calls[1][0][1]
    loss.backward(retain_graph=True)
    assert saved() is not None and weight.grad.data_ptr() != calls[1][1]
    once = weight.grad.clone()
    loss.backward()
    del loss
    gc.collect()
    assert saved() is None  # freed with the graph
    torch.testing.assert_close(weight.grad, 2 * once, rtol=0, atol=0)
    torch.testing.assert_close(once.double(), leaves[1].grad, rtol=1e-5, atol=1e-6)


_GRADCHECK_OPTIONS = [
    {},
    {"shards": 3, "z_loss": 1e-2},
    {"chunk_size": 4, "shards": 3, "reduction": "sum"},
    {"class_weight": True, "z_loss": 1e-2, "chunk_size": 5, "shards": 2},
    {"class_weight": True, "reduction": "sum", "shards": 4, "softcap": 3.0},
    {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0, "shift": True, "chunk_size": 5},
]


@pytest.mark.parametrize("options", _GRADCHECK_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("grad_in_forward", [None, True])
def test_gradcheck(grad_in_forward, options):
    # torch.autograd.gradcheck in fp64 on its default settings (its reentrancy check compares two
    # backward passes exactly): the numerical Jacobian of the forward is the oracle of the
    # gradients of hidden, weight, bias and the class weights, on both paths, several row chunks
    # and vocabulary shards. PyTorch's own test_gradcheck of F.linear_cross_entropy failed on
    # the default path.
    options = dict(options)
    hidden, weight, bias, labels = make_inputs((2, 7), 37, 6, torch.float64, 0.2, bias=True)
    inputs = [hidden, weight, bias]
    if options.pop("class_weight", False):
        inputs.append(class_weights(37).double().add_(0.1).requires_grad_())

    def loss(hidden, weight, bias, class_weight=None):
        return cl.linear_cross_entropy(
            hidden, weight, labels, bias=bias, class_weight=class_weight,
            grad_in_forward=grad_in_forward, **options,
        )  # fmt: skip

    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("grad_in_forward", [None, True, False])
def test_class_weight_gradient(grad_in_forward, reduction):
    # Class weights that require grad get autograd's gradient through the naive loss on every
    # path (the fused one gave none for "sum" and a wrong one for "mean"). Several row chunks of
    # the fused path (None and True), as in the class-weight crash below.
    hidden, weight, bias, labels = make_inputs((3, 100), 503, 24, torch.float32, 0.2, bias=True)
    weights = class_weights(503)
    results = []
    for fn, cast, extra in [
        (cl.linear_cross_entropy, torch.float32, {"grad_in_forward": grad_in_forward}),
        (reference.linear_cross_entropy, torch.float32, {}),
        (reference.linear_cross_entropy, torch.float64, {}),
    ]:
        leaves = [t.detach().to(cast).requires_grad_() for t in (hidden, weight, bias, weights)]
        chunks = {"chunk_size": 64} if fn is cl.linear_cross_entropy else {}
        loss = fn(
            leaves[0], leaves[1], labels, bias=leaves[2], class_weight=leaves[3],
            reduction=reduction, z_loss=1e-3, **chunks, **extra,
        )  # fmt: skip
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    names = ["loss", "grad hidden", "grad weight", "grad bias", "grad class_weight"]
    for name, ours, naive, exact in zip(names, *results, strict=True):
        assert_as_accurate(ours, naive, exact, torch.float32, f"{name} {reduction}")


def test_class_weight_over_several_fused_chunks(monkeypatch):
    # N = 600, V = 8000, D = 32 on the default settings: the fused path walks the rows in two
    # chunks, and each chunk's loss takes its own rows' class weights (it crashed with "The size
    # of tensor a (419) must match the size of tensor b (600)").
    calls = counting_fused_calls(monkeypatch)
    hidden, weight, bias, labels = make_inputs((600,), 8000, 32, torch.float32, 0.0, bias=True)
    assert cl._blocks.plan_blocks(600, 8000, torch.float32, hidden.device, kept_vocab=8000,
                                  dim=32).chunk_size < 600  # fmt: skip
    check_against_oracle(
        hidden, weight, bias, labels, torch.float32, class_weight=class_weights(8000), z_loss=1e-3
    )
    assert len(calls) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda h, w, y, n: cl.linear_cross_entropy(h, w, y, num_items_in_batch=n),
        lambda h, w, y, n: cl.ChunkedLMHead(w).loss(h, y, num_items_in_batch=n),
        lambda h, w, y, n: cl.linear_jsd(h, w, h.detach(), w, labels=y, num_items_in_batch=n),
    ],
    ids=["linear_cross_entropy", "ChunkedLMHead.loss", "linear_jsd"],
)
@pytest.mark.parametrize("count", [torch.tensor(0), torch.tensor(-2.0), 0])
def test_num_items_in_batch_must_be_positive(call, count):
    # A count of 0 (every label of the accumulated batch ignored) divided the loss by 0: +-inf
    # gradients here, NaN in the naive computation. Refused by name, as a tensor or a number.
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight, labels = torch.randn(40, 8), torch.randint(0, 40, (2, 5))
    with pytest.raises(ValueError, match="num_items_in_batch: expected a positive") as raised:
        call(hidden, weight, labels, count)
    assert repr(count) in str(raised.value)


def test_head_on_meta_weight_gives_shapes():
    # A ChunkedLMHead built on the meta device (a model instantiated without memory) computes
    # shapes, as the ops do: its autocast check used to raise "unknown device type for autocast".
    meta = dict(device="meta")
    weight = torch.empty(40, 8, **meta, requires_grad=True)
    hidden = torch.empty(2, 5, 8, **meta, requires_grad=True)
    labels = torch.empty(2, 5, dtype=torch.long, **meta)
    head = cl.ChunkedLMHead(weight)
    for reduction in ("mean", "none"):
        ours = head.loss(hidden, labels, shift=True, reduction=reduction)
        naive = reference.linear_cross_entropy(
            hidden, weight, labels, shift=True, reduction=reduction
        )
        assert ours.is_meta and (ours.shape, ours.dtype) == (naive.shape, naive.dtype)
    ours.sum().backward()
    assert hidden.grad.shape == hidden.shape and head.weight.grad.shape == weight.shape
    logprobs = head.token_logprobs(hidden, labels)
    assert logprobs.is_meta and logprobs.shape == labels.shape


@pytest.mark.parametrize("grad_in_forward", [None, True, False])
@pytest.mark.parametrize(
    ("dtype", "case"),
    [(torch.float32, "gap-15"), (torch.float64, "gap-15"), (torch.float32, "gap-20")],
    ids=str,
)
def test_confident_token_loss(dtype, case, grad_in_forward):
    # The loss of a confident token, -log p ~ 3e-7 (V = 2, logits 5.9 and -9.1) or ~ 1e-7
    # (token 7's logit 20 above the others'), is formed as log(sum exp(z - max)) - (z_t - max)
    # as the naive log_softmax forms it, not as lse - z_t, which loses eps * |lse|. In fp64 the
    # loss alone: there the naive computation is the exact one, and gradients such as 1 - p of
    # the top token (~1e-7, from a p rounded near 1) are nobody's to the last bit.
    hidden, weight, bias, labels = confident_head(case, dtype)
    ours_fn = functools.partial(cl.linear_cross_entropy, grad_in_forward=grad_in_forward)
    if dtype == torch.float32:
        check_against_oracle(hidden, weight, bias, labels, dtype, ours_fn=ours_fn)
    else:
        exact = reference.linear_cross_entropy(hidden, weight, labels)
        assert_as_accurate(ours_fn(hidden, weight, labels), exact, exact, dtype, case)


@pytest.mark.parametrize(
    ("grad_in_forward", "reduction"),
    # grad_in_forward=True needs a scalar loss: "none" is refused (tested beside the other
    # grad_in_forward errors).
    [(g, r) for g in (None, True, False) for r in ("mean", "sum", "none") if not g or r != "none"],
)
def test_z_loss_gradient_of_a_one_hot_softmax(grad_in_forward, reduction):
    # One token (p = 1): the gradient is z_loss's 2 * z_loss * lse * p alone (~1e-6), which
    # p * (1 + 2 * z_loss * lse) - onehot rounded away to 1.6% (the coefficient rounded to fp32
    # near 1). It is kept apart from the cross-entropy's p - onehot on every path.
    hidden, weight = torch.tensor([[0.0015]]), torch.tensor([[-0.2934]])
    upstream = torch.tensor([0.7]) if reduction == "none" else None
    ours_fn = functools.partial(cl.linear_cross_entropy, grad_in_forward=grad_in_forward)
    check_against_oracle(
        hidden, weight, None, torch.tensor([0]), torch.float32, upstream, ours_fn=ours_fn,
        z_loss=1e-3, reduction=reduction,
    )  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {"reduction": "none"},
        {"shift": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 2.5},
    ],
    ids=["plain", "shift,smoothing,z_loss,softcap"],
)
@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_position_temperature_matches_oracle(cpu_gemm, dtype, grad_in_forward, options):
    # temperature[..., t] divides the logits of hidden[..., t, :] (with shift, those predicting
    # labels[..., t + 1]), whichever rows are ignored, over several shards and row chunks.
    hidden, weight, bias, labels = make_inputs((3, 29), 301, 48, dtype, 0.3, bias=True)
    upstream = None
    if options.get("reduction") == "none":
        upstream = torch.rand(labels.shape, generator=seeded(1))
        # True needs a scalar loss: None, which takes the recomputing path for "none".
        grad_in_forward = None if grad_in_forward else False
    ours = functools.partial(cl.linear_cross_entropy, grad_in_forward=grad_in_forward)
    temperature = per_position_temperature(labels.shape)
    check_against_oracle(
        hidden, weight, bias, labels, dtype, upstream, ours, shards=5, chunk_size=16,
        temperature=temperature, **options,
    )  # fmt: skip
    # The head's loss, and a constant tensor for the float.
    head = cl.ChunkedLMHead(
        weight.detach(), bias.detach(), shards=5, softcap=options.get("softcap")
    )
    loss_options = {k: v for k, v in options.items() if k != "softcap"}
    with torch.no_grad():
        head_loss = head.loss(
            hidden, labels, temperature=temperature, chunk_size=16, **loss_options
        )
        direct = cl.linear_cross_entropy(
            hidden, weight, labels, bias=bias, shards=5, chunk_size=16, temperature=temperature,
            **options,
        )  # fmt: skip
        torch.testing.assert_close(head_loss, direct, rtol=0, atol=0)
        constant, scalar = (
            cl.linear_cross_entropy(
                hidden, weight, labels, bias=bias, shards=5, temperature=t, **options
            )
            for t in (torch.full(labels.shape, 0.8), 0.8)
        )
        torch.testing.assert_close(constant, scalar, rtol=1e-6, atol=1e-7)
