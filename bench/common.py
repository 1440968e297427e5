"""Shared benchmark plumbing: every implementation is timed by pytest-benchmark and measured by
``chunklogits.memory.peak()`` the same way, in the same run."""

from __future__ import annotations

from collections.abc import Callable

import torch

from chunklogits import memory

MiB = 2**20


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure(
    benchmark,
    run: Callable[[], object],
    *,
    reset: Callable[[], object] = lambda: None,
    returned_bytes: int = 0,
    rounds: int = 3,
) -> None:
    """Time ``run`` (``rounds`` after one warm-up, ``reset`` before each) and record its peak
    memory above the entry level (``peak_mib``), and that peak minus the bytes of what it returns,
    e.g. gradients (``working_mib``), in ``benchmark.extra_info``."""
    benchmark.pedantic(run, setup=reset, rounds=rounds, iterations=1, warmup_rounds=1)
    reset()
    with memory.peak(device()) as used:
        run()
    reset()
    benchmark.extra_info["peak_mib"] = round(used.bytes / MiB, 1)
    benchmark.extra_info["working_mib"] = round((used.bytes - returned_bytes) / MiB, 1)
