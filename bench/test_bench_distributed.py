"""Per-rank memory of the vocab-parallel loss (forward + backward) and of one vocab-parallel
sampling step, for 1, 2 and 4 ranks.

    pytest bench/test_bench_distributed.py --benchmark-only -s

CPU, gloo, fp32, a Gemma-sized vocabulary (V = 256,000). Every rank holds the same hidden states
and labels and a slice of the head (an input, allocated before measuring); inside each rank
``chunklogits.memory.peak()`` measures one ``linear_cross_entropy(..., process_group=...)`` and
its ``backward``. ``extra_info`` per rank: ``peak_mib``, ``working_mib`` (peak minus the returned
gradients: the weight slice's and hidden's, as in bench/common.py) and the rank's seconds.
Baseline in the same run: the naive materialising loss in one process. Process start-up
dominates the benchmark's own time; compare the ranks' seconds only on a quiet machine.

Sampling (``sample-*``): one ``sample_next(..., process_group=...)`` step for the first
``SAMPLE_ROWS`` hidden states (temperature 0.8, top-k 50, top-p 0.9, a seed), against HF's
step (``reference.sample_next``: full fp32 logits and processors) in one process. Every world
size must draw the same tokens; the working memory per rank stays within the one-rank figure
but for the gathered candidates (see ``_compare_with_one_rank``; ``gathered_mib`` per rank).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import chunklogits
from bench.common import MiB
from chunklogits import reference
from chunklogits.distributed import VocabSlice
from tests.helpers import run_ranks

VOCAB, DIM, ROWS = 256_000, 512, 512
WORLDS = (1, 2, 4)
SAMPLE_ROWS = 64
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9, seed=0)
_results: dict[str, list[dict]] = {}


def _inputs(rank: int, world: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, DIM, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (ROWS,), generator=g)
    start, end = (round(r * vocab / world) for r in (rank, rank + 1))
    weight = torch.randn(vocab, DIM, generator=g)[start:end].mul_(0.05).requires_grad_()
    return hidden, weight, labels


def _loss_step(fn, hidden, weight, labels, **kwargs) -> tuple[dict, int]:
    """A loss and its backward; returns the result and the bytes of the gradients returned."""
    loss = fn(hidden, weight, labels, **kwargs)
    loss.backward()
    returned = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
    return {"loss": loss.item()}, returned


def _sample_step(fn, hidden, weight, labels, **kwargs) -> tuple[dict, int]:
    tokens = fn(hidden[:SAMPLE_ROWS].detach(), weight.detach(), **SAMPLING, **kwargs)
    return {"tokens": tokens}, 0


_OPS = {
    "loss": (_loss_step, reference.linear_cross_entropy, chunklogits.linear_cross_entropy),
    "sample": (_sample_step, reference.sample_next, chunklogits.sample_next),
}


def _measure(op: str, naive: bool, rank: int, world: int, vocab: int, **kwargs) -> dict:
    step, naive_fn, fn = _OPS[op]
    hidden, weight, labels = _inputs(rank, world, vocab)
    with chunklogits.memory.peak("cpu") as used:
        start = time.perf_counter()
        result, returned = step(naive_fn if naive else fn, hidden, weight, labels, **kwargs)
        seconds = time.perf_counter() - start
    return {"peak": used.bytes, "working": used.bytes - returned, "seconds": seconds, **result}


def _rank(rank: int, world: int, op: str, naive: bool) -> dict:
    chunklogits.memory.pin_allocator()
    kwargs = {"process_group": dist.group.WORLD} if world > 1 else {}
    _measure(op, naive, rank, world, 4096, **kwargs)  # warm-up: kernels, gloo buffers
    received = []  # bytes each all_gather of per-row results delivers to this rank
    gather = VocabSlice.gather

    def counted(self, tensors):
        every = gather(self, tensors)
        received.append(sum(t.numel() * 8 for t in every))  # they travel as float64
        return every

    VocabSlice.gather = counted
    try:
        return {
            **_measure(op, naive, rank, world, VOCAB, **kwargs),
            "gathered": max(received, default=0),
        }
    finally:
        VocabSlice.gather = gather


def _record(benchmark, name: str, world: int, op: str, naive: bool) -> list[dict]:
    ranks = benchmark.pedantic(run_ranks, args=(_rank, world, op, naive), rounds=1, iterations=1)
    _results[name] = ranks
    benchmark.extra_info.update(
        world=world,
        vocab=VOCAB,
        dim=DIM,
        rows=SAMPLE_ROWS if op == "sample" else ROWS,
        peak_mib=[round(r["peak"] / MiB, 1) for r in ranks],
        working_mib=[round(r["working"] / MiB, 1) for r in ranks],
        seconds=[round(r["seconds"], 2) for r in ranks],
        gathered_mib=[round(r["gathered"] / MiB, 2) for r in ranks],
    )
    if op == "loss":
        benchmark.extra_info["loss"] = ranks[0]["loss"]
    print(f"\n{name}: {benchmark.extra_info}")
    return ranks


def _compare_with_one_rank(benchmark, name: str, ranks: list[dict], world: int) -> dict:
    """The one-rank result of the same run; records the peak ratio. The working memory (blocks
    within the budget, statistics) must not grow with the world size, except by what a rank
    receives from one ``all_gather`` of per-row results — the sampler's candidates grow as world
    size x rows x candidates — held twice (as received, and unpacked), and by 1 MiB of
    measurement noise."""
    one = _results.get(name)
    if one is None:
        pytest.skip("needs the world-size-1 case of the same run for its ratios")
    worst = max(r["peak"] for r in ranks)
    benchmark.extra_info["peak_vs_one_rank"] = round(worst / one[0]["peak"], 3)
    benchmark.extra_info["one_over_world"] = round(1 / world, 3)
    for r in ranks:
        assert r["working"] <= one[0]["working"] + 2 * r["gathered"] + MiB, benchmark.extra_info
    return one[0]


def test_naive_single_process(benchmark):
    _record(benchmark, "naive", 1, "loss", naive=True)


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel(benchmark, world):
    ranks = _record(benchmark, f"chunklogits-{world}", world, "loss", naive=False)
    one = _compare_with_one_rank(benchmark, "chunklogits-1", ranks, world)
    # Every world size computes the same loss, up to fp32 rounding.
    assert ranks[0]["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_sample_naive_single_process(benchmark):
    _record(benchmark, "sample-naive", 1, "sample", naive=True)


@pytest.mark.parametrize("world", WORLDS)
def test_sample_vocab_parallel(benchmark, world):
    ranks = _record(benchmark, f"sample-chunklogits-{world}", world, "sample", naive=False)
    one = _compare_with_one_rank(benchmark, "sample-chunklogits-1", ranks, world)
    for r in ranks:  # the same seed draws the same tokens whatever the world size
        assert torch.equal(r["tokens"], one["tokens"])
