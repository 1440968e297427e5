"""Benchmarks run with ``pytest bench/ --benchmark-only``; see bench/common.py."""

from __future__ import annotations

import pytest

from chunklogits import memory


@pytest.fixture(scope="session", autouse=True)
def _same_allocator_for_everyone():
    # peak() pins glibc's mmap threshold so that freed memory leaves the resident set; pin it
    # before the first timing so every implementation is timed under the same allocator.
    memory.pin_allocator()
