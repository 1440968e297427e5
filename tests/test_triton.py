"""The fused Triton kernels (chunklogits/_triton.py) against fp64 ground truth and the naive
materialising computation (reference.py), with the accuracy rule of tests/helpers.py.

On a CUDA machine the kernels run compiled; without one they run in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET=1``, which must be set before the kernels are decorated, i.e. before
``chunklogits._triton`` is imported: nothing else imports it on CPU). Shapes are small and odd
(V=507, D=123, N=67) so that every tile dimension is ragged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton not installed (extra 'gpu')")

import chunklogits as cl  # noqa: E402
from chunklogits import _blocks, _triton, reference  # noqa: E402
from chunklogits._blocks import LogitTransform, plan_blocks, row_stats  # noqa: E402
from tests.helpers import DTYPES, assert_as_accurate, check_infinite_bias_mask, seeded  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and _triton._TRITON_VERSION < (3, 9):
    pytest.skip(
        f"Triton {triton.__version__}'s interpreter cannot bound loops by per-program integer "
        "arithmetic; the CPU tests need triton >= 3.9 (the test extra's)",
        allow_module_level=True,
    )
if not CUDA and type(_triton._stats_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError(
        "chunklogits._triton was imported before TRITON_INTERPRET=1 was set, so its kernels "
        "cannot run on CPU; import it only through this test module"
    )
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")

N, V, D = 67, 507, 123
# The kernels' raw statistics (forward_stats), and row_stats' differentiable ones.
STATS = ("lse", "target", "mean", "entropy")
GRAD_STATS = ("lse", "logprob", "mean", "entropy")


@pytest.fixture
def kernels(monkeypatch):
    """Route the block engine through the Triton kernels whatever the device (on CPU they run in
    the interpreter)."""
    kernels = (_triton.forward_stats, _triton.backward_blocks)
    monkeypatch.setattr(_blocks, "_block_functions", lambda hidden2d, transform=None: kernels)
    previous = _triton.set_gradient_filter(None)
    yield
    _triton.set_gradient_filter(previous)


def make_head(dtype, *, bias=False, peaked=0.0, seed=0):
    """hidden ``[N, D]``, weight ``[V, D]`` (bias ``[V]``) in ``dtype`` on DEVICE. ``peaked``
    adds that much to the logits of the first 8 vocabulary entries (through the bias), as a
    trained model's softmax concentrates on few tokens."""
    g = seeded(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5
    b = torch.randn(V, generator=g) * 0.5 if bias or peaked else None
    if peaked:
        b[:8] += peaked
    return [t.to(DEVICE, dtype) if t is not None else None for t in (hidden, weight, b)]


def naive_stats(hidden, weight, bias, index, targets, transform):
    """The statistics from the materialised logits (fp64 for fp64 inputs, else fp32), by name
    (``STATS`` and ``GRAD_STATS``)."""
    rows = hidden if index is None else hidden[index]
    z = reference.logits(
        rows, weight, bias=bias, softcap=transform.softcap, logit_scale=transform.logit_scale,
        temperature=transform.temperature,
    )  # fmt: skip
    pick = (lambda t: t.gather(1, targets[:, None]).squeeze(1)) if targets is not None else None
    return {
        "lse": z.logsumexp(1),
        "target": None if pick is None else pick(z),
        "logprob": None if pick is None else pick(z.log_softmax(1)),
        "mean": z.mean(1),
        "entropy": -(z.softmax(1) * z.log_softmax(1)).sum(1),
    }


TRANSFORMS = {
    "plain": LogitTransform(),
    "scale-softcap-temperature": LogitTransform(logit_scale=0.7, softcap=3.0, temperature=1.3),
    "negative-scale": LogitTransform(logit_scale=-1.5, temperature=0.8),
}


def _index_and_targets(with_index: bool):
    g = seeded(3)
    index = torch.randperm(N, generator=g)[: N - 19].sort().values if with_index else None
    rows = N if index is None else index.numel()
    targets = torch.randint(0, V, (rows,), generator=g)
    return (None if index is None else index.to(DEVICE)), targets.to(DEVICE)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_stats(dtype, transform):
    """lse, target, mean logit and entropy of one fused pass, rows selected by an index."""
    transform = TRANSFORMS[transform]
    hidden, weight, bias = make_head(dtype, bias=True)
    index, targets = _index_and_targets(with_index=True)
    plan = plan_blocks(targets.numel(), V, dtype, DEVICE)
    ours = _triton.forward_stats(hidden, weight, bias, index, targets, transform, plan, True, True)
    naive = naive_stats(hidden, weight, bias, index, targets, transform)
    exact = naive_stats(hidden.double(), weight.double(), bias.double(), index, targets, transform)
    assert ours.top is None  # the running top-k is a statistic of the PyTorch loop only
    for name in STATS:
        o, n, e = getattr(ours, name), naive[name], exact[name]
        assert o.dtype == torch.float32 and o.shape == e.shape, name
        assert_as_accurate(o, n, e, dtype, f"{name} {transform}")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _stats_and_grads(stats_fn, hidden, weight, bias, upstream):
    """Statistics and the gradients of ``sum_k upstream[k] . stats[k]`` w.r.t. the leaves."""
    leaves = _leaves(hidden, weight, bias)
    stats = stats_fn(*leaves)
    loss = sum((u * s.to(u.dtype)).sum() for u, s in zip(upstream, stats, strict=True))
    loss.backward()
    return [s.detach() for s in stats], [t.grad for t in leaves if t is not None]


BACKWARD_CASES = {
    # every statistic, ignored rows, bias, softcap: one shard, one chunk
    "all-stats-index-softcap": dict(
        want=GRAD_STATS, with_index=True, bias=True, shards=1, chunk_size=None,
        transform=LogitTransform(logit_scale=0.7, softcap=3.0),
    ),
    # several row chunks and vocabulary shards: the compensated sums over blocks
    "lse-logprob-many-blocks": dict(
        want=("lse", "logprob"), with_index=False, bias=False, shards=12, chunk_size=34,
        transform=LogitTransform(temperature=1.3),
    ),
    # entropy without target, negative scale, shards and index
    "lse-entropy-negative-scale": dict(
        want=("lse", "entropy"), with_index=True, bias=True, shards=13, chunk_size=None,
        transform=LogitTransform(logit_scale=-1.5),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BACKWARD_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_stats_gradients(kernels, dtype, case):
    """Gradients of any combination of the statistics, through row_stats' autograd.Function."""
    case = BACKWARD_CASES[case]
    want, transform = case["want"], case["transform"]
    hidden, weight, bias = make_head(dtype, bias=case["bias"])
    index, targets = _index_and_targets(case["with_index"])
    targets = targets if "logprob" in want else None
    rows = N if index is None else index.numel()
    g = seeded(5)
    upstream = [torch.randn(rows, generator=g).to(DEVICE) for _ in want]
    plan = plan_blocks(rows, V, dtype, DEVICE, shards=case["shards"], chunk_size=case["chunk_size"])

    def ours(h, w, b):
        stats = row_stats(
            h, w, b, index=index, targets=targets, transform=transform, plan=plan,
            want_mean="mean" in want, want_entropy="entropy" in want,
        )  # fmt: skip
        return [getattr(stats, name) for name in want]

    def naive(h, w, b):
        stats = naive_stats(h, w, b, index, targets, transform)
        return [stats[name] for name in want]

    to64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    results = [
        _stats_and_grads(ours, hidden, weight, bias, upstream),
        _stats_and_grads(naive, hidden, weight, bias, upstream),
        _stats_and_grads(naive, *to64, upstream),
    ]
    names = [*want, "grad hidden", "grad weight", "grad bias"]
    for name, o, n, e in zip(names, *(stats + grads for stats, grads in results), strict=False):
        assert o.shape == e.shape, name
        assert_as_accurate(o, n, e, dtype, name)


def _public_op_results(fn, hidden, weight, bias, upstream, *args, **kw):
    leaves = _leaves(hidden, weight, bias)
    out = fn(leaves[0], leaves[1], *args, bias=leaves[2], **kw)
    outs = out if isinstance(out, tuple) else (out,)
    sum((u * o).sum() for u, o in zip(upstream, outs, strict=True)).backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def _check_public_op(name, dtype, hidden, weight, bias, upstream, *args, **kw):
    fn, naive_fn = getattr(cl, name), getattr(reference, name)
    to64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    ours = _public_op_results(fn, hidden, weight, bias, upstream, *args, **kw)
    naive = _public_op_results(naive_fn, hidden, weight, bias, upstream, *args, **kw)
    exact = _public_op_results(naive_fn, *to64, upstream, *args, **kw)
    for i, (o, n, e) in enumerate(zip(ours, naive, exact, strict=True)):
        assert o.shape == e.shape, (name, i)
        assert_as_accurate(o, n, e, dtype, f"{name} output {i} {kw}")


def test_linear_cross_entropy(kernels):
    """The loss with ignored labels, label smoothing, z-loss, softcap and bias, in bf16. The
    gradient filter is switched on: a loss with label smoothing has a uniform gradient term over
    the vocabulary, so the filter must stand aside and the result stay exact."""
    _triton.set_gradient_filter("auto")
    hidden, weight, bias = make_head(torch.bfloat16, bias=True)
    labels = torch.randint(0, V, (N,), generator=seeded(7))
    labels[::4] = -100
    upstream = [torch.ones((), device=DEVICE)]
    _check_public_op(
        "linear_cross_entropy", torch.bfloat16, hidden, weight, bias, upstream, labels.to(DEVICE),
        label_smoothing=0.1, z_loss=1e-3, softcap=4.0, shards=5,
    )  # fmt: skip


def test_all_labels_ignored(kernels):
    """No row left: a zero loss and zero gradients, as the naive computation gives."""
    hidden, weight, bias = make_head(torch.float32, bias=True)
    labels = torch.full((N,), -100, device=DEVICE)
    upstream = [torch.ones((), device=DEVICE)]
    _check_public_op(
        "linear_cross_entropy",
        torch.float32,
        hidden,
        weight,
        bias,
        upstream,
        labels,
        reduction="sum",
    )


def test_token_logprobs_with_entropy(kernels):
    """Log-probs and entropy at a temperature, with a logit scale, in fp16."""
    hidden, weight, _ = make_head(torch.float16)
    tokens = torch.randint(0, V, (N,), generator=seeded(8)).to(DEVICE)
    g = seeded(9)
    upstream = [torch.randn(N, generator=g).to(DEVICE) for _ in range(2)]
    _check_public_op(
        "token_logprobs", torch.float16, hidden, weight, None, upstream, tokens,
        temperature=0.7, logit_scale=1.3, return_entropy=True,
    )  # fmt: skip


def test_vocabulary_sorting_is_exact(kernels):
    """With the filter on but a threshold no probability falls below, only the vocabulary
    ordering is in play: it must not change the gradients beyond rounding."""
    _triton.set_gradient_filter(1e-30)
    hidden, weight, bias = make_head(torch.float32, bias=True)
    labels = torch.randint(0, V, (N,), generator=seeded(7)).to(DEVICE)
    upstream = [torch.ones((), device=DEVICE)]
    _check_public_op(
        "linear_cross_entropy", torch.float32, hidden, weight, bias, upstream, labels, shards=3
    )


def test_gradient_filter_drops_exactly_the_skipped_tiles(kernels):
    """The opt-in filter (Cut Cross-Entropy's): in each (chunk, shard) block, with the vocabulary
    in the order of ``_vocab_order``, a tile of ``tile x tile`` gradient entries is dropped from
    the hidden and weight gradients iff all its probabilities are below eps and it holds no
    target; the bias gradient stays exact. Oracle: the same rule applied to fp64 gradients."""
    eps = 2.0**-12
    _triton.set_gradient_filter(eps)
    hidden, weight, bias = make_head(torch.float32, peaked=10.0)
    targets = torch.randint(0, 8, (N,), generator=seeded(10)).to(DEVICE)  # the probable tokens
    transform = LogitTransform()
    plan = plan_blocks(N, V, torch.float32, DEVICE, shards=2)
    order = _triton._vocab_order(hidden, weight, bias, None, transform)
    mean_logit = (hidden.double().mean(0) @ weight.double().T + bias.double())[order]
    assert torch.all(mean_logit[:-1] >= mean_logit[1:] - 1e-4), "not sorted by mean logit"

    # fp64 gradient of sum(lse - target) w.r.t. the logits, and the tiles the filter keeps.
    z = hidden.double() @ weight.double().T + bias.double()
    p = z.softmax(1)
    onehot = torch.nn.functional.one_hot(targets, V).double()
    grad_z = p - onehot
    tile = _triton._config(hidden).tile
    keep = torch.zeros(N, V, dtype=torch.bool, device=DEVICE)
    for v0, v1 in _triton._shard_groups(plan, 4):
        for r0, r1 in plan.chunks:
            for t0 in range(r0, r1, tile):
                for c0 in range(v0, v1, tile):
                    rows, cols = slice(t0, min(t0 + tile, r1)), order[c0 : min(c0 + tile, v1)]
                    block = (slice(None), cols)
                    kept = (p[rows][block] >= eps).any() or onehot[rows][block].any()
                    keep[rows, cols] = bool(kept)
    fraction = keep.double().mean().item()
    assert 0 < fraction < 0.5, f"the test should skip most tiles and keep some, kept {fraction}"
    filtered = grad_z * keep
    expected = [filtered @ weight.double(), filtered.T @ hidden.double(), grad_z.sum(0)]

    leaves = _leaves(hidden, weight, bias)
    stats = row_stats(*leaves, targets=targets, transform=transform, plan=plan)
    (-stats.logprob).sum().backward()
    for name, leaf, e in zip(("hidden", "weight", "bias"), leaves, expected, strict=True):
        # No naive counterpart: the allowance is the fp32 slack of the accuracy rule alone.
        assert_as_accurate(leaf.grad, e, e, torch.float32, f"filtered grad {name}")


@pytest.mark.parametrize("grad_filter", [None, 2.0**-12], ids=["exact", "filtered"])
def test_every_gradient_element_is_written(kernels, monkeypatch, grad_filter):
    """Buffers and outputs are allocated uninitialised: poisoned with NaN (and 7 for integer
    flags), the gradients must come out identical, over several shards and row chunks, with
    ignored rows, exact and filtered."""
    hidden, weight, bias = make_head(torch.bfloat16, bias=True, peaked=10.0)
    index, _ = _index_and_targets(with_index=True)
    targets = torch.randint(0, 8, (index.numel(),), generator=seeded(12)).to(DEVICE)
    plan = plan_blocks(index.numel(), V, torch.bfloat16, DEVICE, shards=12, chunk_size=30)
    _triton.set_gradient_filter(grad_filter)

    def gradients():
        leaves = _leaves(hidden, weight, bias)
        stats = row_stats(*leaves, index=index, targets=targets, plan=plan)
        (-stats.logprob).sum().backward()
        return [leaf.grad for leaf in leaves]

    clean = gradients()
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 7)

    monkeypatch.setattr(torch, "empty", poisoned)
    for name, dirty, expected in zip(("hidden", "weight", "bias"), gradients(), clean, strict=True):
        assert torch.equal(dirty, expected), f"grad {name} depends on uninitialised memory"


def test_set_gradient_filter_checks_eps():
    with pytest.raises(
        ValueError, match=r"eps: expected None, 'auto' or a float in \(0, 1\), got 2"
    ):
        _triton.set_gradient_filter(2)
    with pytest.raises(ValueError, match=r"eps: .* got 'on'"):
        _triton.set_gradient_filter("on")
    assert _triton.set_gradient_filter(None) is None


def test_shard_groups_merge_plan_shards_to_the_same_memory():
    """A half-precision G block costs 2 bytes per entry instead of the PyTorch loop's 12: six
    plan shards make one kernel block; fp32 (4 bytes): three."""
    plan = plan_blocks(N, V, torch.float32, torch.device("cpu"), shards=13)
    half, single = _triton._shard_groups(plan, 2), _triton._shard_groups(plan, 4)
    bounds = plan.shard_bounds
    assert half == [(bounds[0], bounds[6]), (bounds[6], bounds[12]), (bounds[12], bounds[13])]
    assert single == [(bounds[i], bounds[min(i + 3, 13)]) for i in range(0, 13, 3)]


def test_serves_only_cuda_tensors_of_dot_dtypes():
    cpu = torch.zeros(2, 3)
    assert not _triton.serves(cpu)
    assert _blocks._block_functions(cpu) == (_blocks._forward_stats, _blocks._backward_blocks)
    if CUDA:
        assert _triton.serves(cpu.cuda()) and not _triton.serves(cpu.cuda().double())
        previous = _triton.enable(False)
        assert not _triton.serves(cpu.cuda())
        _triton.enable(previous)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dispatch_runs_the_kernels_by_default(dtype):
    """Without any setting, CUDA tensors go through the Triton kernels, and the public loss
    matches the oracle."""
    hidden, weight, bias = make_head(dtype, bias=True)
    assert _blocks._block_functions(hidden) == (_triton.forward_stats, _triton.backward_blocks)
    labels = torch.randint(0, V, (N,), generator=seeded(11)).to(DEVICE)
    upstream = [torch.ones((), device=DEVICE)]
    _check_public_op("linear_cross_entropy", dtype, hidden, weight, bias, upstream, labels)


@pytest.mark.skipif(CUDA, reason="on a GPU the kernels are compiled and run by the tests above")
@pytest.mark.skipif(
    not hasattr(triton.runtime.jit, "create_function_from_signature"),
    reason=f"tests/triton_compile.py follows the launcher of triton 3.9, not {triton.__version__}",
)
def test_kernels_compile_for_h100():
    """Without a GPU: every kernel variant the ops launch compiles for sm_90 (tests/
    triton_compile.py, ptxas included), its loads software-pipelined, its dots on wgmma, within
    99 KiB of shared memory (the per-block limit of sm_86/sm_89 GPUs; H100 allows 227 KiB)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "tests.triton_compile", "90"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    variants = [json.loads(line) for line in result.stdout.splitlines()]
    kernels = {"_stats_kernel", "_grad_logits_kernel", "_matmul_kernel"}
    assert {v["kernel"] for v in variants} == kernels
    assert any("FILTER" in v["switches"] for v in variants if v["kernel"] == "_matmul_kernel")
    for variant in variants:
        assert variant["pipelined"] and variant["wgmma"], variant
        assert variant["shared_bytes"] <= 99 * 1024, variant


@pytest.mark.parametrize("masked", ["scattered", 300], ids=["scattered", "leading"])
def test_masked_by_an_infinite_bias(kernels, masked):
    check_infinite_bias_mask(masked, DEVICE)
