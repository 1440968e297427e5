"""Session-wide test setup, run before any test module is imported.

Hypothesis profiles (tests/test_properties.py), chosen by the environment variable
``HYPOTHESIS_PROFILE``:

* ``ci`` (default): derandomized (the same examples on every run and machine), a bounded number
  of examples per property so that the whole property suite runs in about 2 minutes on 2 cores,
  no per-example deadline (a shared CI machine's timing says nothing about correctness), and the
  reproduction blob printed with every failure (``@reproduce_failure``);
* ``long``: random examples, thousands per property, for a search run by hand or at night:
  ``HYPOTHESIS_PROFILE=long pytest tests/test_properties.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels are tested in Triton's interpreter, which must be chosen before
# triton is first imported: importing a transformers model class (tests of generate, wrap, ...)
# imports triton, and the interpreter could no longer be switched on for tests/test_triton.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Drawn heads are built from a seed inside the test, and some examples are slow by nature (fp16
# GEMMs on CPU, gradcheck): neither is a defect of the strategy.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=_QUIET,
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, print_blob=True, suppress_health_check=_QUIET
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["model", "fp32"], ids=["model-dtype-gemm", "fp32-gemm"])
def cpu_gemm(request):
    """Run a test with the CPU block GEMMs forced to the inputs' dtype, then to fp32: both paths
    that ``set_cpu_gemm_dtype("auto")`` can pick, whatever this machine's instruction set."""
    import chunklogits as cl

    previous = cl.set_cpu_gemm_dtype(request.param)
    yield request.param
    cl.set_cpu_gemm_dtype(previous)
