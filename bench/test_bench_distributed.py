"""Per-rank peak memory of the vocab-parallel loss (forward + backward) for 1, 2 and 4 ranks.

CPU, gloo, fp32, a Gemma-sized vocabulary (V = 256,000). Each rank holds the same hidden states
and labels and a slice of the head (the weight slice is an input, allocated before measuring);
``chunklogits.memory.peak()`` inside each rank measures the resident-set peak of one
``linear_cross_entropy(..., process_group=...)`` plus its ``backward``, so the weight slice's
gradient counts. Baseline in the same run: the naive materialising loss in one process.

    python -m pytest bench/test_bench_distributed.py --benchmark-only -s

Process start-up dominates the benchmark's own time; the ranks' seconds are in ``extra_info``.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import chunklogits
from chunklogits import reference
from tests.helpers import run_ranks

VOCAB, DIM, ROWS = 256_000, 512, 512
WORLDS = (1, 2, 4)
_results: dict = {}


def _inputs(rank: int, world: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, DIM, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (ROWS,), generator=g)
    start, end = (round(r * vocab / world) for r in (rank, rank + 1))
    weight = torch.randn(vocab, DIM, generator=g)[start:end].mul_(0.05).requires_grad_()
    return hidden, weight, labels


def _loss_and_backward(loss_fn, rank: int, world: int, vocab: int, **kwargs) -> dict:
    hidden, weight, labels = _inputs(rank, world, vocab)
    with chunklogits.memory.peak("cpu") as peak:
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, labels, **kwargs)
        loss.backward()
        seconds = time.perf_counter() - start
    return {
        "peak": peak.bytes,
        "seconds": seconds,
        "loss": loss.item(),
        "slice_bytes": weight.numel() * weight.element_size(),
    }


def _rank(rank: int, world: int, naive: bool) -> dict:
    group = dist.group.WORLD if world > 1 else None
    loss_fn = reference.linear_cross_entropy if naive else chunklogits.linear_cross_entropy
    kwargs = {} if naive else {"process_group": group}
    _loss_and_backward(loss_fn, rank, world, 4096, **kwargs)  # warm-up: kernels, gloo buffers
    return _loss_and_backward(loss_fn, rank, world, VOCAB, **kwargs)


def _beyond_gradient(rank: dict) -> int:
    return rank["peak"] - rank["slice_bytes"]


def _record(benchmark, name: str, world: int, naive: bool) -> list[dict]:
    ranks = benchmark.pedantic(run_ranks, args=(_rank, world, naive), rounds=1, iterations=1)
    _results[name] = ranks
    benchmark.extra_info.update(
        world=world,
        vocab=VOCAB,
        dim=DIM,
        rows=ROWS,
        peak_mib_per_rank=[round(r["peak"] / 2**20, 1) for r in ranks],
        weight_slice_mib_per_rank=[round(r["slice_bytes"] / 2**20, 1) for r in ranks],
        # What a rank needs beyond its slice's gradient (blocks, hidden's gradient, buffers).
        beyond_gradient_mib_per_rank=[round(_beyond_gradient(r) / 2**20, 1) for r in ranks],
        seconds_per_rank=[round(r["seconds"], 2) for r in ranks],
        loss=ranks[0]["loss"],
    )
    print(f"\n{name}: {benchmark.extra_info}")
    return ranks


def test_naive_single_process(benchmark):
    _record(benchmark, "naive", 1, naive=True)


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel(benchmark, world):
    ranks = _record(benchmark, f"chunklogits_{world}", world, naive=False)
    one = _results.get("chunklogits_1")
    if one is not None:
        worst = max(r["peak"] for r in ranks)
        benchmark.extra_info["peak_vs_one_rank"] = round(worst / one[0]["peak"], 3)
        benchmark.extra_info["one_over_world"] = round(1 / world, 3)
        # Every world size computes the same loss, up to fp32 rounding.
        assert ranks[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
        # The gradient slice shrinks as 1 / world; what a rank needs beyond it must not grow
        # (1 MiB: the resolution of the resident-set measurement).
        for r in ranks:
            assert _beyond_gradient(r) <= _beyond_gradient(one[0]) + 2**20, benchmark.extra_info
