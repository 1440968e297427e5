"""Loss forward + backward: chunklogits against the materialising baselines, in one run.

    pytest bench/test_bench_loss.py --benchmark-only --benchmark-json=out/loss.json

Each case records ``peak_mib`` / ``working_mib`` (peak minus the returned gradients) and
``loss_error`` (|loss - fp64 loss|) in ``extra_info``. Optional peers that are not installed are
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
from bench.common import HEAD_SHAPES, head_inputs, measure, unavailable
from chunklogits._blocks import block_compute_dtype

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
    "chunklogits-grad_in_forward-256MiB": lambda h, w, y: _with_budget(
        256 * 2**20, cl.linear_cross_entropy, h, w, y, grad_in_forward=True
    ),
}


def _with_budget(nbytes, fn, *args, **kwargs):
    previous = cl.set_block_budget(nbytes)
    try:
        return fn(*args, **kwargs)
    finally:
        cl.set_block_budget(previous)


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
    measure(
        benchmark, step, reset=reset, returned_bytes=grads_bytes, rounds=2 if "1024" in shape else 3
    )
    benchmark.extra_info["loss_error"] = abs(losses[-1].item() - exact)
    benchmark.extra_info["lower_bound_mib"] = round(2 * grads_bytes / 2**20, 1)


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
