"""The block engine: per-row softmax statistics of ``hidden @ weight.T`` without the full logits.

The ``[N, V]`` logits are visited in blocks of ``chunk_size`` rows x one vocabulary shard. Each
block is computed by one GEMM, transformed (``logit_scale``, ``softcap``, ``temperature``) in
fp32 and folded into fp32 per-row running statistics with the online log-sum-exp merge:

    m' = max(m, max_v z_v),   s' = s * exp(m - m') + sum_v exp(z_v - m')

so that only ``O(N)`` numbers outlive a block. Everything that consumes logits is built from four
statistics per row (``RowStats``): the log-sum-exp centred on the row maximum, the target's
log-probability, the mean logit and the entropy of the softmax. ``row_stats`` returns them as a
differentiable function of ``hidden``, ``weight`` and ``bias`` (with the row maximum, a constant
offset): its backward pass recomputes each block, forms
``dL/dz = p * (a + b * log p) + c * onehot(target) + d`` from per-row coefficients and multiplies
it back through the two GEMMs, so the loss, log-prob and entropy ops never write their own
backward.

Blocks are walked vocabulary shard by shard (outer) and row chunk by row chunk (inner), so each
shard's weight gradient is finished before the next shard starts and needs no ``[V, D]`` fp32
accumulator. A scalar loss can instead have its gradients computed in the forward pass
(``row_stats(row_loss=...)``, ``_fused_loss_blocks``): row chunks outer, each chunk's logits kept
for the whole vocabulary, 3 GEMMs per block instead of 4, the weight gradient summed in fp32.
These gradients are saved for backward, which returns them scaled (in place, unless the graph
is retained for another backward, which then returns the same gradients).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass, replace
from functools import cache, partial
from typing import NamedTuple

import torch
from torch import Tensor

# Bytes of transient memory one block element costs at the peak of a backward step: the GEMM
# output in half precision (2), its fp32 copy (4), the softmax (4), the half-precision gradient (2).
_BYTES_PER_BLOCK_ELEMENT = 12
_MIN_SHARD = 128
_MAX_CHUNK = 16384
# Vocabulary entries per shard when a row chunk's logits are kept for the whole vocabulary
# (``grad_in_forward``): wide enough for efficient GEMMs, narrow enough that the transient
# buffers beside the kept logits stay small.
_KEPT_SHARD = 4096
# Shard widths are multiples of this many entries, so that every row of a block (and of its
# gradient) starts 64 bytes apart in fp32: CPU GEMMs writing rows at other offsets ran up to 1.5x
# slower (torch 2.13, AVX2: [2048, 2048] x [2048, C] at 82 GFLOP/s for C = 1018, 125 for 1016).
_SHARD_ALIGN = 16
# Numbers of a half-precision gradient product converted to fp32 at a time before they are
# added to an fp32 sum (_HeadGradients): a 1 MiB buffer, beside products of up to D x shard.
_CONVERTED_NUMEL = 2**18

_CPU_GEMM_MODES = ("auto", "model", "fp32")
_settings = {"block_budget": 32 * 2**20, "cpu_gemm": os.environ.get("CHUNKLOGITS_CPU_GEMM", "auto")}
if _settings["cpu_gemm"] not in _CPU_GEMM_MODES:
    raise ValueError(
        f"CHUNKLOGITS_CPU_GEMM: expected one of {_CPU_GEMM_MODES}, got {_settings['cpu_gemm']!r}"
    )
_settings["compile"] = os.environ.get("CHUNKLOGITS_COMPILE", "0")
if _settings["compile"] not in ("0", "1"):
    raise ValueError(f"CHUNKLOGITS_COMPILE: expected '0' or '1', got {_settings['compile']!r}")
_settings["compile"] = _settings["compile"] == "1"


def set_block_budget(nbytes: int) -> int:
    """Set the transient memory (bytes) one logits block may use when ``shards``/``chunk_size``
    are left to ``None``; returns the previous budget. The default, 32 MiB, keeps blocks large
    enough for efficient GEMMs and the working memory far below the weight's size."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 2**16:
        raise ValueError(f"nbytes: expected an int >= 65536, got {nbytes!r}")
    previous = _settings["block_budget"]
    _settings["block_budget"] = nbytes
    return previous


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap(logit_scale * x) / temperature`` applied to a raw fp32 block ``x``, with
    ``softcap(u) = c * tanh(u / c)`` (Gemma-2/3), ``logit_scale`` for Cohere (``logit_scale``)
    and Granite (``1 / logits_scaling``). ``temperature``: a float, or per-row temperatures, a
    ``[rows, 1]`` tensor in the statistics' dtype (the rows the blocks walk, ``hidden2d[index]``),
    which ``rows(r0, r1)`` slices for the block of rows ``[r0, r1)``; a float is the case of
    every row alike."""

    logit_scale: float | None = None
    softcap: float | None = None
    temperature: float | Tensor = 1.0

    @property
    def per_row(self) -> bool:
        """Whether the temperature is a tensor of per-row temperatures."""
        return isinstance(self.temperature, Tensor)

    @property
    def tempered(self) -> bool:
        """Whether ``z`` is divided by a temperature (not by a float 1)."""
        return self.per_row or self.temperature != 1.0

    def rows(self, r0: int, r1: int) -> LogitTransform:
        """The transform of the block of rows ``[r0, r1)``: itself for a float temperature."""
        return replace(self, temperature=self.temperature[r0:r1]) if self.per_row else self

    def selected(self, index: Tensor | None) -> LogitTransform:
        """The transform of the rows ``index`` of these (None: all): itself for a float."""
        if index is None or not self.per_row:
            return self
        return replace(self, temperature=self.temperature[index])

    def apply_(self, x: Tensor, tanh: Tensor | None = None) -> Tensor:
        """Transform a raw block in place and return it. ``tanh``: None, or a tensor of ``x``'s
        shape that receives the softcap's ``tanh(u / c)`` (for ``chain_``)."""
        if self.logit_scale is not None:
            x.mul_(self.logit_scale)
        if self.softcap is not None:
            x.div_(self.softcap).tanh_()
            if tanh is not None:
                tanh.copy_(x)
            x.mul_(self.softcap)
        # Compiled, the division is fused (and exact at 1): one graph for every temperature.
        if torch.compiler.is_compiling() or self.tempered:
            x.div_(self.temperature)
        return x

    @property
    def linear_factor(self) -> float | Tensor:
        """``dz/dx`` when there is no softcap (the transform is then linear); ``[rows, 1]``
        with per-row temperatures."""
        return (self.logit_scale or 1.0) / self.temperature

    def chain_(self, grad: Tensor, z: Tensor, tanh: Tensor | None = None) -> Tensor:
        """Turn ``dL/dz`` into ``dL/dx`` in place, given the transformed block ``z`` and, with a
        softcap, ``apply_``'s ``tanh`` (overwritten), or None to read it off ``z``."""
        if self.softcap is not None:
            # d/du c * tanh(u / c) = 1 - tanh(u / c)^2. Read off z, tanh = z * temperature / c
            # carries z's two more roundings, which 1 - tanh^2 magnifies where tanh ~ 1 (3e-9
            # relative at 1 - tanh^2 = 8e-8 in fp64, three times torch's tanh backward's error):
            # apply_'s own tanh is the naive computation's.
            if tanh is None:
                tanh = z * (self.temperature / self.softcap)
            grad.mul_(tanh.square_().neg_().add_(1.0))
        factor = self.linear_factor
        if torch.compiler.is_compiling() or self.per_row or factor != 1.0:  # as in apply_
            grad.mul_(factor)
        return grad


@dataclass(frozen=True)
class BlockPlan:
    """How ``[rows, vocab]`` is cut: ``chunk_size`` rows per block, vocabulary shard ``i`` is
    ``[shard_bounds[i], shard_bounds[i + 1])``, GEMMs run in ``compute_dtype``; ``compiled``:
    the per-block passes of ``row_stats`` (forward and backward) run compiled
    (``set_block_compile`` when the op planned its blocks)."""

    rows: int
    chunk_size: int
    shard_bounds: tuple[int, ...]
    compute_dtype: torch.dtype
    compiled: bool = False

    @property
    def shards(self) -> list[tuple[int, int]]:
        return list(zip(self.shard_bounds[:-1], self.shard_bounds[1:], strict=True))

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return [
            (r, min(r + self.chunk_size, self.rows)) for r in range(0, self.rows, self.chunk_size)
        ]


def _check_count(
    name: str, value, low: int, high: int | None = None, *, optional: bool = True
) -> None:
    """``value``: an int in ``[low, high]`` (``>= low`` without ``high``), or None when
    ``optional`` (a count the blocking chooses, such as ``shards``)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        expected = "an int or None" if optional else "an int"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an int {bound}, got {value}")


def plan_blocks(
    rows: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    shards: int | None = None,
    chunk_size: int | None = None,
    bytes_per_element: int = _BYTES_PER_BLOCK_ELEMENT,
    dim: int = 0,
    backward: bool = True,
    kept_vocab: int | None = None,
    kept_rows: int = 1,
) -> BlockPlan:
    """Choose the block shape. Explicit ``shards``/``chunk_size`` win; otherwise as many rows per
    block as the budget allows with shards of at least ``_MIN_SHARD`` vocabulary entries, then the
    widest shards the budget leaves room for. ``bytes_per_element``: the transient memory one block
    element costs the caller (the default is the backward pass's). ``dim``: the hidden size, for
    the copies beside the block: when the GEMMs run in another dtype than the inputs', the
    converted weight shard (``width x dim``) and row chunk (``chunk x dim``); with ``backward``,
    the shard's weight gradient in fp32 (``width x dim``: the accumulator over row chunks, or the
    product before its rounding to the weight's dtype). ``kept_vocab``: plan for
    ``_fused_loss_blocks``, which keeps a row chunk's fp32 logits for ``kept_vocab`` vocabulary
    entries (this rank's slice, or the whole vocabulary under vocabulary parallelism, so that
    every rank cuts the same chunks) beside one transient block of a shard of at most
    ``_KEPT_SHARD`` entries; ``kept_rows``: the fewest rows per chunk it may take then, whatever
    the budget."""
    _check_count("shards", shards, 1, vocab)
    _check_count("chunk_size", chunk_size, 1)
    compute_dtype = block_compute_dtype(dtype, device)
    budget = _settings["block_budget"]
    # Bytes per row of the row chunk's copy, and per vocabulary entry of the shard's copies.
    row_copy = dim * compute_dtype.itemsize if compute_dtype != dtype else 0
    column_copy = row_copy + (dim * 4 if backward else 0)
    if kept_vocab is not None and shards is None:
        shards = math.ceil(vocab / _KEPT_SHARD)
    bounds = None if shards is None else _even_bounds(vocab, shards)
    if kept_vocab is not None and chunk_size is None:
        row_bytes = kept_vocab * 4 + _widest(bounds) * bytes_per_element + row_copy
        chunk_size = max(1, min(rows, _MAX_CHUNK, max(kept_rows, budget // row_bytes)))
    if chunk_size is None:
        width = _widest(bounds) if bounds is not None else min(vocab, _MIN_SHARD)
        fits = (budget - width * column_copy) // (width * bytes_per_element + row_copy)
        chunk_size = max(1, min(rows, _MAX_CHUNK, fits))
    if bounds is None:
        fits = (budget - chunk_size * row_copy) // (chunk_size * bytes_per_element + column_copy)
        width = max(min(vocab, _MIN_SHARD), fits)
        shards = math.ceil(vocab / width)
        if vocab / shards >= 2 * _SHARD_ALIGN:  # aligning the bounds widens a shard by <= 16
            shards = math.ceil(vocab / (width - _SHARD_ALIGN))
        bounds = _even_bounds(vocab, shards)
    return BlockPlan(rows, chunk_size, bounds, compute_dtype, _settings["compile"])


def _even_bounds(vocab: int, shards: int) -> tuple[int, ...]:
    """``shards`` shards of nearly equal width; with at least ``2 * _SHARD_ALIGN`` entries per
    shard, every bound but the last a multiple of ``_SHARD_ALIGN`` (the nearest to the even
    cut: widths differ from ``vocab / shards`` by at most ``_SHARD_ALIGN``)."""
    step = vocab / shards
    align = _SHARD_ALIGN if step >= 2 * _SHARD_ALIGN else 1
    return (0, *(round(i * step / align) * align for i in range(1, shards)), vocab)


def _widest(bounds: tuple[int, ...]) -> int:
    return max(b - a for a, b in itertools.pairwise(bounds))


def plan_head(rows: int, hidden: Tensor, weight: Tensor, **options) -> BlockPlan:
    """``plan_blocks`` for ``rows`` rows of ``hidden [..., D]`` against ``weight [V, D]``, the
    vocabulary, dtype, device and hidden size read off the tensors; ``options`` as there."""
    return plan_blocks(
        rows, weight.shape[0], hidden.dtype, hidden.device, dim=hidden.shape[-1], **options
    )


def set_cpu_gemm_dtype(mode: str) -> str:
    """Choose the dtype of the block GEMMs for half-precision (fp16/bf16) inputs on CPU; returns
    the previous mode. ``"auto"`` (the default, or the environment variable
    ``CHUNKLOGITS_CPU_GEMM`` at import): the inputs' dtype where the CPU multiplies it natively
    (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16), else fp32 (an AVX2-only CPU multiplies bf16
    about 100 times slower than fp32 in torch 2.13). ``"model"``: always the inputs' dtype.
    ``"fp32"``: always fp32. Results do not depend on the choice beyond fp32 rounding: decisions
    (argmax, top-k/top-p/min-p membership, ties) are taken on the logits rounded to the model
    dtype either way. Accelerators always run the inputs' dtype."""
    if mode not in _CPU_GEMM_MODES:
        raise ValueError(f"mode: expected one of {_CPU_GEMM_MODES}, got {mode!r}")
    previous = _settings["cpu_gemm"]
    _settings["cpu_gemm"] = mode
    return previous


def set_block_compile(flag: bool) -> bool:
    """Run the per-block elementwise passes as ``torch.compile``d functions (``True``) or as
    eager in-place passes (``False``, the default, or the environment variable
    ``CHUNKLOGITS_COMPILE=1`` at import); returns the previous setting. An op follows the
    setting in force when it is called, its backward pass included.

    Compiled, the forward fold (the running maximum, sum of exponentials, target logit, logit
    sum and entropy sum of ``row_stats``) and the backward block gradient (``dL/dx`` in the
    GEMMs' dtype, ready for the two gradient GEMMs) each read the raw GEMM output once, in one
    fused loop, instead of converting it to an fp32 block and passing over that once per
    operation. Results equal the eager passes' within fp32 rounding (they share one formula,
    which stays the oracle). The top-k statistic and the samplers, which take decisions, stay
    eager. Worth it where the eager passes cost as much as the GEMMs: CPUs that multiply the
    inputs' dtype natively.

    Cost: inductor compiles each function on its first call in a process, for all shapes
    (``dynamic=True``) and all values of ``logit_scale``, ``softcap`` and ``temperature``; a
    new GEMM dtype, a softcap or logit scale present or not, or a bias or not compiles once more
    (at most 8 graphs per function; beyond that torch runs it uncompiled). Blocks of a single
    row or column take the eager passes. Measured on 2 shared cores (torch 2.13, the ranges are
    the machine's load, 3 to 8 busy processes): the first call 13-44 s with an empty inductor
    cache (its one-time set-up included), each further graph 3-10 s; a later process finds the
    graphs in inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) and its first call takes
    7-12 s (tracing, which is not cached), each further graph under 1 s."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag: expected a bool, got {type(flag).__name__}")
    previous = _settings["compile"]
    _settings["compile"] = flag
    return previous


def block_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype block GEMMs run in: the inputs' dtype on accelerators and for fp32/fp64; for
    half precision on CPU as ``set_cpu_gemm_dtype`` says, decided from the instruction set
    (never from a timing, which load can flip)."""
    if dtype in (torch.float32, torch.float64) or device.type != "cpu":
        return dtype
    mode = _settings["cpu_gemm"]
    if mode == "model" or (mode == "auto" and _cpu_multiplies_natively(dtype)):
        return dtype
    return torch.float32


@cache
def _cpu_multiplies_natively(dtype: torch.dtype) -> bool:
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    else:
        checks = ("_is_amx_fp16_supported",)
    return any(getattr(cpu, check, lambda: False)() for check in checks)


class RowStats(NamedTuple):
    """Per-row statistics of ``z = transform(hidden @ weight.T + bias)`` over the vocabulary.

    ``max``: the row maximum ``m`` (``-inf`` for a row of ``-inf`` logits; the Triton kernels may
    give another constant offset), not differentiable; ``log_sum``: ``log(sum(exp(z - m)))``,
    so that ``lse = m + log_sum`` (``d log_sum / dz = softmax(z)``: ``m`` is a constant offset);
    ``logprob``: ``log_softmax(z)[target]``, formed as ``(z[target] - m) - log_sum`` (exact for
    the top token, where ``z[target] - lse`` would lose ``eps * |lse|``); ``mean``: ``z.mean()``;
    ``entropy``: ``-(softmax(z) * log_softmax(z)).sum()``; ``top``: the ``TopLogits`` (the
    ``top_k`` largest logits, chosen on the model's own logits). Unrequested ones are ``None``.
    ``target``: the raw target logit ``z[target]``, which the engine's passes (and
    ``VocabSlice.combine``) carry until ``finished`` turns it into ``logprob``.
    """

    log_sum: Tensor
    logprob: Tensor | None
    mean: Tensor | None
    entropy: Tensor | None
    top: TopLogits | None = None
    max: Tensor | None = None
    target: Tensor | None = None

    @property
    def lse(self) -> Tensor:
        """``logsumexp(z)``: ``max + log_sum``."""
        return self.max + self.log_sum

    def log_softmax_at(self, logits: Tensor) -> Tensor:
        """``logits - lse`` for logits ``[N, ...]`` of these rows, formed as
        ``(logits - max) - log_sum``: no cancellation of ``lse`` against a logit near it. NaN
        in a row holding a +inf logit (lse +inf), as torch's ``log_softmax``."""
        shape = (*self.max.shape, *(1,) * (logits.dim() - self.max.dim()))
        row_max = self.max.view(shape)
        out = (logits - row_max) - self.log_sum.view(shape)
        return out.masked_fill_(row_max == math.inf, math.nan)

    def finished(self) -> RowStats:
        """These statistics with the raw target logit turned into ``logprob``."""
        if self.target is None:
            return self
        return self._replace(logprob=self.log_softmax_at(self.target), target=None)


class TopLogits(NamedTuple):
    """The ``k`` largest logits of each row, chosen on the logits the model's own head returns
    (``decision``: its model-dtype logits with the head's transform applied in that dtype, as
    fp32, descending; for fp32/fp64 inputs simply ``z``), not differentiable. ``index``: their
    vocabulary indices ``[N, k]`` (equal decisions by ascending index); ``value``:
    ``z`` at them, at fp32 accuracy; ``target_decision``: the target's decision logit ``[N]``
    (None without targets). Rows with fewer than ``k`` entries are padded with ``-inf``. A NaN
    decision ranks as ``-inf`` (among equal ones by ascending index) and is stored as ``-inf``;
    ``value`` keeps its NaN."""

    decision: Tensor
    index: Tensor
    value: Tensor
    target_decision: Tensor | None

    def above_target(self) -> Tensor:
        """``[N]`` int64: how many logits exceed the target's decision logit, counted up to
        ``k`` (``k`` means ``k`` or more)."""
        return (self.decision > self.target_decision[:, None]).sum(1)


class _Rows:
    """The rows of ``hidden2d`` selected by ``index`` (all rows when ``None``), served chunk by
    chunk in the compute dtype. With a single chunk it is gathered once and reused for every
    shard; with several, each is gathered when needed (a ``chunk x D`` copy beside a
    ``chunk x shard x D`` GEMM)."""

    def __init__(self, hidden2d: Tensor, index: Tensor | None, plan: BlockPlan):
        self.hidden2d, self.index, self.dtype = hidden2d, index, plan.compute_dtype
        self.chunks = plan.chunks
        self._single = self._load(*self.chunks[0]) if len(self.chunks) == 1 else None

    def _load(self, r0: int, r1: int) -> Tensor:
        rows = self.hidden2d[r0:r1] if self.index is None else self.hidden2d[self.index[r0:r1]]
        return rows.to(self.dtype)

    def __iter__(self):
        for r0, r1 in self.chunks:
            yield r0, r1, self._single if self._single is not None else self._load(r0, r1)


class _Workspace:
    """Flat buffers, one per role and dtype, reused by every block of a pass: blocks allocate
    nothing, so a pass costs no allocator traffic or page faults beyond its first block."""

    def __init__(self, plan: BlockPlan, device: torch.device):
        widest = max(v1 - v0 for v0, v1 in plan.shards)
        self.numel, self.device, self._buffers = (
            min(plan.chunk_size, plan.rows) * widest,
            device,
            {},
        )

    def get(self, role: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        # The compiled passes' blocks (set_block_compile) take role z in the GEMMs' dtype, and
        # their blocks of one row take it in fp32 (_compilable).
        buffer = self._buffers.get((role, dtype))
        if buffer is None:
            buffer = torch.empty(self.numel, dtype=dtype, device=self.device)
            self._buffers[role, dtype] = buffer
        return buffer[: rows * cols].view(rows, cols)

    def kept(self, shard: int) -> _KeptBlock:
        """A view of this workspace in which shard ``shard``'s logits block (role ``z``) has a
        buffer of its own, so that a row chunk's blocks of every shard outlive one another."""
        return _KeptBlock(self, shard)


class _KeptBlock(NamedTuple):
    work: _Workspace
    shard: int

    def get(self, role: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        return self.work.get(f"z{self.shard}" if role == "z" else role, rows, cols, dtype)


class _Fresh:
    """The workspace of the compiled block functions: a new tensor per request. Inside
    ``torch.compile`` these are intermediates, which inductor fuses away: no block is written."""

    def __init__(self, device: torch.device):
        self.device = device

    def get(self, role: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        return torch.empty(rows, cols, dtype=dtype, device=self.device)


@cache
def _compiled(function):
    """``torch.compile(function, dynamic=True)``, made once per process. Its graphs, compiled on
    first use, serve every block shape and every value of the float options (the transform's);
    another dtype or structure of the options (a softcap or none) compiles another."""
    return torch.compile(function, dynamic=True)


def _shard_params(weight, bias, v0, v1, plan):
    w = weight[v0:v1].to(plan.compute_dtype)
    b = None if bias is None else bias[v0:v1].to(plan.compute_dtype)
    return w, b


def _block_logits(
    h, w, b, transform: LogitTransform, work: _Workspace, stat_dtype, rounded_to=None, tanh=None
) -> Tensor:
    """``transform(h @ w.T + b)`` in ``stat_dtype``, written into the workspace's ``z``.

    ``rounded_to``: None, or the model's dtype, to get the logits the model's own head returns
    whatever dtype the GEMM ran in: the product is rounded to that dtype (as ``F.linear``
    returns it) and the transform's scale and softcap are applied in that dtype, op by op as a
    transformers forward applies them, before the conversion to ``stat_dtype`` and the division
    by the temperature (which ``generate()`` applies in fp32). Decisions (argmax, top-k, ties)
    are taken on these values, so that they do not depend on the CPU. ``tanh``: as in
    ``LogitTransform.apply_`` (without ``rounded_to``)."""
    z = work.get("z", h.shape[0], w.shape[0], stat_dtype)
    raw = z if h.dtype == stat_dtype else work.get("raw", h.shape[0], w.shape[0], h.dtype)
    # The bias is added inside the GEMM, rounded once with the product, as the model's own
    # ``nn.Linear`` head does.
    if b is None:
        torch.mm(h, w.T, out=raw)
    else:
        torch.addmm(b, h, w.T, out=raw)
    if rounded_to is None or rounded_to == stat_dtype:
        if raw is not z:
            z.copy_(raw)
        return transform.apply_(z, tanh)
    z.copy_(_model_rounded_(raw, transform, work, rounded_to))
    if transform.tempered:
        z.div_(transform.temperature)
    return z


def _compilable(rows: int, cols: int) -> bool:
    """Whether a block of this shape takes the compiled passes where they are on. A block of one
    row or column would compile a graph of its own (torch specialises sizes 0 and 1), and its
    passes cost nothing beside its GEMM: it takes the eager ones."""
    return rows > 1 and cols > 1


def _block_input(
    h, w, b, transform: LogitTransform, work, stat_dtype, compiled: bool, tanh=None
) -> Tensor:
    """The block the per-block passes take: eager, ``z`` (``_block_logits``, ``tanh`` as there);
    compiled, the raw GEMM output ``h @ w.T + b`` in the GEMMs' dtype (the workspace's ``z``),
    which they convert and transform themselves."""
    if compiled and _compilable(h.shape[0], w.shape[0]):
        return _block_logits(h, w, b, LogitTransform(), work, h.dtype)
    return _block_logits(h, w, b, transform, work, stat_dtype, tanh=tanh)


def _model_rounded_(raw: Tensor, transform: LogitTransform, work: _Workspace, rounded_to):
    """The logits the model's own head returns for the raw block ``raw`` (``h @ w.T + b``):
    rounded to ``rounded_to`` (into the workspace's ``model`` buffer, or ``raw`` itself in place
    when it has that dtype), then the transform's scale and softcap applied in that dtype."""
    model = raw
    if raw.dtype != rounded_to:
        model = work.get("model", *raw.shape, rounded_to).copy_(raw)
    return replace(transform, temperature=1.0).apply_(model)


def log_floor(dtype: torch.dtype) -> float:
    """``log(finfo(dtype).tiny) + 1``: the lowest exponent ``_floor_`` lets reach ``exp`` (the
    Triton kernels use the fp32 value)."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _floor_(x: Tensor) -> Tensor:
    """Raise ``x`` (logits minus a row maximum or log-sum-exp, so ``<= 0``) in place to
    ``log_floor(x.dtype)`` before it is exponentiated, so that ``exp`` stays a normal number.
    CPU ``exp`` is 30 to 80 times slower on arguments whose result is subnormal or zero (torch
    2.13, AVX-512: 1.3 ms for a 1024 x 2730 fp32 block, 40 to 115 ms when its values lie 90 or
    more below 0), and logits that far below the row maximum are common at low temperatures.
    It changes each ``exp`` by less than ``3 * tiny`` (4e-38 in fp32), far below the rounding of
    the sums and gradients it enters, and keeps ``exp(x) * x`` finite where a bias of ``-inf``
    masks tokens; the entropy's sum of ``exp(x) * x`` leaves the floored terms out (a one-hot
    row's entropy, 1e-185, is then 0 as the naive computation's, not V * 3e-36)."""
    return x.clamp_(min=log_floor(x.dtype))


def _target_in_shard(targets: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """(mask of rows whose target is in [v0, v1), column of that target clamped into the shard)."""
    inside = (targets >= v0) & (targets < v1)
    return inside, (targets - v0).clamp_(0, v1 - v0 - 1)


class _FoldState(NamedTuple):
    """Running statistics of some rows, ``[rows]`` each, ``None`` where not kept: the maximum
    ``m``, ``sum_v exp(z_v - m)``, the target logit, ``sum_v z_v`` and ``weighted =
    sum_v exp(z_v - m) * (z_v - m)``: the entropy is ``log(sum_exp) - weighted / sum_exp``, with
    no cancellation of the (possibly large) max between lse and the expected logit."""

    max: Tensor
    sum_exp: Tensor
    target: Tensor | None
    total: Tensor | None
    weighted: Tensor | None


def _centre(row_max: Tensor) -> Tensor:
    """What ``_fold_block`` subtracts from a row before ``exp``: its running maximum, or 0 for a
    row with no finite logit yet (a -inf bias masks tokens), so that its ``z - max`` is -inf,
    not NaN (the zero rescale of the next finite maximum drops what it summed)."""
    return row_max.masked_fill(row_max == -math.inf, 0.0)


def _fold_block(z: Tensor, state: _FoldState, inside, column, work, keep: bool) -> _FoldState:
    """``state`` with the transformed block ``z`` (its rows, in the statistics' dtype) folded in
    by the online merge; the target logit is ``z`` at ``column`` in the rows where ``inside``.
    ``keep``: leave ``z`` intact (it is used again), else it is overwritten. The one formula of
    both passes: eagerly on the workspace's buffers, and inside ``torch.compile`` (``_fold_raw``)
    on ``_Fresh`` ones, where the in-place ops and buffers fuse into one loop over the block."""
    target = state.target
    if target is not None:
        target = torch.where(inside, z.gather(1, column[:, None]).squeeze(1), target)
    total = None if state.total is None else state.total + z.sum(1)
    new_max = torch.maximum(state.max, z.amax(1))
    centre = _centre(new_max)
    # exp(-inf) = 0 for the first block; clamped so that -inf * 0 below stays 0.
    step = (state.max - centre).clamp_(min=torch.finfo(z.dtype).min)
    rescale = step.exp()
    if keep:
        centred = torch.sub(z, centre[:, None], out=work.get("centred", *z.shape, z.dtype))
    else:
        centred = z.sub_(centre[:, None])
    _floor_(centred)
    weighted = state.weighted
    if weighted is None:
        exp = centred.exp_()
    else:
        exp = torch.exp(centred, out=work.get("exp", *z.shape, z.dtype))
        # Floored logits weigh 0 in the entropy, as underflowed ones do in the naive computation:
        # their exp(floor) * floor (-3e-36 each) would be the whole entropy of a one-hot row.
        centred.masked_fill_(centred <= log_floor(z.dtype), 0.0)
        weighted = (weighted + step * state.sum_exp) * rescale + torch.linalg.vecdot(exp, centred)
    sum_exp = state.sum_exp * rescale + exp.sum(1)
    return _FoldState(new_max, sum_exp, target, total, weighted)


def _fold_raw(raw: Tensor, state: _FoldState, inside, column, *, transform) -> _FoldState:
    """``_fold_block`` of the raw GEMM output ``raw`` (``h @ w.T + b`` in the GEMMs' dtype),
    converted and transformed inside: the function ``set_block_compile`` compiles."""
    z = transform.apply_(raw.to(state.max.dtype, copy=True))
    return _fold_block(z, state, inside, column, _Fresh(raw.device), keep=False)


class _RunningStats:
    """Per-row fp32 running statistics of the blocks folded so far (the online log-sum-exp
    merge of the module docstring): what ``_forward_stats`` and ``_fused_loss_blocks`` share.
    ``compile_with``: None to fold transformed blocks eagerly, or the transform, to fold raw GEMM
    outputs by the compiled ``_fold_raw`` (``set_block_compile``)."""

    def __init__(
        self, n: int, targets, want_mean: bool, want_entropy: bool, like: Tensor, compile_with
    ):
        new = {"device": like.device, "dtype": torch.promote_types(like.dtype, torch.float32)}
        self.dtype = new["dtype"]
        self.requested = (targets is not None, want_mean, want_entropy)
        self.compiled = None
        if compile_with is not None:
            # One compiled fold serves every op: the statistics not requested are computed too,
            # a few flops per logit instead of a compile per combination (tens of seconds).
            self.compiled = partial(_compiled(_fold_raw), transform=compile_with)
            if targets is None:  # no row's target is in any shard
                targets = torch.full((n,), -1, device=like.device)
            want_mean = want_entropy = True
        self.targets = targets
        self.state = _FoldState(
            torch.full((n,), -math.inf, **new),
            torch.zeros(n, **new),
            torch.zeros(n, **new) if targets is not None else None,
            torch.zeros(n, **new) if want_mean else None,
            torch.zeros(n, **new) if want_entropy else None,
        )

    def logits(self, h: Tensor, w: Tensor, b, transform: LogitTransform, work) -> Tensor:
        """The block ``fold`` takes for rows ``h`` and shard ``w``, ``b`` in ``work``."""
        return _block_input(h, w, b, transform, work, self.dtype, self.compiled is not None)

    def fold(self, block: Tensor, r0: int, r1: int, v0: int, v1: int, work, keep: bool) -> None:
        """Fold ``block`` (rows ``[r0, r1)``, vocabulary ``[v0, v1)``, from ``logits``) into the
        statistics. ``keep``: leave it intact (it is used again), else it may be overwritten."""
        rows = slice(r0, r1)
        state = _FoldState(*(None if s is None else s[rows] for s in self.state))
        inside = column = None
        if self.targets is not None:
            inside, column = _target_in_shard(self.targets[rows], v0, v1)
        if self.compiled is None or not _compilable(*block.shape):
            folded = _fold_block(block, state, inside, column, work, keep)
        else:
            # Fresh [rows] inputs: views and tensors of their own would compile separately.
            folded = self.compiled(block, _FoldState(*(s.clone() for s in state)), inside, column)
        for kept, value in zip(state, folded, strict=True):
            if kept is not None:
                kept.copy_(value)

    def stats(self, vocab: int, rows: slice = slice(None)) -> RowStats:
        """The statistics of ``rows`` over a vocabulary of ``vocab`` entries, all folded."""
        has_target, want_mean, want_entropy = self.requested
        max_, sum_exp, target, total, weighted = (
            None if s is None else s[rows] for s in self.state
        )
        # A row holding a +inf logit has lse +inf, as torch.logsumexp's: its centred sum is
        # NaN (inf - inf), its log-sum 0 (its log-probs NaN, as torch's log_softmax).
        log_sum = sum_exp.log().masked_fill_(max_ == math.inf, 0.0)
        return RowStats(
            log_sum,
            None,
            total / vocab if want_mean else None,
            log_sum - weighted / sum_exp if want_entropy else None,
            max=max_,
            target=target if has_target else None,
        )


def _forward_stats(
    hidden2d, weight, bias, index, targets, transform, plan, want_mean, want_entropy, top_k=0
):
    compile_with = transform if plan.compiled and not (top_k or transform.per_row) else None
    running = _RunningStats(plan.rows, targets, want_mean, want_entropy, hidden2d, compile_with)
    rows, work = _Rows(hidden2d, index, plan), _Workspace(plan, hidden2d.device)
    top = None
    if top_k:
        top = _RunningTop(
            plan.rows, top_k, targets is not None, device=hidden2d.device, dtype=running.dtype
        )
    for v0, v1 in plan.shards:
        w, b = _shard_params(weight, bias, v0, v1, plan)
        for r0, r1, h in rows:
            block_transform = transform.rows(r0, r1)
            if top is None:
                z = running.logits(h, w, b, block_transform, work)
            else:
                z, decision = _block_logits_and_decisions(
                    h, w, b, block_transform, work, running.dtype, hidden2d.dtype
                )
                # Read before z is divided by the temperature and folded (``decision`` may be z).
                chunk_targets = None if targets is None else targets[r0:r1]
                top.merge(r0, r1, v0, z, decision, chunk_targets, work, block_transform)
                if block_transform.tempered:
                    z.div_(block_transform.temperature)
            running.fold(z, r0, r1, v0, v1, work, keep=False)
    stats = running.stats(weight.shape[0])
    return stats if top is None else stats._replace(top=top.result())


def _block_logits_and_decisions(h, w, b, transform, work, stat_dtype, model_dtype):
    """``(z, decision)`` of one block, from one GEMM, both without the temperature: ``z``, the
    transform's scale and softcap applied to ``h @ w.T + b`` in ``stat_dtype`` as
    ``_block_logits`` does (the values, once divided by the temperature), and the logits the
    model's own head returns in ``model_dtype`` (``_model_rounded_``: the decisions). The same
    tensor when ``model_dtype`` is ``stat_dtype``. The division by the temperature keeps the
    order in exact arithmetic only: a temperature beyond fp32's range ties every logit at 0."""
    untempered = replace(transform, temperature=1.0)
    if model_dtype == stat_dtype:
        z = _block_logits(h, w, b, untempered, work, stat_dtype)
        return z, z
    raw = _block_logits(h, w, b, LogitTransform(), work, stat_dtype)
    decision = _model_rounded_(raw, transform, work, model_dtype)
    return untempered.apply_(raw), decision


_NO_INDEX = 2**62  # exact in float64 (the ranks' exchange), above any vocabulary index


def _top_columns(decision: Tensor, k: int) -> Tensor:
    """The columns ``[n, k]`` of the ``k`` largest entries of each row of ``decision``, where
    ties at the ``k``-th value go to the smaller columns (``torch.topk`` chooses among them in
    no particular order). The order of the columns within a row is left to the caller."""
    cols = decision.topk(k, dim=1).indices
    kth = decision.gather(1, cols).amin(1, keepdim=True)
    tied = decision == kth
    greater = (decision > kth).sum(1, keepdim=True)
    if bool((greater + tied.sum(1, keepdim=True) == k).all()):  # no tie crosses the k-th place
        return cols
    # Keep the first (k - greater) tied columns of each row: exactly k columns per row.
    chosen = (decision > kth) | (tied & (tied.cumsum(1, dtype=torch.int32) <= k - greater))
    return chosen.nonzero()[:, 1].view(decision.shape[0], k)


def _merge_top(k: int, parts: Sequence[Sequence[Tensor]], *, by_index: bool = True) -> list[Tensor]:
    """The ``k`` largest of the candidates of ``parts`` (a running top-k and a block's, or every
    rank's): each part ``(values, index, *payloads)``, tensors ``[n, m_i]`` (the same number in
    every part, ``sum(m_i) >= k``), the candidates ``j`` of row ``i`` being ``values[i, j]`` at
    vocabulary ``index[i, j]``, carrying ``payloads[..][i, j]``. Returns ``[values, index,
    *payloads]`` of the kept ones, each ``[n, k]``, by descending value.

    ``by_index``: equal values by ascending ``index``, also at the ``k``-th place (of values tied
    there, those of smaller index are kept); placeholders of a running top-k that must lose to
    every real candidate of an equal value take an index above the vocabulary (``_NO_INDEX``).
    Otherwise in ``torch.topk``'s order, which leaves ties in no particular order: for callers
    that never depend on it, as a sort costs several times a ``topk`` on the CPU. NaN ranks
    above every value, as in ``torch.sort`` and ``torch.topk`` (``_RunningTop`` maps it first).

    Naive equivalent (``by_index``)::

        values, index, *payloads = (torch.cat(columns, 1) for columns in zip(*parts))
        for i in range(n):  # each row: its candidates by (-value, index), the first k
            pos = sorted(range(values.shape[1]), key=lambda j: (-values[i, j], index[i, j]))[:k]
            kept = [values[i, pos], index[i, pos], *(p[i, pos] for p in payloads)]
    """
    joined = [torch.cat(columns, 1) for columns in zip(*parts, strict=True)]
    values, index = joined[:2]
    if by_index:  # a sort by index, then a stable sort by value
        order = index.argsort(dim=1)
        by_value = values.gather(1, order).sort(dim=1, descending=True, stable=True).indices
        pos = order.gather(1, by_value[:, :k])
    else:
        pos = values.topk(k, dim=1).indices
    return [t.gather(1, pos) for t in joined]


class _RunningTop:
    """The running ``TopLogits`` of ``n`` rows, merged block by block."""

    def __init__(self, n: int, k: int, with_target: bool, device, dtype):
        self.k = k
        self.decision = torch.full((n, k), -math.inf, device=device, dtype=dtype)
        # Placeholders sort after every real entry of an equal (-inf) decision.
        self.index = torch.full((n, k), _NO_INDEX, dtype=torch.long, device=device)
        self.value = torch.full((n, k), -math.inf, device=device, dtype=dtype)
        self.target = None
        if with_target:
            self.target = torch.full((n,), -math.inf, device=device, dtype=dtype)

    def merge(self, r0, r1, v0, z, decision, targets, work: _Workspace, transform) -> None:
        """Fold in the block of rows ``[r0, r1)``, columns ``[v0, v0 + width)``: ``z`` and
        ``decision`` as ``_block_logits_and_decisions`` gives them, without the temperature
        (read before the caller changes ``z`` in place); the kept values are ``z / temperature``
        (the block's ``transform``'s), rounded as the caller's division of the block. Among
        equal decisions the smaller index is kept. A NaN
        decision ranks as -inf: it is never greater than another logit, as in the naive
        ``(decision > own).sum()`` of the token accuracy (``torch.topk`` would rank it first
        and break the selection's count)."""
        ranked = work.get("ranked", *decision.shape, decision.dtype)
        nan_to_num = {"nan": -math.inf, "posinf": math.inf, "neginf": -math.inf}
        torch.nan_to_num(decision, **nan_to_num, out=ranked)
        cols = _top_columns(ranked, min(self.k, decision.shape[1]))
        block_top = ranked.gather(1, cols).to(self.decision.dtype)
        value = z.gather(1, cols)
        if transform.tempered:
            value.div_(transform.temperature)
        running = (self.decision[r0:r1], self.index[r0:r1], self.value[r0:r1])
        merged = _merge_top(self.k, [running, (block_top, cols + v0, value)])
        for kept, new in zip(running, merged, strict=True):
            kept.copy_(new)
        if targets is not None:
            inside, column = _target_in_shard(targets, v0, v0 + decision.shape[1])
            picked = decision.gather(1, column[:, None]).squeeze(1).to(self.target.dtype)
            self.target[r0:r1] = torch.where(inside, picked, self.target[r0:r1])

    def result(self) -> TopLogits:
        return TopLogits(self.decision, self.index, self.value, self.target)


class _GradCoefficients(NamedTuple):
    """``dL/dz[i, v] = p[i, v] * (p_coef[i] + p_delta[i] + plogp_coef[i] * log p[i, v])
    + target_coef[i] * [v == t_i] + uniform[i]``; ``None`` terms are zero. ``p_delta`` (None
    unless there is a target term) keeps the other terms apart from the target's
    ``p_coef = -target_coef``: the block's ``target_coef * (onehot - p)`` is exact where
    ``p ~ 1``, and ``p * (p_delta + plogp_coef * log p)`` is added to it, so that small terms
    (a z-loss's ``2 * z_loss * lse``, an entropy's gradient) are not lost in the rounding of
    ``p_coef + p_delta`` near 1. ``target_value``: with ``target_coef``, the target's entry
    of ``target_coef * (onehot - p)``, ``-target_coef * expm1(log p_t)`` from the row's
    log-probability: accurate where ``p_t ~ 1`` (``1 - p_t`` of a ``p_t`` rounded near 1 is
    not); the blocks write it in place of ``p_t * p_coef + target_coef``."""

    p_coef: Tensor | None
    plogp_coef: Tensor | None
    target_coef: Tensor | None
    uniform: Tensor | None
    p_delta: Tensor | None = None
    target_value: Tensor | None = None

    def rows(self, r0: int, r1: int) -> _GradCoefficients:
        return _GradCoefficients(*(None if c is None else c[r0:r1] for c in self))

    def folded(self) -> _GradCoefficients:
        """``p_delta`` merged into ``p_coef``, for the kernels that have no separate term."""
        if self.p_delta is None:
            return self
        return self._replace(p_coef=self.p_coef + self.p_delta, p_delta=None)


def _coefficients(stats: RowStats, grads: RowStats, vocab: int) -> _GradCoefficients:
    # d log_sum / dz = p;  d logprob / dz = onehot(t) - p;  d mean / dz = 1 / V;
    # d entropy / dz_v = -p_v * (log p_v + entropy)   (in log p, not z: no cancellation).
    plogp_coef = None
    others = [] if grads.log_sum is None else [grads.log_sum]
    if grads.entropy is not None:
        others.append(-grads.entropy * stats.entropy)
        plogp_coef = -grads.entropy
    p_coef = p_delta = sum(others[1:], others[0]) if others else None
    if grads.logprob is None:
        p_delta = None
    else:  # kept apart from the target's coefficient (see _GradCoefficients)
        # A NaN log-prob marks a row without a distribution (a NaN logit, a +inf one, every
        # logit -inf): torch's log_softmax backward gives NaN at every token of it, also where
        # p = 0 (exp(NaN) * sum(grad)), and so does the coefficient here.
        p_coef = (-grads.logprob).masked_fill_(stats.logprob.isnan(), math.nan)
    target_value = None if grads.logprob is None else p_coef * torch.expm1(stats.logprob)
    uniform = None if grads.mean is None else grads.mean / vocab
    return _GradCoefficients(p_coef, plogp_coef, grads.logprob, uniform, p_delta, target_value)


def _block_grad(
    z, centre, coef: _GradCoefficients, inside, column, transform, work, tanh=None, exp_centre=None
) -> Tensor:
    """``dL/dx`` of the raw block under ``z`` (rows of ``centre = (max, log_sum)`` and
    ``coef``; the target, where ``inside``, at ``column``) in ``z``'s dtype, in the workspace;
    ``tanh``: the softcap's ``tanh(u / c)`` of the block (``LogitTransform.chain_``), or None;
    ``z`` is overwritten unless the softcap's derivative is read off it. The one formula of both
    passes, as ``_fold_block``. ``log p = (z - max) - log_sum``, as the naive log_softmax:
    exact for the top token, where ``z - lse`` loses ``eps * |lse|``.

    ``exp_centre``: None, or ``[rows]``: ``z`` then holds ``exp(z - exp_centre)`` as
    ``_fold_block`` left it (the fused pass folds its kept blocks in place), and ``p`` is that
    times ``exp(exp_centre - max - log_sum)``: a product instead of a second ``exp`` per logit.
    For blocks without a softcap, and coefficients without a ``log p`` term (``plogp_coef``)."""
    shape, dtype = z.shape, z.dtype
    row_max, log_sum = centre
    p_coef = coef.p_coef[:, None] if coef.p_coef is not None else 0.0
    rest = None  # with p_delta: p * (p_delta + plogp_coef * log p), added after the target's entry
    if exp_centre is not None:
        # p = e * f, f = exp(exp_centre - lse) floored as log p is below; e raised to tiny / f
        # first, so that no product is subnormal (as no exp is, _floor_).
        factor = (exp_centre - row_max - log_sum).clamp_(min=log_floor(dtype)).exp_()
        z.clamp_(min=(torch.finfo(dtype).tiny / factor)[:, None])
        if coef.p_delta is None:
            grad = z.mul_(p_coef * factor[:, None])
        else:
            grad = torch.mul(z, factor[:, None], out=work.get("grad", *shape, dtype))
            rest = torch.mul(grad, coef.p_delta[:, None], out=z)
            grad.mul_(p_coef)
    else:
        if transform.softcap is not None and tanh is None:  # its derivative is read off z
            logp = torch.sub(z, row_max[:, None], out=work.get("logp", *shape, dtype))
        else:
            logp = z.sub_(row_max[:, None])
        if coef.p_delta is None and coef.plogp_coef is None:
            # p = exp(z - max) / sum_exp: the division folded into the row's coefficient, so
            # that log p itself is never formed (the floor raised by log_sum keeps p a normal
            # number). No floor in a row holding a +inf logit: p is exactly 0 at its other
            # tokens, as in torch's logsumexp backward (exp(z - inf)), and NaN at the inf.
            floor = (log_sum + log_floor(dtype)).masked_fill(row_max == math.inf, -math.inf)
            logp.clamp_(min=floor[:, None])
            grad = logp.exp_().mul_(p_coef * torch.exp(-log_sum)[:, None])
        else:
            _floor_(logp.sub_(log_sum[:, None]))
            grad = torch.exp(logp, out=work.get("grad", *shape, dtype))
            if coef.p_delta is not None:  # -t * (p - onehot), then the rest (_GradCoefficients)
                if coef.plogp_coef is None:
                    rest = torch.mul(grad, coef.p_delta[:, None], out=logp)
                else:
                    rest = logp.mul_(coef.plogp_coef[:, None]).add_(coef.p_delta[:, None])
                    rest.mul_(grad)
                grad.mul_(p_coef)
            else:
                grad.mul_(logp.mul_(coef.plogp_coef[:, None]).add_(p_coef))
    # p_coef = -target_coef: the target's entry p_t * p_coef + target_coef is target_value.
    if coef.target_coef is not None and torch.compiler.is_compiling():
        # As a comparison that fuses into the loop: a scatter would make inductor write the
        # whole fp32 block first and pass over it again.
        onehot = (torch.arange(shape[1], device=z.device) == column[:, None]) & inside[:, None]
        grad = torch.where(onehot, coef.target_value[:, None], grad)
    elif coef.target_coef is not None:
        kept = grad.gather(1, column[:, None]).squeeze(1)
        grad.scatter_(1, column[:, None], torch.where(inside, coef.target_value, kept)[:, None])
    if rest is not None:
        grad.add_(rest)
    if coef.uniform is not None:
        grad.add_(coef.uniform[:, None])
    return transform.chain_(grad, z, tanh)


def _grad_raw(
    raw, row_max, log_sum, coef, inside, column, out, *, transform, bias: bool
) -> Tensor | None:
    """``_block_grad`` of the raw GEMM output ``raw``, converted and transformed inside, written
    into ``out`` in the GEMMs' dtype; returns its column sums (the bias gradient, in
    ``log_sum``'s dtype) if ``bias``: the function ``set_block_compile`` compiles."""
    z = raw.to(log_sum.dtype, copy=True)
    tanh = None if transform.softcap is None else torch.empty_like(z)
    z = transform.apply_(z, tanh)
    work = _Fresh(raw.device)
    grad = _block_grad(z, (row_max, log_sum), coef, inside, column, transform, work, tanh)
    out.copy_(grad)
    return grad.sum(0) if bias else None


class _BlockGrads:
    """``dL/dx`` of blocks in the GEMMs' dtype, ready for the two gradient GEMMs, and its column
    sums (the bias gradient) when ``need_bias``: eagerly (``_block_grad`` on ``z``), or under
    ``set_block_compile`` by the compiled ``_grad_raw`` on the raw GEMM output."""

    def __init__(self, transform: LogitTransform, plan: BlockPlan, stat_dtype, need_bias: bool):
        self.transform, self.plan, self.stat_dtype = transform, plan, stat_dtype
        self.need_bias = need_bias
        self.compiled = None
        if plan.compiled and not transform.per_row:
            self.compiled = partial(_compiled(_grad_raw), transform=transform, bias=need_bias)

    def rows(self, r0: int, r1: int) -> _BlockGrads:
        """These block gradients for the rows ``[r0, r1)``: a copy with their slice of per-row
        temperatures (which take the eager passes), else themselves."""
        if not self.transform.per_row:
            return self
        block_grads = copy(self)
        block_grads.transform = self.transform.rows(r0, r1)
        return block_grads

    def logits(self, h: Tensor, w: Tensor, b, work) -> Tensor:
        """The block ``__call__`` takes for rows ``h`` and shard ``w``, ``b`` in ``work`` (and,
        with a softcap, its ``tanh``: ``__call__(..., tanh=True)``)."""
        compiled = self.compiled is not None
        eager = not (compiled and _compilable(h.shape[0], w.shape[0]))
        tanh = self._tanh(work, h.shape[0], w.shape[0]) if eager else None
        return _block_input(h, w, b, self.transform, work, self.stat_dtype, compiled, tanh)

    def _tanh(self, work, rows: int, cols: int) -> Tensor | None:
        """The workspace's buffer of an eager block's softcap ``tanh``, or None."""
        if self.transform.softcap is None:
            return None
        return work.get("tanh", rows, cols, self.stat_dtype)

    def __call__(
        self, block, centre, coef: _GradCoefficients, targets, v0, v1, work, tanh=False,
        exp_centre=None,
    ):  # fmt: skip
        """``(dL/dx, column sums or None)`` of ``block`` (overwritten) of the rows of ``centre =
        (max, log_sum)``, ``coef``, ``targets`` and vocabulary ``[v0, v1)``; ``tanh``: whether
        ``block`` comes from ``logits`` with its ``tanh``, else it is a transformed block of
        ``_block_logits`` (the fused pass's kept ones) whose softcap's derivative is read off
        it; ``exp_centre``: as in ``_block_grad`` (eager blocks only)."""
        inside = column = None
        if targets is not None:
            inside, column = _target_in_shard(targets, v0, v1)
        compute_dtype = self.plan.compute_dtype
        if self.compiled is None or not _compilable(*block.shape):
            tanh = self._tanh(work, *block.shape) if tanh else None
            grad = _block_grad(
                block, centre, coef, inside, column, self.transform, work, tanh, exp_centre
            )
            column_sums = grad.sum(0) if self.need_bias else None
            if compute_dtype != grad.dtype:
                grad = work.get("raw", *grad.shape, compute_dtype).copy_(grad)
            return grad, column_sums
        # One compiled gradient serves every op: absent terms are zero (a few flops per logit
        # instead of a compile per combination); fresh [rows] inputs, as in _RunningStats.fold.
        row_max, log_sum = centre
        if targets is None:
            no_target = torch.full_like(log_sum, -1, dtype=torch.long)
            inside, column = _target_in_shard(no_target, v0, v1)
        coef = _GradCoefficients(
            *(torch.zeros_like(log_sum) if c is None else c.clone() for c in coef)
        )
        out = work.get("gemm_grad", *block.shape, compute_dtype)
        return out, self.compiled(
            block, row_max.clone(), log_sum.clone(), coef, inside, column, out
        )


def _hidden_grad(grad_rows: Tensor, hidden2d: Tensor, index: Tensor | None) -> Tensor:
    """The gradient of ``hidden2d`` in its dtype from that of its selected rows (fp32)."""
    grad_hidden = torch.zeros_like(hidden2d)
    if index is None:
        grad_hidden.copy_(grad_rows)
    else:
        grad_hidden[index] = grad_rows.to(hidden2d.dtype)
    return grad_hidden


def _backward_blocks(hidden2d, weight, bias, index, targets, centre, coef, transform, plan, needs):
    """The gradients ``(hidden2d, weight, bias)`` (None where ``needs`` says so) of the blocks'
    ``dL/dz`` (``_block_grad``), from the rows' ``centre = (max, log_sum)`` ``[N]`` each.

    With half-precision GEMMs, each block's product (``grad @ w``, ``grad.T @ h``) comes back
    rounded to that dtype before it is added to the fp32 sum over shards (hidden) or row chunks
    (weight): where those products nearly cancel (a confident row's top token and its target in
    different shards), the sum carries the products' rounding, up to 10x the naive single
    GEMM's (a case: 0.035 against 0.0039 in bf16). Recovering it by a second GEMM per block
    costs 17% of a bf16 loss step on an AVX512-BF16 CPU; fp32 block GEMMs
    (``set_cpu_gemm_dtype("fp32")``) do not round the products."""
    row_max, log_sum = centre
    stat_dtype = log_sum.dtype
    rows, work = _Rows(hidden2d, index, plan), _Workspace(plan, hidden2d.device)
    sink = _HeadGradients(hidden2d, weight, bias, index, plan, needs, stat_dtype)
    block_grads = _BlockGrads(transform, plan, stat_dtype, needs[2])
    for v0, v1 in plan.shards:
        w, b = _shard_params(weight, bias, v0, v1, plan)
        sink.start_shard(v0, v1)
        for r0, r1, h in rows:
            rows_grads = block_grads.rows(r0, r1)
            block = rows_grads.logits(h, w, b, work)
            chunk_targets = None if targets is None else targets[r0:r1]
            rows_centre = (row_max[r0:r1], log_sum[r0:r1])
            grad, column_sums = rows_grads(
                block, rows_centre, coef.rows(r0, r1), chunk_targets, v0, v1, work, tanh=True
            )
            sink.add(grad, h, w, r0, r1, v0, v1, work, column_sums)
        sink.finish_shard(v0, v1)
    return sink.result()


def _loss_and_grads(row_loss, stats: RowStats, row_weight) -> tuple[Tensor, RowStats, Tensor]:
    """``row_loss(stats, row_weight).sum()`` and its gradients with respect to the statistics
    (the per-row coefficients of a gradient pass) and to ``row_weight`` (None when it is None),
    by autograd on ``O(rows)`` numbers: the caller's one formula of its loss serves both the
    value and the gradient."""
    with torch.enable_grad():
        differentiable = [None if s is None else s.detach().requires_grad_() for s in stats[:4]]
        leaves = stats._replace(**dict(zip(RowStats._fields, differentiable, strict=False)))
        weight_leaf = None if row_weight is None else row_weight.detach().requires_grad_()
        total = row_loss(leaves, weight_leaf).sum()
        present = [s for s in (*differentiable, weight_leaf) if s is not None]
        grads = iter(torch.autograd.grad(total, present, allow_unused=True))
    stat_grads = RowStats(*(None if s is None else next(grads) for s in differentiable))
    return total.detach(), stat_grads, next(grads, None)


class _FusedGrads(NamedTuple):
    """The gradients ``_fused_loss_blocks`` accumulates, in fp32 (fp64 for fp64 inputs), for a
    loss gradient of 1: of the selected rows of hidden ``[N, D]``, of weight ``[V, D]``, of
    bias ``[V]``, of the per-row weights ``[N]``; ``None`` where not needed."""

    rows: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    row_weight: Tensor | None


def _fused_loss_blocks(
    hidden2d, weight, bias, index, targets, transform, plan, want_mean, want_entropy, row_loss,
    row_weight, needs, vocab_parallel,
):  # fmt: skip
    """``(stats, loss, grads)``: the ``RowStats`` of ``_forward_stats``, the scalar
    ``row_loss(stats, row_weight).sum()`` and its gradients (``_FusedGrads``), in one pass;
    ``row_loss`` is called chunk by chunk, with the chunk's rows of ``row_weight`` ``[N]`` (or
    None). ``needs``: which of (hidden, weight, bias, row_weight) want a gradient.

    Row chunks outer, vocabulary inner: a chunk's blocks are computed once, folded into its
    statistics, kept (fp32, ``chunk x V``, one workspace buffer per shard: as ``exp(z -
    centre)``, folded in place, where no softcap or entropy needs ``z`` itself; under
    ``set_block_compile`` the raw GEMM output, in the GEMMs' dtype) until its log-sum-exp
    is known (combined over the ranks' slices under vocabulary parallelism), then turned into
    ``dL/dx`` and multiplied into the gradients: 3 GEMMs of ``2 * chunk * V * D`` per chunk
    instead of the 4 of a forward pass followed by a recomputing backward. The weight gradient
    is summed over the chunks in an fp32 ``[V, D]`` buffer (the result itself for an fp32
    weight), and a half-precision weight is converted once to the GEMMs' dtype where that
    differs (another ``[V, D]``), instead of once per chunk."""
    need_row_weight = needs[3]
    compile_with = transform if plan.compiled and not transform.per_row else None
    running = _RunningStats(plan.rows, targets, want_mean, want_entropy, hidden2d, compile_with)
    stat_dtype, device = running.dtype, hidden2d.device
    vocab = weight.shape[0] if vocab_parallel is None else vocab_parallel.vocab
    rows, work = _Rows(hidden2d, index, plan), _Workspace(plan, device)
    params = [_shard_params(weight, bias, v0, v1, plan) for v0, v1 in plan.shards]
    kept = [work.kept(i) for i in range(len(params))]
    new = {"device": device, "dtype": stat_dtype}
    sink = _HeadGradients(
        hidden2d, weight, bias, index, plan, needs[:3], stat_dtype, rows_outer=True
    )
    row_weight_grads = torch.zeros(plan.rows, **new) if need_row_weight else None
    block_grads = _BlockGrads(transform, plan, stat_dtype, needs[2])
    loss, chunk_stats = torch.zeros((), **new), []
    # Without a softcap or compiled passes, each kept block is folded in place into
    # exp(z - centre), which its gradient then scales (_block_grad's exp_centre): one exp per
    # logit instead of two.
    exp_once = running.compiled is None and transform.softcap is None and not want_entropy
    for r0, r1, h in rows:
        blocks, centres, rows_grads = [], [], block_grads.rows(r0, r1)
        for (v0, v1), (w, b), shard_work in zip(plan.shards, params, kept, strict=True):
            z = running.logits(h, w, b, rows_grads.transform, shard_work)
            running.fold(z, r0, r1, v0, v1, work, keep=not exp_once)
            blocks.append(z)
            centres.append(_centre(running.state.max[r0:r1]) if exp_once else None)
        stats = running.stats(weight.shape[0], slice(r0, r1))
        if vocab_parallel is not None:
            stats = vocab_parallel.combine(stats)
        stats = stats.finished()
        chunk_stats.append(stats)
        chunk_weight = None if row_weight is None else row_weight[r0:r1]
        chunk_loss, stat_grads, row_weight_grad = _loss_and_grads(row_loss, stats, chunk_weight)
        loss += chunk_loss
        if row_weight_grads is not None:
            row_weight_grads[r0:r1] = row_weight_grad
        coef = _coefficients(stats, stat_grads, vocab)
        chunk_targets = None if targets is None else targets[r0:r1]
        centre = (stats.max, stats.log_sum)
        for (v0, v1), (w, _), z, exp_centre in zip(
            plan.shards, params, blocks, centres, strict=True
        ):
            grad, column_sums = rows_grads(
                z, centre, coef, chunk_targets, v0, v1, work, exp_centre=exp_centre
            )
            sink.add(grad, h, w, r0, r1, v0, v1, work, column_sums)
    grads = _FusedGrads(sink.rows, sink.weight_grad, sink.bias_grad, row_weight_grads)
    if not chunk_stats:  # no row
        return running.stats(weight.shape[0]).finished(), loss, grads
    stats = RowStats(
        *(None if s[0] is None else torch.cat(s) for s in zip(*chunk_stats, strict=True))
    )
    return stats, loss, grads


def _block_functions(hidden2d: Tensor, transform: LogitTransform | None = None):
    """``(forward_stats, backward_blocks)`` for ``hidden2d``: the fused Triton kernels of
    ``_triton`` where they serve it (CUDA, triton installed, a float temperature in
    ``transform``), else the PyTorch loop above, which is also their test oracle."""
    if hidden2d.is_cuda and not (transform is not None and transform.per_row):
        kernels = _triton_module()
        if kernels is not None and kernels.serves(hidden2d):
            return kernels.forward_stats, kernels.backward_blocks
    return _forward_stats, _backward_blocks


@cache
def _triton_module():
    try:
        from . import _triton
    except ImportError:  # triton is optional (extra "gpu")
        return None
    return _triton


class _RowStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden2d,
        weight,
        bias,
        index,
        targets,
        transform,
        plan,
        want_mean,
        want_entropy,
        vocab_parallel,
        top_k,
        row_loss,
        row_weight,
    ):
        fused = _FusedGrads(None, None, None, None)
        if row_loss is None:
            forward_stats, ctx.backward_blocks = _block_functions(hidden2d, transform)
            extra = {}
            if top_k:  # the running top-k is a statistic of the PyTorch loop only
                forward_stats, extra = _forward_stats, {"top_k": top_k}
            stats = forward_stats(
                hidden2d, weight, bias, index, targets, transform, plan, want_mean, want_entropy,
                **extra,
            )  # fmt: skip
            if stats.entropy is not None:
                # A row whose every logit is -inf (a -inf bias masking the whole vocabulary) has
                # lse -inf and no distribution: its entropy is NaN, as the naive computation's.
                stats.entropy.masked_fill_(stats.lse == -math.inf, math.nan)
            if vocab_parallel is not None:
                stats = vocab_parallel.combine(stats)
            stats = stats.finished()
        else:
            if top_k:
                raise ValueError(
                    "row_stats: top_k is not computed by the fused pass (row_loss); "
                    f"got top_k={top_k}"
                )
            ctx.backward_blocks = _backward_blocks
            needs = (*ctx.needs_input_grad[:3], ctx.needs_input_grad[12])
            stats, loss, fused = _fused_loss_blocks(
                hidden2d, weight, bias, index, targets, transform, plan, want_mean,
                want_entropy, row_loss, row_weight, needs, vocab_parallel,
            )  # fmt: skip
        # The fused gradients are saved tensors, not attributes: the engine frees them with the
        # graph after a backward that does not retain it, and keeps them for one that does.
        centre = (stats.max, stats.log_sum)
        ctx.save_for_backward(
            hidden2d, weight, bias, index, targets, *centre, stats.logprob, stats.entropy, *fused
        )
        ctx.transform, ctx.plan, ctx.vocab_parallel = transform, plan, vocab_parallel
        ctx.row_loss = row_loss
        # Statistics that do not reach the loss get ``None`` gradients instead of zeros, so their
        # terms are skipped in the backward blocks.
        ctx.set_materialize_grads(False)
        differentiable = stats[:4]
        ctx.layout = tuple(s is not None for s in differentiable)
        # The row maximum is a constant offset (log_sum's gradient rule is lse's); the top
        # logits are decisions (and values at indices chosen without a gradient).
        top = () if stats.top is None else tuple(t for t in stats.top if t is not None)
        ctx.mark_non_differentiable(stats.max, *top)
        outputs = (*(s for s in differentiable if s is not None), stats.max, *top)
        return outputs if row_loss is None else (*outputs, loss)

    @staticmethod
    def backward(ctx, *grad_outputs):
        if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(create_graph=...)
            raise RuntimeError(
                "create_graph: chunklogits ops have no second-order gradients (their backward "
                "recomputes each logits block and is not itself differentiable), got a request "
                "for the graph of their gradient (e.g. a gradient penalty); compute that term "
                "with chunklogits.reference on the materialised logits instead"
            )
        hidden2d, weight, bias, index, targets, row_max, log_sum, logprob, entropy, *saved = (
            ctx.saved_tensors
        )
        fused = _FusedGrads(*saved)
        present = iter(grad_outputs)
        grads = RowStats(*(next(present) if kept else None for kept in ctx.layout))
        grad_loss = grad_outputs[-1] if ctx.row_loss is not None else None
        parallel = ctx.vocab_parallel
        needs = ctx.needs_input_grad[:3]
        recompute = any(g is not None for g in grads)  # the statistics themselves reach the result
        grad_rows = grad_weight = grad_bias = grad_row_weight = None
        if ctx.row_loss is not None and grad_loss is not None:
            # The forward pass computed the gradients for a loss gradient of 1. A backward that
            # frees the graph scales them in place and returns them (no copy); one that keeps
            # it (retain_graph=True) scales them into new tensors, so that the next backward
            # finds them as they were and returns the same gradients, as any autograd op does.
            kept = _graph_kept()
            grad_rows, grad_weight, grad_bias, grad_row_weight = (
                None if g is None else g * grad_loss if kept else g.mul_(grad_loss) for g in fused
            )
        if recompute:
            stats = RowStats(None, logprob, None, entropy)
            vocab = weight.shape[0] if parallel is None else parallel.vocab
            coef = _coefficients(stats, grads, vocab)
            centre = (row_max, log_sum)
            recomputed = ctx.backward_blocks(
                hidden2d, weight, bias, index, targets, centre, coef, ctx.transform, ctx.plan, needs
            )
            grad_hidden, grad_weight, grad_bias = (
                r if f is None else f.add_(r)
                for f, r in zip((None, grad_weight, grad_bias), recomputed, strict=True)
            )
            if grad_rows is not None:  # both in fp32, rounded once
                grad_hidden = grad_hidden.to(grad_rows.dtype)
                grad_hidden[slice(None) if index is None else index] += grad_rows
                grad_hidden = grad_hidden.to(hidden2d.dtype)
        else:
            grad_hidden = None if grad_rows is None else _hidden_grad(grad_rows, hidden2d, index)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        if parallel is not None and grad_hidden is not None:
            grad_hidden = parallel.reduce_grad(grad_hidden)
        return grad_hidden, grad_weight, grad_bias, *(None,) * 9, grad_row_weight


def _graph_kept() -> bool:
    """Whether the backward pass running now keeps the graph (``retain_graph=True``), so that
    the saved tensors are read again: torch's autograd engine says so through a private function
    (which AOT autograd reads for the same purpose); True where it is missing."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


def row_stats(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    index: Tensor | None = None,
    targets: Tensor | None = None,
    transform: LogitTransform = LogitTransform(),
    plan: BlockPlan,
    want_mean: bool = False,
    want_entropy: bool = False,
    vocab_parallel=None,
    top_k: int = 0,
    row_loss=None,
    row_weight: Tensor | None = None,
) -> RowStats | tuple[RowStats, Tensor]:
    """Differentiable ``RowStats`` of ``z = transform(hidden2d[index] @ weight.T + bias)``.

    hidden2d: ``[M, D]``; weight: ``[V, D]``; bias: ``[V]`` or None; index: ``[N]`` rows of
    ``hidden2d`` to use (None: all ``M``); targets: ``[N]`` in ``[0, V)`` or None. Statistics are
    ``[N]`` in fp32 (fp64 for fp64 inputs). Inputs are assumed validated by the public op.
    Naive equivalent: ``z = transform(F.linear(hidden2d[index], weight, bias).float())``, then
    ``max = z.amax(-1)``, ``log_sum = (z - max[:, None]).logsumexp(-1)``,
    ``logprob = z.log_softmax(-1).gather(-1, targets)``, ``z.mean(-1)``,
    ``-(z.softmax(-1) * z.log_softmax(-1)).sum(-1)``.

    vocab_parallel: None, or the hook of ``distributed.VocabSlice``: ``weight`` and ``bias`` are
    rows ``[start, start + V)`` of a vocabulary of ``vocab`` entries spread over several ranks,
    ``targets`` are indices into the whole vocabulary (a row whose target another rank holds gets
    a local target logit of 0), ``combine(stats)`` turns this slice's statistics into the whole
    vocabulary's, and ``reduce_grad(grad_hidden)`` sums the ranks' hidden gradients.

    top_k: > 0 for ``RowStats.top``, the ``top_k`` largest logits of each row (``TopLogits``,
    not differentiable; whole-vocabulary indices under ``vocab_parallel``), from the same pass.

    row_loss: None, or a function of ``RowStats`` (each ``[rows]``) and of the same rows of
    ``row_weight`` (None when it is None) to a per-row loss, made of differentiable torch ops.
    Then ``(stats, loss)`` is returned, ``loss = row_loss(stats, row_weight).sum()``, and the
    gradients of ``loss`` are computed during the forward pass (``_fused_loss_blocks``, which
    needs a plan from ``plan_blocks(kept_vocab=...)``) and saved; the backward pass returns them
    scaled by the loss's gradient: in place when it frees the graph, into new tensors when it
    keeps it (``retain_graph=True``: a copy of each, an fp32 ``[V, D]`` for the weight's), so
    that the next backward returns the same gradients, as any autograd op's. Gradients that
    reach ``stats`` too are added by a recomputing pass.

    row_weight: None, or ``[N]`` per-row numbers ``row_loss`` takes (the class weights of the
    targets), differentiable.
    """
    if vocab_parallel is not None and targets is not None:
        targets = targets - vocab_parallel.start
    out = iter(
        _RowStatsFunction.apply(
            hidden2d,
            weight,
            bias,
            index,
            targets,
            transform,
            plan,
            want_mean,
            want_entropy,
            vocab_parallel,
            top_k,
            row_loss,
            row_weight,
        )
    )
    present = (True, targets is not None, want_mean, want_entropy)
    stats = [next(out) if kept else None for kept in present]
    row_max = next(out)
    top = None
    if top_k:
        top = TopLogits(next(out), next(out), next(out), next(out) if targets is not None else None)
    stats = RowStats(*stats, top, row_max)
    return stats if row_loss is None else (stats, next(out))


class _HeadGradients:
    """Gradients of one head's hidden rows, weight and bias, summed block by block from the
    blocks' ``dL/dx`` (``x`` the raw logits): the one place where a pass multiplies its blocks
    back through the two gradient GEMMs (``_backward_blocks``, ``_fused_loss_blocks``, the
    distillation losses). ``needs``: which of (hidden, weight, bias) want a gradient.

    Shards outer (default): a shard's weight gradient is finished before the next starts
    (``start_shard``/``finish_shard``), and with one row chunk it is written once by its GEMM,
    without an fp32 accumulator. ``rows_outer``: every row chunk walks the whole vocabulary (the
    fused pass), and the weight gradient is summed over the chunks in an fp32 (``stat_dtype``)
    ``[V, D]`` buffer. Products of half-precision GEMMs come back rounded to that dtype and are
    added to the fp32 sums (see ``_backward_blocks``); fp32 ones are added by the GEMM itself."""

    def __init__(self, hidden2d, weight, bias, index, plan, needs, stat_dtype, rows_outer=False):
        self.hidden2d, self.weight, self.bias, self.index = hidden2d, weight, bias, index
        self.plan, self.stat_dtype = plan, stat_dtype
        need_hidden, need_weight, need_bias = needs
        new = {"dtype": stat_dtype, "device": hidden2d.device}
        self.rows = torch.zeros(plan.rows, hidden2d.shape[1], **new) if need_hidden else None
        self.weight_grad = self.shard_grad = None
        if need_weight and rows_outer:
            self.weight_grad = torch.zeros(weight.shape, **new)
        elif need_weight:  # every shard's rows are written, unless there is no row
            self.weight_grad = torch.empty_like(weight) if plan.rows else torch.zeros_like(weight)
        self.bias_grad = torch.zeros(weight.shape[0], **new) if need_bias else None
        self.rows_outer, self.single_chunk = rows_outer, len(plan.chunks) == 1
        self.buffers = {}  # _buffer's, by role

    def start_shard(self, v0: int, v1: int) -> None:
        if self.weight_grad is not None and not (self.single_chunk or self.rows_outer):
            self.shard_grad = torch.zeros(
                v1 - v0, self.hidden2d.shape[1], dtype=self.stat_dtype, device=self.hidden2d.device
            )

    def add(self, grad, h, w, r0, r1, v0, v1, work, column_sums=None) -> None:
        """Fold the block ``grad = dL/dx`` of rows ``[r0, r1)`` x shard ``[v0, v1)``, whose
        rows and weight shard in the compute dtype are ``h`` and ``w``: either in the compute
        dtype with its ``column_sums`` (the bias gradient's share, when needed), or in fp32,
        summed here and converted into ``work``'s ``raw`` buffer."""
        if self.bias_grad is not None:
            self.bias_grad[v0:v1] += grad.sum(0) if column_sums is None else column_sums
        if grad.dtype != self.plan.compute_dtype:
            grad = work.get("raw", *grad.shape, self.plan.compute_dtype).copy_(grad)
        if self.rows is not None:
            self._add_product(self.rows[r0:r1], grad, w)
        if self.rows_outer and self.weight_grad is not None:
            self._add_product(self.weight_grad[v0:v1], grad.T, h)
        elif self.shard_grad is not None:
            self._add_product(self.shard_grad, grad.T, h)
        elif self.weight_grad is not None and self.weight.dtype == grad.dtype:
            torch.mm(grad.T, h, out=self.weight_grad[v0:v1])
        elif self.weight_grad is not None:
            self.weight_grad[v0:v1] = self._product(grad.T, h)

    def finish_shard(self, v0: int, v1: int) -> None:
        if self.shard_grad is not None:
            self.weight_grad[v0:v1] = self.shard_grad
            self.shard_grad = None

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(hidden2d's gradient, zero at unselected rows; weight's; bias'), in their dtypes."""
        grad_hidden = (
            None if self.rows is None else _hidden_grad(self.rows, self.hidden2d, self.index)
        )
        grad_weight = None if self.weight_grad is None else self.weight_grad.to(self.weight.dtype)
        grad_bias = None if self.bias_grad is None else self.bias_grad.to(self.bias.dtype)
        return grad_hidden, grad_weight, grad_bias

    def _buffer(self, role: str, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """A ``shape`` view of this sink's buffer for ``role``, reused by every block: a new
        tensor per block costs its page faults wherever the allocator maps large blocks afresh
        (0.7 s of a 6.7 s step at N = 2,048, D = 1,024, V = 128,256 under the benchmarks'
        pinned allocator: each half-precision product converted into a new fp32 tensor)."""
        numel = shape[0] * shape[1]
        buffer = self.buffers.get(role)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[role] = torch.empty(numel, dtype=dtype, device=self.weight.device)
        return buffer[:numel].view(shape)

    def _product(self, a: Tensor, b: Tensor) -> Tensor:
        """``a @ b`` in their dtype, in the ``product`` buffer."""
        return torch.mm(a, b, out=self._buffer("product", (a.shape[0], b.shape[1]), a.dtype))

    def _add_product(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        """``out += a @ b``: by the GEMM itself where ``out`` has the product's dtype, else the
        (half-precision) product converted to ``out``'s dtype (fp32) and added, a slice of
        at most ``_CONVERTED_NUMEL`` numbers at a time."""
        if out.dtype == a.dtype:
            out.addmm_(a, b)
            return
        product = self._product(a, b)
        step = max(1, _CONVERTED_NUMEL // out.shape[1])  # rows converted at a time
        for r in range(0, out.shape[0], step):
            rows = slice(r, r + step)
            converted = self._buffer("converted", product[rows].shape, out.dtype)
            out[rows] += converted.copy_(product[rows])
