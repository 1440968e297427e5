"""Loss forward + backward: chunklogits against the materialising baselines, in one run.

    pytest bench/test_bench_loss.py --benchmark-only --benchmark-json=out/loss.json

Each case records ``peak_mib`` / ``working_mib`` (peak minus the returned gradients) and
``loss_error`` (|loss - fp64 loss|) in ``extra_info``. Optional peers that are not installed are
skipped with the reason.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

import chunklogits as cl
from bench.common import device, measure

SHAPES = {
    # (tokens N, hidden D, vocab V): the CPU shape of issue 3's measurements, and the size of its
    # memory target (working memory <= 10% of hidden + weight + grads).
    "llama3-head-1k-x-256": (1024, 256, 128256),
    "llama3-head-2k-x-1024": (2048, 1024, 128256),
}


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
}


def _unavailable(name: str) -> str | None:
    if name == "cut-cross-entropy" and importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
    if name == "liger-fused-linear-ce":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
        if not torch.cuda.is_available():
            return "Liger's kernels are Triton GPU kernels; no GPU here"
    if name == "torch-linear_cross_entropy" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    return None


_problems: dict[str, tuple] = {}


def problem(shape: str):
    """bf16 inputs of ``SHAPES[shape]`` and the fp64 loss, built once per session."""
    if shape not in _problems:
        n, d, v = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, d, generator=g) / d**0.5
        weight = torch.randn(v, d, generator=g) / d**0.25
        labels = torch.randint(0, v, (n,), generator=g)
        exact = F.cross_entropy(
            hidden.bfloat16().double() @ weight.bfloat16().double().T, labels
        ).item()
        tensors = [t.bfloat16().to(device()).requires_grad_() for t in (hidden, weight)]
        _problems[shape] = (*tensors, labels.to(device()), exact)
    return _problems[shape]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_loss_forward_backward(benchmark, shape, impl):
    reason = _unavailable(impl)
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
