"""Benchmarks run with ``pytest bench/ --benchmark-only``; see bench/common.py."""

from __future__ import annotations

import pytest
import torch

from chunklogits import memory
from chunklogits._blocks import block_compute_dtype


def _instruction_set() -> dict:
    """What decides the speed of the block passes on this CPU: its vector extensions that
    multiply half precision natively, and the dtype the blocks' GEMMs run in for bf16 inputs."""
    cpu = torch.cpu
    flags = {
        name: bool(getattr(cpu, f"_is_{name}_supported", lambda: False)())
        for name in ("avx2", "avx512", "avx512_bf16", "amx_tile", "amx_fp16")
    }
    flags["bf16_gemm_dtype"] = str(block_compute_dtype(torch.bfloat16, torch.device("cpu")))
    flags["threads"] = torch.get_num_threads()
    return flags


def pytest_report_header(config):
    return f"cpu: {_instruction_set()}"


def pytest_benchmark_update_machine_info(config, machine_info):
    # Figures from CPUs that do or do not multiply bf16 natively differ by up to 100x: the JSON
    # says which kind took them.
    machine_info["instruction_set"] = _instruction_set()


@pytest.fixture(scope="session", autouse=True)
def _same_allocator_for_everyone():
    # peak() pins glibc's mmap threshold so that freed memory leaves the resident set; pin it
    # before the first timing so every implementation is timed under the same allocator.
    memory.pin_allocator()
