"""The block engine's plan and its online merge, on the cases that break naive implementations."""

from __future__ import annotations

import math

import pytest
import torch

import chunklogits as cl
from chunklogits._blocks import (
    _BYTES_PER_BLOCK_ELEMENT,
    _NO_INDEX,
    _SHARD_ALIGN,
    _merge_top,
    plan_blocks,
)
from tests.helpers import assert_as_accurate, check_infinite_bias_mask, seeded

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "rows, vocab", [(2048, 128256), (1024, 256000), (16, 256000), (100_000, 32000)]
)
def test_default_plan_fits_the_budget(rows, vocab):
    plan = plan_blocks(rows, vocab, torch.bfloat16, CPU)
    widest = max(v1 - v0 for v0, v1 in plan.shards)
    assert plan.shard_bounds[0] == 0 and plan.shard_bounds[-1] == vocab
    assert sum(v1 - v0 for v0, v1 in plan.shards) == vocab
    # Nearly even shards whose rows start 64 bytes apart in fp32 (CPU GEMMs are faster so).
    assert widest - min(v1 - v0 for v0, v1 in plan.shards) <= _SHARD_ALIGN
    assert all(bound % _SHARD_ALIGN == 0 for bound in plan.shard_bounds[:-1])
    assert plan.chunks[-1][1] == rows
    assert min(plan.chunk_size, rows) * widest * _BYTES_PER_BLOCK_ELEMENT <= 32 * 2**20


@pytest.mark.parametrize("dim", [256, 1024, 4096])
@pytest.mark.parametrize("rows, vocab", [(2048, 128256), (64, 256000), (1, 256000)])
def test_plan_counts_converted_copies(cpu_gemm, rows, vocab, dim):
    # With fp32 GEMMs for bf16 inputs, the fp32 copies of the weight shard and of the row chunk
    # are part of the block's transient memory, and so is the shard's fp32 weight gradient.
    plan = plan_blocks(rows, vocab, torch.bfloat16, CPU, dim=dim)
    widest = max(v1 - v0 for v0, v1 in plan.shards)
    chunk = min(plan.chunk_size, rows)
    copies = (widest + chunk) * dim * 4 if plan.compute_dtype == torch.float32 else 0
    copies += widest * dim * 4  # the shard's fp32 weight gradient
    assert plan.compute_dtype == (torch.bfloat16 if cpu_gemm == "model" else torch.float32)
    assert chunk * widest * _BYTES_PER_BLOCK_ELEMENT + copies <= 32 * 2**20


def test_gemm_dtype_from_the_instruction_set_not_a_timing():
    g = torch.Generator().manual_seed(0)
    before = torch.get_rng_state()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    previous = cl.set_cpu_gemm_dtype("auto")  # the rule itself, whatever CHUNKLOGITS_CPU_GEMM says
    try:
        plan = plan_blocks(16, 1000, torch.bfloat16, CPU)
    finally:
        cl.set_cpu_gemm_dtype(previous)
    assert plan.compute_dtype == (torch.bfloat16 if native else torch.float32)
    cl.linear_cross_entropy(
        torch.randn(4, 8, generator=g).bfloat16(),
        torch.randn(50, 8, generator=g).bfloat16(),
        torch.randint(0, 50, (4,), generator=g),
    )
    assert torch.equal(torch.get_rng_state(), before), "a chunked op drew from torch's RNG"
    with pytest.raises(ValueError, match="mode: expected one of"):
        cl.set_cpu_gemm_dtype("bf16")


def test_budget_changes_blocks_not_results():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(300, 64, generator=g), torch.randn(5000, 64, generator=g)
    labels = torch.randint(0, 5000, (300,), generator=g)
    default = plan_blocks(300, 5000, torch.float32, CPU)
    previous = cl.set_block_budget(2**16)
    try:
        small = plan_blocks(300, 5000, torch.float32, CPU)
        tight = cl.linear_cross_entropy(hidden, weight, labels, reduction="none")
    finally:
        cl.set_block_budget(previous)
    assert len(small.shards) * len(small.chunks) > len(default.shards) * len(default.chunks)
    expected = cl.reference.linear_cross_entropy(hidden, weight, labels, reduction="none")
    torch.testing.assert_close(tight, expected)


@pytest.mark.parametrize("where", ["first", "last"])
def test_online_merge_with_huge_logits(where):
    # Logits of order 1e4: exp overflows without the running max; the max sits in the first or
    # the last shard so that both rescaling directions are exercised.
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(400, 16, generator=g)
    weight[0 if where == "first" else 399] = hidden[0] * 1000.0
    tokens = torch.randint(0, 400, (6,), generator=g)
    ours = cl.token_logprobs(hidden, weight, tokens, return_entropy=True, shards=8)
    naive = cl.reference.token_logprobs(hidden, weight, tokens, return_entropy=True)
    exact = cl.reference.token_logprobs(
        hidden.double(), weight.double(), tokens, return_entropy=True
    )
    lse = cl.logsumexp(hidden, weight, shards=8)
    assert torch.cat([*ours, lse]).isfinite().all()
    for name, o, n, e in zip(["logprobs", "entropy"], ours, naive, exact, strict=True):
        assert_as_accurate(o, n, e, torch.float32, name)
    exact_lse = cl.reference.logsumexp(hidden.double(), weight.double())
    assert_as_accurate(lse, cl.reference.logsumexp(hidden, weight), exact_lse, torch.float32, "lse")


def test_entropy_does_not_cancel_a_large_offset():
    # A common offset (a bias of 300) leaves the softmax and its entropy unchanged; an entropy
    # computed as lse - E[z] cancels the offset and loses ~300 * eps32 = 4e-5, ten times the
    # error of the naive -(p * log p).sum().
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(5, 32, generator=g), torch.randn(700, 32, generator=g)
    tokens = torch.randint(0, 700, (5,), generator=g)
    bias = torch.full((700,), 300.0)
    _, ours = cl.token_logprobs(hidden, weight, tokens, bias=bias, return_entropy=True, shards=6)
    _, naive = cl.reference.token_logprobs(hidden, weight, tokens, bias=bias, return_entropy=True)
    f64 = (hidden.double(), weight.double(), tokens)
    _, exact = cl.reference.token_logprobs(*f64, bias=bias.double(), return_entropy=True)
    assert_as_accurate(ours, naive, exact, torch.float32, "entropy")
    assert (ours.double() - exact).abs().max() < 1e-5


@pytest.mark.parametrize("masked", ["scattered", 300], ids=["scattered", "leading"])
def test_far_below_the_maximum_and_masked_by_an_infinite_bias(masked):
    check_infinite_bias_mask(masked, CPU)


@pytest.mark.parametrize("by_index", [True, False])
def test_merge_top_against_a_sort_of_every_candidate(by_index):
    # A running top-k and a block's candidates valued on a few levels: ties within and across
    # the parts, at the k-th place, at -inf against the running top's placeholders, and NaN.
    g = seeded(4)
    rows, k, width = 6, 5, 9
    levels = torch.tensor([-math.inf, -1.0, 0.0, 2.5, math.nan])
    values = levels[torch.randint(0, len(levels), (rows, k + width), generator=g)]
    index = torch.stack([torch.randperm(40, generator=g)[: k + width] for _ in range(rows)])
    values[:2, :k], index[:2, :k] = -math.inf, _NO_INDEX  # running tops still empty
    payload = index * 0.5  # must travel with its index
    running, block = (
        [t[:, cols] for t in (values, index, payload)] for cols in (slice(k), slice(k, None))
    )
    kept_values, kept_index, kept_payload = _merge_top(k, [running, block], by_index=by_index)
    for row in range(rows):
        # The naive order: descending value (NaN first, as torch.sort and topk), then index.
        pairs = sorted(
            zip(values[row].tolist(), index[row].tolist(), strict=True),
            key=lambda vi: (-math.inf if math.isnan(vi[0]) else -vi[0], vi[1]),
        )[:k]
        expected = torch.tensor([v for v, _ in pairs])
        assert torch.equal(kept_values[row].nan_to_num(7.0), expected.nan_to_num(7.0))
        if by_index:
            assert kept_index[row].tolist() == [i for _, i in pairs]
        else:  # any of the tied candidates, each once, with its own value
            at = (kept_index[row, :, None] == index[row]).int().argmax(1)
            assert len(set(kept_index[row].tolist())) == k
            assert torch.equal(values[row, at].nan_to_num(7.0), kept_values[row].nan_to_num(7.0))
    assert torch.equal(kept_payload, kept_index * 0.5)
