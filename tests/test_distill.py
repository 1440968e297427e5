"""linear_jsd against TRL's own GKD loss (``GKDTrainer.generalized_jsd_loss``) on the full logits,
the naive oracle (reference.py) and fp64 truth, on one process and vocab-parallel over gloo.
GKDTrainer itself through ``use_chunklogits``: tests/test_trl.py."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import chunklogits as cl
from chunklogits import reference
from tests.helpers import (
    assert_as_accurate,
    one_thread,
    per_position_temperature,
    run_ranks,
    seeded,
)

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

_VOCAB, _STUDENT_DIM, _TEACHER_DIM = 507, 123, 61
_LEAF_NAMES = (
    "student hidden",
    "student weight",
    "student bias",
    "teacher hidden",
    "teacher weight",
    "teacher bias",
)


def make_pair(shape, dtype, *, ignored=0.3, bias=True, teacher_grad=True, vocab=_VOCAB, seed=0):
    """Student and teacher heads over the same vocabulary (hidden sizes 123 and 61) with some
    weight rows equal to scaled hidden rows (peaked softmaxes, as in test_loss), and labels with
    a fraction ``ignored`` of -100. Returns ``(leaves, labels)``: leaves are student hidden,
    weight, bias, teacher hidden, weight, bias (biases None without ``bias``)."""
    g = seeded(seed)
    leaves = []
    for dim in (_STUDENT_DIM, _TEACHER_DIM):
        hidden = torch.randn(*shape, dim, generator=g) / dim**0.5
        weight = torch.randn(vocab, dim, generator=g)
        shared = min(hidden[..., 0].numel(), vocab) // 3
        weight[:shared] = hidden.reshape(-1, dim)[:shared] * 4
        b = torch.randn(vocab, generator=g) * 0.5 if bias else None
        leaves += [hidden, weight, b]
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: round(ignored * flat.numel())]] = -100
    for i, t in enumerate(leaves):
        if t is not None:
            leaves[i] = t.to(dtype).requires_grad_(teacher_grad or i < 3)
    return leaves, labels


def trl_jsd(sh, sw, sb, th, tw, tb, labels, *, shift=False, reduction="batchmean", **kw):
    """``GKDTrainer.generalized_jsd_loss`` on the materialised logits (upcast to fp32, or fp64
    for fp64 inputs), shifted as ``GKDTrainer.compute_loss`` does; ``reduction="none"``: its
    result summed over the vocabulary, at every position, 0 at ignored ones (the layout of
    ``linear_jsd``)."""
    student, teacher = F.linear(sh, sw, sb), F.linear(th, tw, tb)
    upcast = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(upcast), teacher.to(upcast)
    if shift:
        student, teacher = student[..., :-1, :], teacher[..., :-1, :]
        labels = None if labels is None else labels[..., 1:]
    # Imported here, not by the module: the vocab-parallel ranks import this module too.
    gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    loss = gkd_trainer.GKDTrainer.generalized_jsd_loss(
        student, teacher, labels, reduction=reduction, **kw
    )
    if reduction != "none":
        return loss
    if labels is None:
        return loss.sum(-1)
    kept = labels != -100
    return loss.new_zeros(kept.shape).masked_scatter(kept, loss.sum(-1))


def run(fn, leaves, labels, upstream=None, **kw):
    """``fn``'s result and the gradients of the leaves that require grad, at copies of them."""
    copies = [
        None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in leaves
    ]
    loss = fn(*copies, labels, **kw)
    target = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    target.backward()
    return [loss.detach()] + [t.grad for t in copies if t is not None and t.requires_grad]


def _ours(sh, sw, sb, th, tw, tb, labels, **kw):
    return cl.linear_jsd(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, **kw)


def _reference(sh, sw, sb, th, tw, tb, labels, **kw):
    return reference.linear_jsd(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, **kw)


def check_against_trl(leaves, labels, dtype, upstream=None, *, blocking=None, **kw):
    """Ours (with ``blocking``: shards / chunk_size) at least as accurate as TRL's function on the
    same-dtype logits, against TRL's function on fp64 logits: the loss and every gradient."""
    to64 = [None if t is None else t.double().requires_grad_(t.requires_grad) for t in leaves]
    exact = run(trl_jsd, to64, labels, upstream, **kw)
    naive = run(trl_jsd, leaves, labels, upstream, **kw)
    ours = run(_ours, leaves, labels, upstream, **kw, **(blocking or {}))
    names = ["loss"] + [
        f"{name} grad"
        for name, t in zip(_LEAF_NAMES, leaves, strict=True)
        if t is not None and t.requires_grad
    ]
    assert len(ours) == len(exact) == len(names)
    for name, o, n, e in zip(names, ours, naive, exact, strict=True):
        assert o.shape == e.shape, f"{name}: shape {tuple(o.shape)} != {tuple(e.shape)}"
        assert o.dtype == (torch.promote_types(dtype, torch.float32) if name == "loss" else dtype)
        assert_as_accurate(o, n, e, dtype, f"{name} {kw} {blocking}")
    return ours, exact


BETAS = (0.0, 0.5, 1.0, 0.2)
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _upstream(labels, reduction, shift=False):
    """Random weights of the per-position results for ``reduction="none"``."""
    if reduction != "none":
        return None
    shape = (*labels.shape[:-1], labels.shape[-1] - 1) if shift else labels.shape
    return torch.rand(shape, generator=seeded(1))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", BETAS)
def test_fp32_matches_trl(beta, reduction):
    leaves, labels = make_pair((3, 11), torch.float32)
    check_against_trl(
        leaves,
        labels,
        torch.float32,
        _upstream(labels, reduction),
        beta=beta,
        reduction=reduction,
        blocking=dict(shards=3, chunk_size=8),
    )


@pytest.mark.parametrize("reduction", ("batchmean", "none"))
@pytest.mark.parametrize("beta", BETAS)
def test_bf16_matches_trl(cpu_gemm, beta, reduction):
    leaves, labels = make_pair((2, 9), torch.bfloat16)
    check_against_trl(
        leaves,
        labels,
        torch.bfloat16,
        _upstream(labels, reduction),
        beta=beta,
        reduction=reduction,
        blocking=dict(shards=4),
    )


# Options beyond beta and reduction: (make_pair's arguments, linear_jsd's and TRL's, blocking).
OPTION_CASES = {
    "temperature-shift": (dict(), dict(beta=0.5, temperature=2.0, shift=True), dict(shards=5)),
    # At temperature 0.05 most student log-probs lie far below log(tiny) where the teacher's
    # probabilities do not: the divergence must use them unfloored.
    "low-temperature-forward-kl": (dict(), dict(beta=0.0, temperature=0.05), dict(shards=2)),
    "low-temperature-reverse-kl": (dict(), dict(beta=1.0, temperature=0.05), dict(shards=2)),
    # There the fp32 rounding of the log-sum-exps alone (4e-6 near 100) would shift each row's
    # log-probabilities by more than the naive log_softmax errs: see distill._row_terms.
    "low-temperature-jsd": (dict(), dict(beta=0.5, temperature=0.05), dict(shards=2)),
    "no-labels-batchmean": (dict(labels=False), dict(beta=0.5), dict(shards=7, chunk_size=5)),
    "no-labels-shift-mean": (
        dict(labels=False),
        dict(beta=1.0, shift=True, reduction="mean"),
        dict(shards=3),
    ),
    "no-labels-shift-none": (
        dict(labels=False),
        dict(beta=0.3, shift=True, reduction="none"),
        dict(),
    ),
    "num-items-in-batch": (dict(), dict(beta=0.3, shift=True, num_items_in_batch=7), dict()),
    "one-shard-one-row-chunks": (dict(), dict(beta=0.5), dict(shards=1, chunk_size=1)),
    "a-shard-per-token": (dict(), dict(beta=0.0), dict(shards=_VOCAB, chunk_size=40)),
    "no-bias-3d": (dict(bias=False, shape=(2, 3, 5)), dict(beta=0.7, shift=True), dict()),
    "frozen-teacher": (dict(teacher_grad=False), dict(beta=0.5, reduction="sum"), dict()),
    "frozen-teacher-forward-kl": (dict(teacher_grad=False), dict(beta=0.0), dict(shards=3)),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_options_match_trl(case):
    inputs, options, blocking = OPTION_CASES[case]
    inputs = dict(inputs)
    with_labels = inputs.pop("labels", True)
    leaves, labels = make_pair(inputs.pop("shape", (3, 11)), torch.float32, **inputs)
    labels = labels if with_labels else None
    upstream = None
    if options.get("reduction") == "none":
        upstream = torch.rand(3, 10, generator=seeded(1))
    ours, _ = check_against_trl(
        leaves, labels, torch.float32, upstream, blocking=blocking, **options
    )
    if not inputs.get("teacher_grad", True):
        assert len(ours) == 4  # the loss and the student's three gradients only


def test_reference_is_trls_function():
    """reference.linear_jsd, the oracle of the vocab-parallel tests, is TRL's loss."""
    leaves, labels = make_pair((3, 11), torch.float32)
    for beta in BETAS:
        for reduction in REDUCTIONS:
            for shift in (False, True):
                kw = dict(beta=beta, reduction=reduction, shift=shift, temperature=0.7)
                ours = _reference(*leaves, labels, **kw)
                theirs = trl_jsd(*leaves, labels, **kw)
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=str(kw))


# Tokens masked by a -inf bias: (student's, teacher's, beta). The divergence takes 0 log 0 = 0: a
# finite value where TRL's F.kl_div gives NaN (or -inf), and finite gradients.
MASKED_CASES = {
    "student-jsd": ([4], [], 0.5),
    "student-reverse-kl": ([4, 100], [], 1.0),
    "teacher-forward-kl": ([], [9], 0.0),
    "teacher-jsd": ([], [9, 300], 0.2),
    "both-jsd": ([4], [4], 0.3),
    "both-forward-kl": ([4, 7], [4, 7], 0.0),
    "both-reverse-kl": ([4], [4], 1.0),
}


@pytest.mark.parametrize("case", MASKED_CASES)
def test_infinite_logits_mask_tokens(case):
    student_masked, teacher_masked, beta = MASKED_CASES[case]
    leaves, labels = make_pair((3, 11), torch.float32)
    with torch.no_grad():
        leaves[2][student_masked] = -torch.inf
        leaves[5][teacher_masked] = -torch.inf
    upstream, kw = _upstream(labels, "none"), dict(beta=beta, reduction="none")
    to64 = [t.double().requires_grad_() for t in leaves]
    exact = run(_reference, to64, labels, upstream, **kw)
    naive = run(_reference, leaves, labels, upstream, **kw)
    ours = run(_ours, leaves, labels, upstream, shards=3, chunk_size=8, **kw)
    for name, o, n, e in zip(("loss", *_LEAF_NAMES), ours, naive, exact, strict=True):
        assert o.isfinite().all() and e.isfinite().all(), f"{case}: {name}"
        assert_as_accurate(o, n, e, torch.float32, f"{case}: {name}")
    assert (ours[0] >= 0).all()
    if student_masked == teacher_masked:  # the tokens drop out: TRL's loss over the others
        kept = [v for v in range(_VOCAB) if v not in student_masked]
        rest = [t.detach() if i in (0, 3) else t.detach()[kept] for i, t in enumerate(leaves)]
        torch.testing.assert_close(ours[0], trl_jsd(*rest, labels, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", (1e-12, 1e-6, 1 - 1e-6, 1 - 1e-12))
@pytest.mark.parametrize("temperature", (1.0, 0.3))
def test_small_beta_or_one_minus_beta(temperature, beta):
    # A divergence of order beta (or 1 - beta): at least as accurate as TRL's own fp32 loss
    # against the fp64 truth (the reference's cancellation-free log-ratios: TRL's formula in fp64
    # errs by 1e-16 absolute, 1e-4 of the value at beta = 1e-12). The exp / log round trip of
    # the probabilities erred by 3e-8 at temperature 0.3 and beta 1e-12, against 1.5e-11.
    leaves, labels = make_pair((3, 11), torch.float32)
    upstream = _upstream(labels, "none")
    kw = dict(beta=beta, reduction="none", temperature=temperature)
    to64 = [t.double().requires_grad_() for t in leaves]
    exact = run(_reference, to64, labels, upstream, **kw)
    naive = run(trl_jsd, leaves, labels, upstream, **kw)
    ours = run(_ours, leaves, labels, upstream, shards=3, chunk_size=8, **kw)
    for name, o, n, e in zip(("loss", *_LEAF_NAMES), ours, naive, exact, strict=True):
        assert_as_accurate(o, n, e, torch.float32, f"beta={beta}: {name}")


def test_every_position_ignored():
    """TRL's batchmean divides by at least 1: 0 and zero gradients; mean is 0 / 0."""
    leaves, labels = make_pair((2, 5), torch.float32, ignored=1.0)
    for reduction in ("batchmean", "sum"):
        ours = run(_ours, leaves, labels, reduction=reduction)
        theirs = run(trl_jsd, leaves, labels, reduction=reduction)
        for o, t in zip(ours, theirs, strict=True):
            assert torch.equal(o, t) and not o.any()
    assert _ours(*leaves, labels, reduction="mean").isnan()
    assert trl_jsd(*leaves, labels, reduction="mean").isnan()


def test_results_do_not_depend_on_blocking():
    leaves, labels = make_pair((4, 13), torch.float32, seed=2)
    results = [
        run(_ours, leaves, labels, beta=0.4, shards=shards, chunk_size=chunk)
        for shards, chunk in ((1, None), (6, 7), (_VOCAB, None), (3, 1), (None, None))
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


BAD_INPUTS = {
    "teacher_hidden: expected student_hidden's positions (3, 11) (shape[:-1]), got (3, 10)": (
        lambda a: {"teacher_hidden": a["teacher_hidden"][:, :-1]}
    ),
    "teacher_hidden: expected student_hidden's dtype torch.float32, got torch.float64": (
        lambda a: {
            "teacher_hidden": a["teacher_hidden"].double(),
            "teacher_weight": a["teacher_weight"].double(),
        }
    ),
    "teacher_weight: expected the student's vocabulary size V = 507": (
        lambda a: {"teacher_weight": a["teacher_weight"][:-1]}
    ),
    "student_weight: expected [V, D] with D = hidden.shape[-1] = 123, got (507, 122)": (
        lambda a: {"student_weight": a["student_weight"][:, :-1]}
    ),
    "teacher_bias: expected shape [V] = [507], got (3,)": lambda a: {
        "teacher_bias": torch.zeros(3)
    },
    "labels: expected shape (3, 11)": lambda a: {"labels": a["labels"][:, 1:]},
    "labels: expected an integer tensor": lambda a: {"labels": a["labels"].float()},
    "beta: expected a float in [0.0, 1.0], got 1.5": lambda a: {"beta": 1.5},
    "temperature: expected a finite float > 0, got 0.0": lambda a: {"temperature": 0.0},
    "reduction: expected one of": lambda a: {"reduction": "elementwise"},
    "ignore_index: expected an int, got True": lambda a: {"ignore_index": True},
    "num_items_in_batch: divides the summed divergence": (
        lambda a: {"reduction": "none", "num_items_in_batch": 4}
    ),
    "student_hidden: shift=True needs shape [..., T, D], got (123,)": (
        lambda a: {
            "shift": True,
            "student_hidden": a["student_hidden"][0, 0],
            "teacher_hidden": a["teacher_hidden"][0, 0],
            "labels": a["labels"][0, 0],
        }
    ),
    "shards: expected an int in [1, 507], got 0": lambda a: {"shards": 0},
}


@pytest.mark.parametrize("message", BAD_INPUTS)
def test_bad_input_names_the_argument(message):
    leaves, labels = make_pair((3, 11), torch.float32, bias=False)
    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
    args = dict(zip(names, (t for t in leaves if t is not None), strict=True), labels=labels)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        cl.linear_jsd(**{**args, **BAD_INPUTS[message](args)})


# --- vocab-parallel: every rank holds the same slice of both heads ------------------------------

# (dtype, world -> slice sizes, linear_jsd's options); the losses and gradients of every rank
# against TRL's loss on the whole heads in one process.
PARALLEL_CASES = {
    "jsd-shift-batchmean": (torch.float32, "even", dict(beta=0.5, shift=True, temperature=0.8)),
    "forward-kl-none": (torch.float32, "uneven", dict(beta=0.0, reduction="none", shards=3)),
    "reverse-kl-sum-bf16": (torch.bfloat16, "uneven", dict(beta=1.0, reduction="sum")),
}
_UNEVEN = {2: (100, 407), 3: (300, 7, 200)}


def _slice_bounds(world: int, split: str) -> list[int]:
    sizes = (
        [len(c) for c in torch.arange(_VOCAB).chunk(world)] if split == "even" else _UNEVEN[world]
    )
    return [sum(sizes[:rank]) for rank in range(world + 1)]


def _parallel_worker(rank: int, world: int) -> dict:
    results = {}
    # A bad input on one rank (its teacher slice one row short) fails every rank, none hangs.
    leaves, labels = make_pair((2, 7), torch.float32)
    sh, sw, _, th, tw, _ = leaves
    short = tw[: -1 if rank == world - 1 else None]
    try:
        cl.linear_jsd(sh, sw, th, short, labels, process_group=dist.group.WORLD)
    except ValueError as error:  # the ranks that checked fine add the failed rank's number
        results["bad"] = str(error)
    for name, (dtype, split, options) in PARALLEL_CASES.items():
        leaves, labels = make_pair((3, 7), dtype)
        start, end = _slice_bounds(world, split)[rank : rank + 2]
        local = [
            t if i in (0, 3) else t.detach()[start:end].requires_grad_()
            for i, t in enumerate(leaves)
        ]
        upstream = _upstream(
            labels, options.get("reduction", "batchmean"), options.get("shift", False)
        )
        results[name] = run(
            _ours, local, labels, upstream, process_group=dist.group.WORLD, **options
        )
    return results


@pytest.mark.parametrize("world", (2, 3))
def test_vocab_parallel_matches_trl(world):
    ranks = run_ranks(_parallel_worker, world)
    for results in ranks:
        message = results.get("bad", "no error")
        assert message.startswith("teacher_weight: expected the student's vocabulary size V")
    for name, (dtype, split, options) in PARALLEL_CASES.items():
        leaves, labels = make_pair((3, 7), dtype)
        upstream = _upstream(
            labels, options.get("reduction", "batchmean"), options.get("shift", False)
        )
        trl_options = {k: v for k, v in options.items() if k != "shards"}
        to64 = [t.double().requires_grad_() for t in leaves]
        exact = run(trl_jsd, to64, labels, upstream, **trl_options)
        naive = run(trl_jsd, leaves, labels, upstream, **trl_options)
        bounds = _slice_bounds(world, split)
        for rank, results in enumerate(ranks):
            start, end = bounds[rank : rank + 2]
            # hidden gradients whole (all-reduced), weight and bias gradients of the rank's slice
            whole = (True, True, False, False, True, False, False)
            for i, (o, n, e) in enumerate(zip(results[name], naive, exact, strict=True)):
                n, e = (n, e) if whole[i] else (n[start:end], e[start:end])
                assert_as_accurate(o, n, e, dtype, f"{name}, result {i}, rank {rank} of {world}")


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.3])
@pytest.mark.parametrize("masked", [False, True], ids=["whole", "padded"])
def test_kl_of_near_equal_heads_is_as_accurate_as_naive(beta, masked):
    # A uniform student and a teacher 0.0015 away from it: the divergence is 1e-6, the size of
    # the rounding of each probability exp(log p~) (half an ulp of 0.33 is 1.5e-8 per token).
    # The log-sum residuals were once measured from those rounded masses (3e-8 off, against the
    # naive's 7e-10); they come from x~ - y~ = y~ * expm1(log x~ - log y~), and each log-ratio
    # from the difference of the centred logits. The teacher bias's gradient is x (d - KL).
    # For 0 < beta < 1 the log-ratios log(p / m) by softplus cancel from terms near log 2 to
    # -beta * d (3e-8 per token, the naive's rounding; 3e-8 against the naive's 2e-8 in the
    # divergence here): near d = 0 they are -log1p(beta * expm1(d)) (_log_ratios).
    weight = torch.tensor([[-1.0608166456222534], [0.999509334564209], [-0.884024977684021]])
    bias = torch.zeros(3)
    if masked:  # a padded vocabulary: 16 tokens masked in both heads
        weight = torch.cat([weight, torch.zeros(16, 1)])
        bias = torch.cat([bias, torch.full((16,), -torch.inf)])
    student = torch.zeros(1, 1)
    teacher = torch.tensor([[0.0015409961342811584]])

    def run(fn, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (teacher, bias)]
        out = fn(
            student.to(dtype), weight.to(dtype), leaves[0], weight.to(dtype),
            beta=beta, student_bias=bias.to(dtype), teacher_bias=leaves[1],
        )  # fmt: skip
        out.backward()
        return [out.detach(), *(t.grad for t in leaves)]

    ours = run(cl.linear_jsd, torch.float32)
    naive, exact = (
        run(reference.linear_jsd, torch.float32),
        run(reference.linear_jsd, torch.float64),
    )
    for name, o, n, e in zip(
        ["jsd", "grad teacher", "grad teacher bias"], ours, naive, exact, strict=True
    ):
        assert_as_accurate(o, n, e, torch.float32, name)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_position_temperature_matches_oracle(cpu_gemm, dtype, beta, shift):
    # temperature[..., t] divides both heads' logits at position t (with shift, those paired
    # with labels[..., t + 1]): the divergence per position and every gradient as accurate as
    # the naive computation's (TRL's function takes one float), over shards and row chunks.
    leaves, labels = make_pair((3, 11), dtype)
    temperature = per_position_temperature(labels.shape)
    options = dict(beta=beta, shift=shift, reduction="none", temperature=temperature)
    upstream = _upstream(labels, "none", shift)
    to64 = [None if t is None else t.double().requires_grad_(t.requires_grad) for t in leaves]
    exact = run(_reference, to64, labels, upstream, **options)
    naive = run(_reference, leaves, labels, upstream, **options)
    ours = run(_ours, leaves, labels, upstream, shards=3, chunk_size=8, **options)
    names = ["divergence"] + [f"{name} grad" for name in _LEAF_NAMES]
    for name, o, n, e in zip(names, ours, naive, exact, strict=True):
        assert_as_accurate(o, n, e, dtype, f"{name} beta={beta} shift={shift}")
    # A constant tensor is the float's case.
    with torch.no_grad():
        constant, scalar = (
            _ours(*leaves, labels, beta=beta, shift=shift, shards=3, temperature=t)
            for t in (torch.full(labels.shape, 0.6), 0.6)
        )
    torch.testing.assert_close(constant, scalar, rtol=1e-6, atol=1e-7)
