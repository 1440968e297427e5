"""Session-wide test setup, run before any test module is imported."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels are tested in Triton's interpreter, which must be chosen before
# triton is first imported: importing a transformers model class (tests of generate, wrap, ...)
# imports triton, and the interpreter could no longer be switched on for tests/test_triton.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["model", "fp32"], ids=["model-dtype-gemm", "fp32-gemm"])
def cpu_gemm(request):
    """Run a test with the CPU block GEMMs forced to the inputs' dtype, then to fp32: both paths
    that ``set_cpu_gemm_dtype("auto")`` can pick, whatever this machine's instruction set."""
    import chunklogits as cl

    previous = cl.set_cpu_gemm_dtype(request.param)
    yield request.param
    cl.set_cpu_gemm_dtype(previous)
