"""Benchmarks run with ``pytest bench/ --benchmark-only``; see bench/common.py."""

from __future__ import annotations

import pytest

from bench.common import instruction_set
from chunklogits import memory


def pytest_report_header(config):
    return f"cpu: {instruction_set()}"


def pytest_benchmark_update_machine_info(config, machine_info):
    # Figures from CPUs that do or do not multiply bf16 natively differ by up to 100x: the JSON
    # says which kind took them.
    machine_info["instruction_set"] = instruction_set()


@pytest.fixture(scope="session", autouse=True)
def _same_allocator_for_everyone():
    # peak() pins glibc's mmap threshold so that freed memory leaves the resident set; pin it
    # before the first timing so every implementation is timed under the same allocator.
    memory.pin_allocator()
