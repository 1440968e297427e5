"""Session-wide test setup, run before any test module is imported."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels are tested in Triton's interpreter, which must be chosen before
# triton is first imported: importing a transformers model class (tests of generate, wrap, ...)
# imports triton, and the interpreter could no longer be switched on for tests/test_triton.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
