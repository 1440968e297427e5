"""Loss forward + backward: chunklogits against the materialising baselines, in one run.

    pytest bench/test_bench_loss.py --benchmark-only --benchmark-json=out/loss.json

Each case records ``peak_mib`` / ``working_mib`` (peak minus the returned gradients) and
``loss_error`` (|loss - fp64 loss|) in ``extra_info``. The peers, whose GEMMs run in the inputs'
bf16, are timed once on a CPU that does not multiply bf16 natively (minutes per run there:
``bench.common.measure_once``). Optional peers that are not installed are
skipped with the reason.

The floor (``test_gemm_floor``, same groups): the three GEMMs of ``2 * N * V * D`` flops that any
exact loss and its two gradients need (logits, ``dL/dhidden``, ``dL/dweight``), whole-matrix, in
the dtype chunklogits' blocks multiply in on this CPU (``block_compute_dtype``: fp32 for bf16
inputs on an AVX2-only CPU), inputs converted before the timing. Each case's ``x floor`` is its
time over the floor's in the same run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

import chunklogits as cl
from bench.common import HEAD_SHAPES, head_inputs, measure, measure_once, unavailable
from chunklogits._blocks import _cpu_multiplies_natively, block_compute_dtype

SHAPES = HEAD_SHAPES


def _cce_loss(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    return linear_cross_entropy(hidden, weight, labels, impl=impl)


def _liger_loss(hidden, weight, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, labels)


IMPLEMENTATIONS = {
    "naive-upcast": lambda h, w, y: F.cross_entropy((h @ w.T).float(), y),
    "naive-half": lambda h, w, y: F.cross_entropy(h @ w.T, y),
    "transformers-ForCausalLMLoss": lambda h, w, y: ForCausalLMLoss(
        h @ w.T, None, w.shape[0], shift_labels=y
    ),
    "torch-linear_cross_entropy": lambda h, w, y: F.linear_cross_entropy(h, w, y),
    "cut-cross-entropy": _cce_loss,
    "liger-fused-linear-ce": _liger_loss,
    "chunklogits": lambda h, w, y: cl.linear_cross_entropy(h, w, y),
    "chunklogits-grad_in_forward": lambda h, w, y: cl.linear_cross_entropy(
        h, w, y, grad_in_forward=True
    ),
    # The same with 8x the default block budget: row chunks of ~8x the rows, for CPUs whose
    # GEMMs are slow at few rows.
    "chunklogits-grad_in_forward-256MiB": lambda h, w, y: _with_setting(
        cl.set_block_budget, 256 * 2**20, cl.linear_cross_entropy, h, w, y, grad_in_forward=True
    ),
    # The per-block elementwise passes torch.compile'd (set_block_compile), forward and backward;
    # the compiles happen in the warm-up round.
    "chunklogits-compiled": lambda h, w, y: _with_setting(
        cl.set_block_compile, True, cl.linear_cross_entropy, h, w, y
    ),
    "chunklogits-grad_in_forward-compiled": lambda h, w, y: _with_setting(
        cl.set_block_compile, True, cl.linear_cross_entropy, h, w, y, grad_in_forward=True
    ),
}


def _with_setting(setter, value, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with a chunklogits setting (``set_block_budget``, ...) at
    ``value``; an op keeps the settings it was called with for its backward pass."""
    previous = setter(value)
    try:
        return fn(*args, **kwargs)
    finally:
        setter(previous)


_problems: dict[str, tuple] = {}


def problem(shape: str):
    """bf16 inputs of ``SHAPES[shape]`` and the fp64 loss, built once per session."""
    if shape not in _problems:
        hidden, weight, labels = head_inputs(shape)
        with torch.no_grad():
            exact = F.cross_entropy(hidden.double() @ weight.double().T, labels).item()
        _problems[shape] = (hidden, weight, labels, exact)
    return _problems[shape]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_loss_forward_backward(benchmark, shape, impl):
    reason = unavailable(impl)
    if reason:
        pytest.skip(reason)
    hidden, weight, labels, exact = problem(shape)
    loss_fn = IMPLEMENTATIONS[impl]
    losses = []

    def reset():
        hidden.grad = weight.grad = None

    def step():
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        losses.append(loss.detach())

    grads_bytes = hidden.nbytes + weight.nbytes  # the gradients returned have the inputs' sizes
    benchmark.group = f"loss fwd+bwd {shape}"
    if not impl.startswith("chunklogits") and _slow_half_gemms(hidden):
        # Minutes per run: timed once (compiling peers after a warm-up).
        warmup = impl == "cut-cross-entropy"
        measure_once(benchmark, step, reset=reset, returned_bytes=grads_bytes, warmup=warmup)
    else:
        rounds = 2 if "1024" in shape else 3
        measure(benchmark, step, reset=reset, returned_bytes=grads_bytes, rounds=rounds)
    benchmark.extra_info["loss_error"] = abs(losses[-1].item() - exact)
    benchmark.extra_info["lower_bound_mib"] = round(2 * grads_bytes / 2**20, 1)


def _slow_half_gemms(hidden) -> bool:
    """Whether the peers' GEMMs, which run in ``hidden``'s half precision, are emulated here:
    on a CPU without AVX512-BF16 or AMX a bf16 GEMM runs about 10-100x slower than fp32."""
    return (
        hidden.device.type == "cpu"
        and hidden.dtype in (torch.bfloat16, torch.float16)
        and not _cpu_multiplies_natively(hidden.dtype)
    )


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemm_floor(benchmark, shape):
    hidden, weight, _, _ = problem(shape)
    dtype = block_compute_dtype(hidden.dtype, hidden.device)
    h, w = hidden.detach().to(dtype), weight.detach().to(dtype)

    def step():
        logits = h @ w.T
        return logits @ w, logits.T @ h  # the GEMMs of dL/dhidden and dL/dweight

    benchmark.group = f"loss fwd+bwd {shape}"
    benchmark.extra_info["gemm_dtype"] = str(dtype)
    measure(benchmark, step, rounds=2 if "1024" in shape else 3)


# The default's choice between the two gradient paths, against both, on the CPU at hand: the
# recomputing backward (4 GEMMs) and the fused pass (3 GEMMs, more passes over kept blocks).
PATHS = {"default": None, "fused": True, "recomputing": False}
WEIGHTS = {  # weight dtype, whether it is trained
    "bf16": (torch.bfloat16, True),
    "bf16-frozen-weight": (torch.bfloat16, False),
    "fp32": (torch.float32, True),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("shape", ["head-1k-x-1024-x-32k", "llama3-head-1k-x-256"])
def test_gradient_path_choice(benchmark, monkeypatch, shape, weights, path):
    from chunklogits import _blocks

    hidden, weight, labels, _ = problem(shape)
    dtype, trained = WEIGHTS[weights]
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_(trained)
    fused_calls = []
    fused = _blocks._fused_loss_blocks
    monkeypatch.setattr(
        _blocks, "_fused_loss_blocks", lambda *a: fused_calls.append(1) or fused(*a)
    )

    def reset():
        hidden.grad = weight.grad = None

    def step():
        cl.linear_cross_entropy(hidden, weight, labels, grad_in_forward=PATHS[path]).backward()

    benchmark.group = f"gradient path {shape} {weights} weight"
    measure(benchmark, step, reset=reset, returned_bytes=hidden.nbytes + weight.nbytes * trained)
    benchmark.extra_info["took_fused_pass"] = bool(fused_calls)
