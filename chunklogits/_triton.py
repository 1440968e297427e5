"""Fused Triton kernels for the block engine: drop-in replacements of ``_blocks._forward_stats``
and ``_blocks._backward_blocks`` (same arguments, same results up to floating-point rounding),
chosen automatically for CUDA tensors when triton imports (``serves``). The PyTorch block loop of
``_blocks`` stays the fallback and the oracle these kernels are tested against.

Forward (``forward_stats``): ``_stats_kernel`` computes the logits ``tile x tile`` at a time with
``tl.dot`` over ``D`` and folds each tile straight into per-row running statistics held in
registers (the online log-sum-exp merge of ``_blocks``); no logits reach global memory. The
vocabulary is cut into a few contiguous ranges so that the grid fills the GPU: each program owns
one row tile and one range and writes one partial of each statistic, merged afterwards by a few
PyTorch ops on ``[ranges, N]`` tensors.

Backward (``backward_blocks``), for each (row chunk, vocabulary shard) block of the plan:

1. ``_grad_logits_kernel`` recomputes the logits tile by tile and writes ``G = dL/dx`` (the
   coefficients of ``_GradCoefficients`` and the chain rule through the transform applied in
   registers) in the input dtype into a ``[chunk, shard]`` buffer, with per-tile column sums for
   the bias gradient.
2. ``_matmul_kernel`` twice: ``grad_hidden[rows] += G @ weight[shard]`` and
   ``grad_weight[shard] += G.T @ hidden[rows]``, accumulated in fp32 registers.

A gradient summed over several blocks (``grad_hidden`` over shards, ``grad_weight`` over row
chunks) is carried between blocks as a compensated pair ``hi + lo`` of two tensors of the input
dtype: ``hi`` is the output tensor itself and ``lo`` its rounding error, so the running sum keeps
about twice the input dtype's precision and is rounded once at the end, as the naive computation
rounds it, with no fp32 copy of either gradient. Besides the gradients the backward pass holds
``G`` and these low halves (``[N, D]`` for grad_hidden, ``[shard, D]`` for grad_weight, each only
where a sum spans several blocks). ``G`` costs 2 bytes per entry in half precision instead of the
PyTorch loop's ``_BYTES_PER_BLOCK_ELEMENT``, so for the memory the plan budgets a block is wider:
consecutive plan shards are merged (``_shard_groups``).

Opt-in gradient filter (``set_gradient_filter``; Cut Cross-Entropy, Wijmans et al. 2024, sec.
4.3): tiles where every softmax probability is below ``eps`` and no target falls are skipped by
both gradient GEMMs, and the vocabulary is visited in descending order of its mean logit so that
the probable entries share tiles and more tiles are skipped. It is *not exact* (the skipped
entries' ``p * W`` terms are dropped) and is off by default. Nothing here synchronises with the
host: tile skipping is decided inside the kernels.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._blocks import _BYTES_PER_BLOCK_ELEMENT, RowStats, log_floor

_SERVED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Oldest triton the kernels were compiled with (3.6 and 3.9, for sm_90); older ones get the
# PyTorch loop rather than a compile error at the first call.
_MIN_TRITON = (3, 6)
_TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
_settings: dict[str, object] = {"enabled": True, "gradient_filter": None}


@dataclass(frozen=True)
class _Config:
    """Tile sizes. Logits tiles are ``tile`` rows x ``tile`` vocabulary entries, ``block_d`` of
    ``D`` per ``tl.dot`` step. A gradient GEMM program owns ``tile`` output rows x ``block_c``
    columns and reduces ``block_k`` at a time (``block_k`` divides ``tile``, so that the filter's
    per-tile flags line up with the GEMMs' rows and reduction)."""

    tile: int
    block_d: int
    block_k: int
    block_c: int
    num_warps: int
    num_stages: int


# Untuned starting points for CUDA (no GPU was available when these kernels were written), kept
# under ~100 KiB of shared memory per program; small tiles on CPU, where only Triton's
# interpreter runs them (tests), so that tiles are ragged and block_k < tile.
_CONFIGS = {
    ("cuda", 2): _Config(tile=128, block_d=64, block_k=64, block_c=128, num_warps=8, num_stages=3),
    ("cuda", 4): _Config(tile=64, block_d=32, block_k=32, block_c=64, num_warps=4, num_stages=2),
    ("cpu", 2): _Config(tile=64, block_d=64, block_k=32, block_c=64, num_warps=4, num_stages=1),
    ("cpu", 4): _Config(tile=64, block_d=64, block_k=32, block_c=64, num_warps=4, num_stages=1),
}
_GROUP = 8  # row tiles per program group: consecutive programs share column tiles in L2


def enable(flag: bool) -> bool:
    """Let the Triton kernels serve CUDA tensors (True, the default) or force the PyTorch block
    loop (False, for comparison and debugging); returns the previous setting."""
    previous = _settings["enabled"]
    _settings["enabled"] = bool(flag)
    return previous


def set_gradient_filter(eps: float | str | None) -> float | str | None:
    """Skip gradient tiles whose softmax probabilities are all below ``eps`` (and that hold no
    target), visiting the vocabulary sorted by mean logit; returns the previous setting.

    ``None`` (default): exact gradients. ``"auto"``: ``torch.finfo(dtype).eps / 32`` (2^-12 in
    bf16), the threshold of Cut Cross-Entropy. A float in ``(0, 1)``: that threshold. Not exact:
    use it only where the softmax is peaked (trained models); on a near-uniform softmax every
    non-target entry is below the threshold and its gradient is dropped. Never applied to a loss
    whose gradient has a uniform term over the vocabulary (label smoothing, mean logit).
    """
    if eps is not None and eps != "auto":
        if not isinstance(eps, float | int) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"eps: expected None, 'auto' or a float in (0, 1), got {eps!r}")
        eps = float(eps)
    previous = _settings["gradient_filter"]
    _settings["gradient_filter"] = eps
    return previous


def serves(hidden2d: Tensor) -> bool:
    """Whether the kernels run for ``hidden2d``: a CUDA tensor of a dtype ``tl.dot`` takes on
    this GPU (bf16 from compute capability 8), with triton >= 3.6, unless disabled with
    ``enable(False)``."""
    if not (_settings["enabled"] and hidden2d.is_cuda and hidden2d.dtype in _SERVED_DTYPES):
        return False
    if _TRITON_VERSION < _MIN_TRITON:
        return False
    return hidden2d.dtype != torch.bfloat16 or _capability(hidden2d.device)[0] >= 8


@cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@cache
def _programs_wanted(device: torch.device) -> int:
    """Programs that keep every streaming multiprocessor busy (4 per SM); a few on CPU."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _config(t: Tensor) -> _Config:
    return _CONFIGS[("cuda" if t.is_cuda else "cpu", 4 if t.dtype == torch.float32 else 2)]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs follow PyTorch's setting: TF32 only where torch would use it too.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _transform_args(transform) -> dict:
    """The transform as kernel arguments: runtime scalars plus constexpr switches."""
    return {
        "logit_scale": 1.0 if transform.logit_scale is None else transform.logit_scale,
        "softcap": 1.0 if transform.softcap is None else transform.softcap,
        "temperature": transform.temperature,
        "HAS_SCALE": transform.logit_scale is not None,
        "HAS_SOFTCAP": transform.softcap is not None,
        "HAS_TEMPERATURE": transform.temperature != 1.0,
    }


# ----------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _tanh(u):
    # tanh from exp, symmetric so that exp never overflows (libdevice's tanh has no interpreter
    # implementation, and this is as accurate in absolute terms).
    t = tl.exp(-2.0 * tl.abs(u))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(u < 0, -r, r)


# Log-probabilities and centred logits are raised to log(fp32 tiny) + 1 before exp, as in
# _blocks._floor_: a token masked by a -inf bias then weighs exp(...) * log(...) = tiny * -86
# instead of 0 * -inf = NaN.
_LOG_FLOOR = tl.constexpr(log_floor(torch.float32))
_LOWEST = tl.constexpr(-3.4028234663852886e38)

# Two gaps of Triton's interpreter, bridged only when it runs the kernels (tests on CPU): it
# multiplies the bit patterns of bf16 tl.dot operands instead of their values (triton-lang/triton
# #11584, "not supported yet"), and it truncates fp32 -> bf16 casts (its cast_impl passes no
# rounding mode) where the GPU rounds to nearest even. Interpreted, bf16 tiles are widened to
# fp32 before the dot (the same exact products and fp32 sums as the GPU's bf16 dot) and stores
# round explicitly.
_INTERPRETED = tl.constexpr(
    triton.knobs.runtime.interpret
    if hasattr(triton, "knobs")  # triton >= 3.4; before, the variable was read directly
    else os.environ.get("TRITON_INTERPRET", "0") == "1"
)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest even, as on the GPU)."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _row_numbers(ids, offs, ok, start, HAS_IDS: tl.constexpr):
    """int64 row numbers of block positions ``offs``: ``ids[offs]`` (an index, the vocabulary
    order) or ``start + offs``."""
    if HAS_IDS:
        numbers = tl.load(ids + offs, mask=ok, other=0).to(tl.int64)
    else:
        numbers = (start + offs).to(tl.int64)
    return numbers


@triton.jit
def _tile_coords(pid, tiles_r, tiles_c, GROUP: tl.constexpr):
    """Program ``pid`` -> (row tile, column tile), ``GROUP`` row tiles at a time per column tile,
    so that programs running together reuse each other's operands from L2."""
    per_group = GROUP * tiles_c
    first_r = (pid // per_group) * GROUP
    group_rows = tl.minimum(tiles_r - first_r, GROUP)
    return first_r + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _logits_tile(
    hidden, stride_hn, stride_hd, rows, row_ok,
    weight, stride_wv, stride_wd, ids, col_ok,
    bias, D, logit_scale, softcap, temperature,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``z = transform(hidden[rows] @ weight[ids].T + bias[ids])`` for one tile, fp32
    ``[BLOCK_N, BLOCK_V]``; ``rows``/``ids`` are int64 row numbers of hidden/weight."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = hidden + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd
    w_ptrs = weight + ids[None, :] * stride_wv + offs_d[:, None] * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d0
        h = tl.load(h_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = _dot(h, w, acc, DOT_PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    if HAS_BIAS:
        acc += tl.load(bias + ids, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # The same order of operations as LogitTransform.apply_.
    if HAS_SCALE:
        acc = acc * logit_scale
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    if HAS_TEMPERATURE:
        acc = acc / temperature
    return acc


@triton.jit
def _stats_kernel(
    hidden, stride_hn, stride_hd, index, weight, stride_wv, stride_wd, bias, targets, partials,
    N, V, D, row_tiles, vocab_tiles, ranges, logit_scale, softcap, temperature,
    HAS_INDEX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr,
    WANT_MEAN: tl.constexpr, WANT_ENTROPY: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One row tile x one vocabulary range -> partial (max, sum exp(z - max), target logit,
    sum z, sum exp(z - max) * (z - max)) per row, in ``partials[5, ranges, N]``. The ``vocab_tiles``
    tiles of ``BLOCK_V`` entries are dealt out evenly, range ``r`` getting tiles
    ``[r * vocab_tiles // ranges, (r + 1) * vocab_tiles // ranges)``."""
    pid = tl.program_id(0)
    vocab_range = pid // row_tiles
    offs_n = (pid % row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows = _row_numbers(index, offs_n, row_ok, 0, HAS_INDEX)
    if HAS_TARGETS:
        target_ids = tl.load(targets + offs_n, mask=row_ok, other=-1)

    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    target = tl.zeros((BLOCK_N,), tl.float32)
    total = tl.zeros((BLOCK_N,), tl.float32)
    weighted = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = vocab_range * vocab_tiles // ranges * BLOCK_V
    v_end = (vocab_range + 1) * vocab_tiles // ranges * BLOCK_V
    for v0 in range(v_begin, v_end, BLOCK_V):
        ids = v0 + tl.arange(0, BLOCK_V)
        col_ok = ids < V
        ids = ids.to(tl.int64)
        z = _logits_tile(
            hidden, stride_hn, stride_hd, rows, row_ok, weight, stride_wv, stride_wd, ids, col_ok,
            bias, D, logit_scale, softcap, temperature, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP,
            HAS_TEMPERATURE, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        z_or_zero = tl.where(col_ok[None, :], z, 0.0)
        new_max = tl.maximum(running_max, tl.max(tl.where(col_ok[None, :], z, float("-inf")), 1))
        # Rows with no finite logit yet (masked by a -inf bias) are centred on 0, not -inf, as in
        # _blocks._forward_stats.
        centre = tl.where(new_max == float("-inf"), 0.0, new_max)
        # exp(-inf) = 0 for the first tile; clamped so that step * sum_exp below stays 0.
        step = tl.maximum(running_max - centre, _LOWEST)
        rescale = tl.exp(step)
        centred = tl.where(col_ok[None, :], tl.maximum(z - centre[:, None], _LOG_FLOOR), 0.0)
        exp = tl.where(col_ok[None, :], tl.exp(centred), 0.0)
        if WANT_ENTROPY:
            # sum exp(z - m) * (z - m), carried to the new max m as _blocks does: the entropy
            # then needs no difference of the (possibly large) max and the expected logit.
            # Floored logits weigh 0, as underflowed ones do in the naive computation.
            plogp = tl.where(centred > _LOG_FLOOR, exp * centred, 0.0)
            weighted = (weighted + step * sum_exp) * rescale + tl.sum(plogp, 1)
        sum_exp = sum_exp * rescale + tl.sum(exp, 1)
        if WANT_MEAN:
            total += tl.sum(z_or_zero, 1)
        if HAS_TARGETS:
            target += tl.sum(tl.where(ids[None, :] == target_ids[:, None], z_or_zero, 0.0), 1)
        running_max = new_max

    out = partials + vocab_range * N + offs_n
    plane = ranges * N
    tl.store(out, running_max, mask=row_ok)
    tl.store(out + plane, sum_exp, mask=row_ok)
    if HAS_TARGETS:
        tl.store(out + 2 * plane, target, mask=row_ok)
    if WANT_MEAN:
        tl.store(out + 3 * plane, total, mask=row_ok)
    if WANT_ENTROPY:
        tl.store(out + 4 * plane, weighted, mask=row_ok)


@triton.jit
def _grad_logits_kernel(
    hidden, stride_hn, stride_hd, index, weight, stride_wv, stride_wd, vocab_ids, v0, bias,
    targets, lse, p_coef, plogp_coef, target_coef, uniform, grad, bias_part, keep_flags,
    C, S, D, eps, linear_factor, logit_scale, softcap, temperature,
    HAS_INDEX: tl.constexpr, HAS_VOCAB_IDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_P: tl.constexpr, HAS_P_COEF: tl.constexpr,
    HAS_PLOGP: tl.constexpr, HAS_TARGET_COEF: tl.constexpr,
    HAS_UNIFORM: tl.constexpr, STORE_GRAD: tl.constexpr, NEED_BIAS: tl.constexpr,
    FILTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``grad[r, j] = dL/dx`` of block row ``r`` (of ``C``) and shard column ``j`` (of ``S``):
    ``(p * (p_coef + plogp_coef * log p) + target_coef * [id_j == target] + uniform) * dz/dx``.
    Row arguments (index, targets, lse, coefficients) start at the chunk's first row; column
    ``j`` is vocabulary entry ``vocab_ids[j]`` (sorted order) or ``v0 + j``."""
    tiles_c = tl.cdiv(S, TILE)
    tile_r, tile_c = _tile_coords(tl.program_id(0), tl.cdiv(C, TILE), tiles_c, GROUP)
    offs_r = tile_r * TILE + tl.arange(0, TILE)
    offs_c = tile_c * TILE + tl.arange(0, TILE)
    row_ok = offs_r < C
    col_ok = offs_c < S
    rows = _row_numbers(index, offs_r, row_ok, 0, HAS_INDEX)
    ids = _row_numbers(vocab_ids, offs_c, col_ok, v0, HAS_VOCAB_IDS)
    z = _logits_tile(
        hidden, stride_hn, stride_hd, rows, row_ok, weight, stride_wv, stride_wd, ids, col_ok,
        bias, D, logit_scale, softcap, temperature, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP,
        HAS_TEMPERATURE, TILE, TILE, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    valid = row_ok[:, None] & col_ok[None, :]

    g = tl.zeros((TILE, TILE), dtype=tl.float32)
    if HAS_P:
        row_lse = tl.load(lse + offs_r, mask=row_ok, other=0.0)
        log_p = tl.where(valid, tl.maximum(z - row_lse[:, None], _LOG_FLOOR), 0.0)
        p = tl.where(valid, tl.exp(log_p), 0.0)
        factor = tl.zeros((TILE, TILE), dtype=tl.float32)
        if HAS_PLOGP:
            factor += tl.load(plogp_coef + offs_r, mask=row_ok, other=0.0)[:, None] * log_p
        if HAS_P_COEF:
            factor += tl.load(p_coef + offs_r, mask=row_ok, other=0.0)[:, None]
        g = p * factor
    is_target = tl.zeros((TILE, TILE), dtype=tl.int1)
    if HAS_TARGETS:
        row_targets = tl.load(targets + offs_r, mask=row_ok, other=-1)
        is_target = (ids[None, :] == row_targets[:, None]) & valid
    if HAS_TARGET_COEF:
        coef = tl.load(target_coef + offs_r, mask=row_ok, other=0.0)
        g += tl.where(is_target, coef[:, None], 0.0)
    if HAS_UNIFORM:
        g += tl.load(uniform + offs_r, mask=row_ok, other=0.0)[:, None]
    # Chain rule through the transform, as LogitTransform.chain_.
    if HAS_SOFTCAP:
        th = z * (temperature / softcap)
        g = g * (1.0 - th * th)
    g = tl.where(valid, g * linear_factor, 0.0)

    if NEED_BIAS:
        tl.store(bias_part + tile_r * S + offs_c, tl.sum(g, 0), mask=col_ok)
    if STORE_GRAD:
        g_ptrs = grad + offs_r[:, None].to(tl.int64) * S + offs_c[None, :]
        if FILTER:
            keep = tl.max(tl.where(is_target, 1.0, 0.0)) > 0
            if HAS_P:
                keep = keep | (tl.max(p) >= eps)
            tl.store(keep_flags + tile_r * tiles_c + tile_c, keep.to(tl.int8))
            if keep:
                tl.store(g_ptrs, _cast(g, grad.dtype.element_ty), mask=valid)
        else:
            tl.store(g_ptrs, _cast(g, grad.dtype.element_ty), mask=valid)


@triton.jit
def _matmul_step(acc, a, stride_ar, stride_ak, b, b_rows, stride_bk, stride_bc, offs_r, row_ok,
                 offs_c, col_ok, k0, K, HAS_B_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):  # fmt: skip
    """``acc + a[offs_r, k0:k0+BLOCK_K] @ b[b_rows[k0:k0+BLOCK_K], offs_c]``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    k_rows = _row_numbers(b_rows, offs_k, k_ok, 0, HAS_B_ROWS)
    a_ptrs = a + offs_r[:, None].to(tl.int64) * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak
    a_tile = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b_ptrs = b + k_rows[:, None] * stride_bk + offs_c[None, :] * stride_bc
    b_tile = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    return _dot(a_tile, b_tile, acc, DOT_PRECISION)


@triton.jit
def _matmul_kernel(
    a, stride_ar, stride_ak, b, b_rows, stride_bk, stride_bc, out, out_rows, stride_or, lo,
    kept_tiles, kept_counts, R, K, C,
    HAS_B_ROWS: tl.constexpr, HAS_OUT_ROWS: tl.constexpr, HAS_LO: tl.constexpr,
    ACCUMULATE: tl.constexpr, FILTER: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[out_rows[r], c] (+)= sum_k a[r, k] * b[b_rows[k], c]`` for ``r < R``, ``c < C``
    (``out`` has unit column stride, ``lo`` is a contiguous ``[R, C]``), fp32 accumulation over
    ``TILE`` rows x ``BLOCK_C`` columns per program. ``ACCUMULATE`` adds to the compensated pair
    ``out + lo``, else overwrites it. ``FILTER``: the reduction visits only the ``TILE``-wide
    tiles listed in row ``r // TILE`` of ``kept_tiles`` (``[R tiles, K tiles]``, the first
    ``kept_counts[r // TILE]`` entries), ``BLOCK_K`` (dividing ``TILE``) at a time. A list rather
    than a branch per tile keeps the loop free of conditionals, so its loads stay pipelined."""
    tile_r, tile_c = _tile_coords(tl.program_id(0), tl.cdiv(R, TILE), tl.cdiv(C, BLOCK_C), GROUP)
    offs_r = tile_r * TILE + tl.arange(0, TILE)
    offs_c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = offs_r < R
    col_ok = offs_c < C
    acc = tl.zeros((TILE, BLOCK_C), dtype=tl.float32)
    steps_per_tile: tl.constexpr = TILE // BLOCK_K
    if FILTER:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        steps = tl.load(kept_counts + tile_r) * steps_per_tile
    else:
        steps = tl.cdiv(K, BLOCK_K)
    for step in range(0, steps):
        if FILTER:
            k_tile = tl.load(kept_tiles + tile_r * tl.cdiv(K, TILE) + step // steps_per_tile)
            k0 = k_tile * TILE + (step % steps_per_tile) * BLOCK_K
        else:
            k0 = step * BLOCK_K
        acc = _matmul_step(
            acc, a, stride_ar, stride_ak, b, b_rows, stride_bk, stride_bc, offs_r, row_ok,
            offs_c, col_ok, k0, K, HAS_B_ROWS, BLOCK_K, DOT_PRECISION,
        )  # fmt: skip

    rows = _row_numbers(out_rows, offs_r, row_ok, 0, HAS_OUT_ROWS)
    mask = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out + rows[:, None] * stride_or + offs_c[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_LO:
        lo_ptrs = lo + offs_r[:, None].to(tl.int64) * C + offs_c[None, :]
        if ACCUMULATE:
            acc += tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)
        hi = _cast(acc, out.dtype.element_ty)
        tl.store(lo_ptrs, _cast(acc - hi.to(tl.float32), lo.dtype.element_ty), mask=mask)
    tl.store(out_ptrs, _cast(acc, out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Drop-in replacements of the PyTorch block loop


def forward_stats(hidden2d, weight, bias, index, targets, transform, plan, want_mean, want_entropy):
    """``_blocks._forward_stats`` with one fused kernel (``plan`` is not needed: no block of
    logits is ever stored)."""
    n, vocab = plan.rows, weight.shape[0]
    config = _config(hidden2d)
    row_tiles = max(1, triton.cdiv(n, config.tile))
    vocab_tiles = triton.cdiv(vocab, config.tile)
    ranges = max(1, min(vocab_tiles, triton.cdiv(_programs_wanted(hidden2d.device), row_tiles)))
    partials = torch.empty(5, ranges, n, dtype=torch.float32, device=hidden2d.device)
    if n > 0:
        _stats_kernel[(row_tiles * ranges,)](
            hidden2d, *hidden2d.stride(), _contiguous(index, 0, n), weight, *weight.stride(),
            _contiguous(bias, 0, vocab), _contiguous(targets, 0, n), partials,
            n, vocab, hidden2d.shape[1], row_tiles, vocab_tiles, ranges,
            **_transform_args(transform),
            HAS_INDEX=index is not None, HAS_BIAS=bias is not None,
            HAS_TARGETS=targets is not None, WANT_MEAN=want_mean, WANT_ENTROPY=want_entropy,
            BLOCK_N=config.tile, BLOCK_V=config.tile, BLOCK_D=config.block_d,
            DOT_PRECISION=_dot_precision(hidden2d.dtype), num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
    # Merge the ranges as the kernel merges tiles (every range holds at least one tile).
    range_max, range_sum, range_target, range_total, range_weighted = partials
    running_max = range_max.amax(0)
    # A range with no finite logit has max -inf; clamped so that step * range_sum stays finite.
    step = (range_max - running_max).clamp(min=torch.finfo(range_max.dtype).min)
    rescale = step.exp()
    sum_exp = (range_sum * rescale).sum(0)
    target = range_target.sum(0) if targets is not None else None
    mean = range_total.sum(0) / vocab if want_mean else None
    entropy = None
    if want_entropy:
        entropy = sum_exp.log() - ((range_weighted + step * range_sum) * rescale).sum(0) / sum_exp
    return RowStats(sum_exp.log(), None, mean, entropy, max=running_max, target=target)


def _shard_groups(plan, element_bytes: int) -> list[tuple[int, int]]:
    """The plan's shards, consecutive ones merged so that a ``G`` block of ``element_bytes`` per
    entry takes the memory the plan budgets for a PyTorch block."""
    step = max(1, _BYTES_PER_BLOCK_ELEMENT // element_bytes)
    bounds = list(plan.shard_bounds[::step])
    if bounds[-1] != plan.shard_bounds[-1]:
        bounds.append(plan.shard_bounds[-1])
    return list(itertools.pairwise(bounds))


def _filter_eps(dtype: torch.dtype, coef) -> float | None:
    eps = _settings["gradient_filter"]
    if eps is None or coef.uniform is not None:
        return None
    return torch.finfo(dtype).eps / 32 if eps == "auto" else eps


def _vocab_order(hidden2d, weight, bias, index, transform) -> Tensor:
    """Vocabulary ids by descending mean raw logit over the rows (ascending for a negative
    ``logit_scale``; the rest of the transform is increasing): probable entries first, so that
    the tiles the filter keeps are few. Two GEMVs in the input dtype, no host sync."""
    if index is None:
        row_weights = hidden2d.new_full((hidden2d.shape[0],), 1.0 / max(1, hidden2d.shape[0]))
    else:
        row_weights = hidden2d.new_zeros(hidden2d.shape[0])
        row_weights.index_fill_(0, index, 1.0 / max(1, index.numel()))
    mean_logit = torch.mv(weight, torch.mv(hidden2d.T, row_weights)).float()
    if bias is not None:
        mean_logit += bias.float()
    return torch.argsort(mean_logit, descending=(transform.logit_scale or 1.0) > 0)


@dataclass(frozen=True)
class _Rows:
    """Rows ``start:stop`` of a block, of the tensors indexed like ``hidden2d`` (or ``weight``):
    through ``ids``, their row numbers, where an index (or the vocabulary order) selects them,
    else as a slice."""

    start: int
    stop: int
    ids: Tensor | None

    def of(self, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(tensor, row ids)`` for a kernel: ``t`` with ``ids``, or ``t[start:stop]``."""
        return (t, self.ids) if self.ids is not None else (t[self.start : self.stop], None)


def backward_blocks(hidden2d, weight, bias, index, targets, centre, coef, transform, plan, needs):
    """``_blocks._backward_blocks`` with fused kernels (see the module docstring). The kernel
    forms ``log p = z - lse`` and has no separate ``p_delta`` term (fp32 rounding of both)."""
    lse = centre[0] + centre[1]
    coef = coef.folded()
    need_hidden, need_weight, need_bias = needs
    device, dtype, dim = hidden2d.device, hidden2d.dtype, hidden2d.shape[1]
    config = _config(hidden2d)
    shards = _shard_groups(plan, dtype.itemsize)
    width = max(v1 - v0 for v0, v1 in shards)
    eps = _filter_eps(dtype, coef)
    order = _vocab_order(hidden2d, weight, bias, index, transform) if eps is not None else None
    new = {"dtype": dtype, "device": device}
    # The first block of each shard (chunk) overwrites its rows of grad_weight (grad_hidden), so
    # only rows no block visits need zeros: ignored rows of hidden, or all when there is no row.
    some_rows = plan.rows > 0
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden:
        fresh = torch.empty if index is None and some_rows else torch.zeros
        grad_hidden = fresh(hidden2d.shape, **new)
    if need_weight:
        grad_weight = (torch.empty if some_rows else torch.zeros)(weight.shape, **new)
    if need_bias:
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device)
    # Low halves of the compensated sums, where a gradient is summed over several blocks in half
    # precision (fp32 sums are carried in fp32 already).
    half = dtype != torch.float32
    multi_shard, multi_chunk = len(shards) > 1, len(plan.chunks) > 1
    lo_hidden = torch.empty(plan.rows, dim, **new) if need_hidden and half and multi_shard else None
    lo_weight = torch.empty(width, dim, **new) if need_weight and half and multi_chunk else None
    # One block's G, bias partials and filter flags, each a contiguous [rows, columns] per block.
    row_tiles = triton.cdiv(plan.chunk_size, config.tile)
    buffers = _BlockBuffers(
        grad=torch.empty(plan.chunk_size * width if need_hidden or need_weight else 0, **new),
        bias_part=torch.empty(
            row_tiles * width if need_bias else 0, **new | {"dtype": torch.float32}
        ),
        keep=torch.empty(
            row_tiles * triton.cdiv(width, config.tile), **new | {"dtype": torch.int8}
        ),
    )

    for shard_number, (v0, v1) in enumerate(shards):
        vocab = _Rows(v0, v1, order[v0:v1] if order is not None else None)
        for chunk_number, (r0, r1) in enumerate(plan.chunks):
            rows = _Rows(r0, r1, _contiguous(index, r0, r1))
            block, flags = _grad_logits(
                hidden2d, weight, bias, targets, lse, coef, transform, rows, vocab, eps,
                need_bias, grad_bias, buffers, config,
            )  # fmt: skip
            if need_hidden:  # grad_hidden[rows] (+)= G @ weight[vocab], summed over the shards
                lo = _contiguous(lo_hidden, r0, r1)
                _matmul(block, vocab.of(weight), rows.of(grad_hidden), lo, shard_number > 0, flags)
            if need_weight:  # grad_weight[vocab] (+)= G.T @ hidden[rows], summed over the chunks
                lo = _contiguous(lo_weight, 0, v1 - v0)
                flags = flags.T if flags is not None else None
                _matmul(
                    block.T, rows.of(hidden2d), vocab.of(grad_weight), lo, chunk_number > 0, flags
                )
    return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_bias else None


class _BlockBuffers(NamedTuple):
    grad: Tensor
    bias_part: Tensor
    keep: Tensor


def _grad_logits(hidden2d, weight, bias, targets, lse, coef, transform, rows, vocab, eps,
                 need_bias, grad_bias, buffers, config):  # fmt: skip
    """Launch ``_grad_logits_kernel`` for one block, add its bias gradient to ``grad_bias``;
    return the block's ``G`` (``[rows, vocab]`` view of ``buffers.grad``) and, with the filter,
    its per-tile keep flags."""
    r0, r1, v0, v1 = rows.start, rows.stop, vocab.start, vocab.stop
    c, s = r1 - r0, v1 - v0
    tiles_r, tiles_c = triton.cdiv(c, config.tile), triton.cdiv(s, config.tile)
    block = buffers.grad[: c * s].view(c, s) if buffers.grad.numel() else None
    hidden_rows, row_ids = rows.of(hidden2d)
    _grad_logits_kernel[(tiles_r * tiles_c,)](
        hidden_rows, *hidden2d.stride(), row_ids, weight, *weight.stride(), vocab.ids, v0,
        _contiguous(bias, 0, weight.shape[0]), _contiguous(targets, r0, r1),
        _contiguous(lse, r0, r1), _contiguous(coef.p_coef, r0, r1),
        _contiguous(coef.plogp_coef, r0, r1), _contiguous(coef.target_coef, r0, r1),
        _contiguous(coef.uniform, r0, r1), block, buffers.bias_part, buffers.keep, c, s,
        hidden2d.shape[1], 0.0 if eps is None else eps, transform.linear_factor,
        **_transform_args(transform), HAS_INDEX=row_ids is not None,
        HAS_VOCAB_IDS=vocab.ids is not None, HAS_BIAS=bias is not None,
        HAS_TARGETS=targets is not None,
        HAS_P=coef.p_coef is not None or coef.plogp_coef is not None,
        HAS_P_COEF=coef.p_coef is not None, HAS_PLOGP=coef.plogp_coef is not None,
        HAS_TARGET_COEF=coef.target_coef is not None, HAS_UNIFORM=coef.uniform is not None,
        STORE_GRAD=block is not None, NEED_BIAS=need_bias, FILTER=eps is not None,
        GROUP=_GROUP, TILE=config.tile, BLOCK_D=config.block_d,
        DOT_PRECISION=_dot_precision(hidden2d.dtype), num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if need_bias:
        bias_grad = buffers.bias_part[: tiles_r * s].view(tiles_r, s).sum(0)
        if vocab.ids is None:
            grad_bias[v0:v1] += bias_grad
        else:
            grad_bias.index_add_(0, vocab.ids, bias_grad)
    flags = buffers.keep[: tiles_r * tiles_c].view(tiles_r, tiles_c) if eps is not None else None
    return block, flags


def _contiguous(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Rows ``start:stop`` of ``t`` (or None), contiguous as the kernels read them (autograd
    hands out expanded, stride-0 gradients, e.g. of ``.sum()``)."""
    return None if t is None else t[start:stop].contiguous()


def _matmul(a, b_rows, out_rows, lo, accumulate, keep_flags):
    """``out[out_ids] (+)= a @ b[b_ids]`` with ``_matmul_kernel``, where ``b_rows`` and
    ``out_rows`` are ``(tensor, row ids or None for all rows in order)``. ``keep_flags``
    (``[row tiles, reduction tiles]`` of the filter, or None) become, per row tile, the list of
    kept reduction tiles in order and its length."""
    (b, b_ids), (out, out_ids) = b_rows, out_rows
    config = _config(a)
    r, k = a.shape
    c = b.shape[1]
    kept_tiles = kept_counts = None
    if keep_flags is not None:
        keep_flags = keep_flags.contiguous()  # sort keeps a transposed input's strides
        kept_tiles = keep_flags.argsort(dim=1, descending=True, stable=True).to(torch.int32)
        kept_counts = keep_flags.sum(1, dtype=torch.int32)
    _matmul_kernel[(triton.cdiv(r, config.tile) * triton.cdiv(c, config.block_c),)](
        a, *a.stride(), b, b_ids, *b.stride(), out, out_ids, out.stride(0), lo, kept_tiles,
        kept_counts, r, k, c, HAS_B_ROWS=b_ids is not None, HAS_OUT_ROWS=out_ids is not None,
        HAS_LO=lo is not None, ACCUMULATE=accumulate, FILTER=keep_flags is not None,
        GROUP=_GROUP, TILE=config.tile, BLOCK_K=config.block_k, BLOCK_C=config.block_c,
        DOT_PRECISION=_dot_precision(a.dtype), num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
