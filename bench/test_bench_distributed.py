"""Per-rank memory of the vocab-parallel loss (forward + backward) for 1, 2 and 4 ranks.

    pytest bench/test_bench_distributed.py --benchmark-only -s

CPU, gloo, fp32, a Gemma-sized vocabulary (V = 256,000). Every rank holds the same hidden states
and labels and a slice of the head (an input, allocated before measuring); inside each rank
``chunklogits.memory.peak()`` measures one ``linear_cross_entropy(..., process_group=...)`` and
its ``backward``. ``extra_info`` per rank: ``peak_mib``, ``working_mib`` (peak minus the returned
gradients: the weight slice's and hidden's, as in bench/common.py) and the rank's seconds.
Baseline in the same run: the naive materialising loss in one process. Process start-up
dominates the benchmark's own time; compare the ranks' seconds only on a quiet machine.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import chunklogits
from bench.common import MiB
from chunklogits import reference
from tests.helpers import run_ranks

VOCAB, DIM, ROWS = 256_000, 512, 512
WORLDS = (1, 2, 4)
_results: dict[str, list[dict]] = {}


def _inputs(rank: int, world: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, DIM, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (ROWS,), generator=g)
    start, end = (round(r * vocab / world) for r in (rank, rank + 1))
    weight = torch.randn(vocab, DIM, generator=g)[start:end].mul_(0.05).requires_grad_()
    return hidden, weight, labels


def _measure(loss_fn, rank: int, world: int, vocab: int, **kwargs) -> dict:
    hidden, weight, labels = _inputs(rank, world, vocab)
    with chunklogits.memory.peak("cpu") as used:
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, labels, **kwargs)
        loss.backward()
        seconds = time.perf_counter() - start
    returned = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
    return {
        "peak": used.bytes,
        "working": used.bytes - returned,
        "seconds": seconds,
        "loss": loss.item(),
    }


def _rank(rank: int, world: int, naive: bool) -> dict:
    chunklogits.memory.pin_allocator()
    loss_fn = reference.linear_cross_entropy if naive else chunklogits.linear_cross_entropy
    kwargs = {"process_group": dist.group.WORLD} if world > 1 else {}
    _measure(loss_fn, rank, world, 4096, **kwargs)  # warm-up: kernels, gloo buffers
    return _measure(loss_fn, rank, world, VOCAB, **kwargs)


def _record(benchmark, name: str, world: int, naive: bool) -> list[dict]:
    ranks = benchmark.pedantic(run_ranks, args=(_rank, world, naive), rounds=1, iterations=1)
    _results[name] = ranks
    benchmark.extra_info.update(
        world=world,
        vocab=VOCAB,
        dim=DIM,
        rows=ROWS,
        peak_mib=[round(r["peak"] / MiB, 1) for r in ranks],
        working_mib=[round(r["working"] / MiB, 1) for r in ranks],
        seconds=[round(r["seconds"], 2) for r in ranks],
        loss=ranks[0]["loss"],
    )
    print(f"\n{name}: {benchmark.extra_info}")
    return ranks


def test_naive_single_process(benchmark):
    _record(benchmark, "naive", 1, naive=True)


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel(benchmark, world):
    ranks = _record(benchmark, f"chunklogits-{world}", world, naive=False)
    one = _results.get("chunklogits-1")
    if one is None:
        pytest.skip("needs the world-size-1 case of the same run for its ratios")
    worst = max(r["peak"] for r in ranks)
    benchmark.extra_info["peak_vs_one_rank"] = round(worst / one[0]["peak"], 3)
    benchmark.extra_info["one_over_world"] = round(1 / world, 3)
    # Every world size computes the same loss, up to fp32 rounding.
    assert ranks[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    # The gradient slice shrinks as 1 / world; the working memory (blocks within the budget,
    # statistics, collective buffers) must not grow with it (1 MiB: the measurement's noise).
    for r in ranks:
        assert r["working"] <= one[0]["working"] + MiB, benchmark.extra_info
