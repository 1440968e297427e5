"""Vocabulary-parallel statistics over ``torch.distributed``: one head spread over several ranks.

Each rank of a process group holds a contiguous slice ``weight[start:start + V_r]`` of the head
(and ``bias[start:start + V_r]``), the ranks' slices following one another in group-rank order;
sizes may differ (``V`` need not divide by the world size). Every rank holds the *same* hidden
states and labels, runs the block engine over its own slice only, and the per-row statistics are
combined with two all-reduces of ``O(rows)`` fp32 numbers, as Megatron-LM's vocab-parallel
cross-entropy does::

    m = all_reduce_max(m_r)                         # m_r: the slice's largest logit
    w_r = exp((m_r - m) + log_sum_r)                # log_sum_r = lse_r - m_r: the slice's
    s = all_reduce_sum(w_r);  lse = m + log(s)      #   softmax mass is w_r * e^m
    entropy = log(s) + all_reduce_sum(w_r * (entropy_r + ((m - m_r) - log_sum_r))) / s
    target = all_reduce_sum(target_r)               # 0 on the ranks that do not hold the target
    mean = all_reduce_sum(V_r * mean_r) / V

(The entropy of a softmax split into disjoint slices of masses ``p_r = w_r / s``:
``sum_r p_r * entropy_r - sum_r p_r * log p_r``, every term non-negative.)

Every rank then holds the whole vocabulary's statistics, hence the same loss. Its backward pass
gives each rank the gradient of its own weight (and bias) slice, and all-reduces the hidden
states' gradient, so every rank's ``hidden.grad`` is the full gradient (as the input gradient of
Megatron's column-parallel linear layer). So every rank must call ``backward`` on the result.

Users pass ``process_group=`` to ``linear_cross_entropy``, ``token_logprobs``,
``logsumexp``, ``linear_jsd`` (which also sums its per-row divergences: ``VocabSlice.sum_``)
and ``sampling.sample_next`` (whose passes each end with one ``all_gather`` of their
per-row candidates and winners: ``VocabSlice.gather``; see ``sampling``). Before any other
collective, the ranks exchange a small description of their inputs in one ``all_gather``; a bad
input on any rank, or inputs that disagree across ranks (hidden size, dtype, rows, bias, logit
transform, sampling options, differing hidden states or labels), then raise the same error on
every rank instead of hanging in a later collective.

``local_head`` turns a head whose weight is a ``DTensor`` sharded on the vocabulary dimension
(``torch.distributed.tensor.parallel.ColwiseParallel``) into the local slice and its process
group.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from ._blocks import LogitTransform, RowStats, TopLogits, _merge_top

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ERRORS = (None, ValueError, TypeError, RuntimeError)
_MESSAGE_BYTES = 512
# Hidden states agree across ranks when their sums differ by less than this fraction of the sum
# of magnitudes: loose enough for a different summation order, tight enough for different data.
_FINGERPRINT_TOLERANCE = 1e-6
# torch 2.13 renamed all_gather_into_tensor (which it deprecates) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class VocabSlice:
    """One rank's slice, rows ``[start, start + size)`` of a head of ``vocab`` entries spread
    over ``group``: the engine's hook (``row_stats(vocab_parallel=...)``) and the sampler's
    collectives (``gather``, ``broadcast_first_``)."""

    def __init__(self, group: dist.ProcessGroup, start: int, size: int, vocab: int):
        self.group, self.start, self.size, self.vocab = group, start, size, vocab

    @classmethod
    def of(cls, group: dist.ProcessGroup, size: int) -> VocabSlice:
        """This rank's slice of a head of which each rank of ``group`` holds ``size`` entries,
        the slices following one another in group-rank order (one ``all_gather`` of the
        sizes)."""
        mine = torch.tensor([size], dtype=torch.long, device=_collective_device(group))
        sizes = mine.new_empty(dist.get_world_size(group))
        _all_gather_single(sizes, mine, group=group)
        sizes = sizes.tolist()
        return cls(group, sum(sizes[: dist.get_rank(group)]), size, sum(sizes))

    def combine(self, stats: RowStats) -> RowStats:
        """The whole vocabulary's statistics from every rank's (see the module doc)."""
        row_max = stats.max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.group)
        # Rows masked on every rank (max -inf everywhere) are centred on 0: their share is 0,
        # their log_sum log(0) = -inf and their entropy NaN, as in one process.
        centre = row_max.masked_fill(row_max == -math.inf, 0.0)
        below = stats.max - centre  # how far the slice's maximum lies below the row's
        share = (below + stats.log_sum).exp_()
        parts = [share]
        if stats.entropy is not None:
            # The offsets first: they are exact for close values, where (entropy + max) would
            # round the entropy to the maximum's resolution. A slice whose tokens a -inf bias masks
            # has share 0: it adds 0, not 0 * inf.
            weighted = share * (stats.entropy - (below + stats.log_sum))
            parts.append(weighted.masked_fill(share == 0, 0.0))
        if stats.target is not None:
            parts.append(stats.target)
        if stats.mean is not None:
            parts.append(stats.mean * self.size)
        sums = torch.stack(parts)
        dist.all_reduce(sums, group=self.group)
        summed = iter(sums)
        total = next(summed)
        entropy = None if stats.entropy is None else total.log() + next(summed) / total
        target = None if stats.target is None else next(summed)
        mean = None if stats.mean is None else next(summed) / self.vocab
        largest = None if stats.top is None else self._combine_top(stats.top)
        return RowStats(total.log(), None, mean, entropy, largest, row_max, target)

    def _combine_top(self, top: TopLogits) -> TopLogits:
        """The whole vocabulary's ``TopLogits`` from every rank's (one ``all_gather``): the
        ``k`` largest of all ranks' candidates, the target's decision logit from its holder."""
        k = top.decision.shape[1]
        parts = [top.decision, top.index + self.start, top.value]
        if top.target_decision is not None:
            parts.append(top.target_decision)
        # [world, n, k] -> [n, world * k]: every rank's candidates side by side.
        every = [t.transpose(0, 1).flatten(1) for t in self.gather(parts)]
        # Equal decisions by the smaller whole-vocabulary index, as within a rank.
        decision, index, value = _merge_top(k, [every[:3]])
        target = None if top.target_decision is None else every[3].amax(1)
        return TopLogits(decision, index, value, target)

    def reduce_grad(self, grad_hidden: Tensor) -> Tensor:
        """Each rank's hidden gradient covers its own slice; the full one is their sum."""
        dist.all_reduce(grad_hidden, group=self.group)
        return grad_hidden

    def sum_(self, tensor: Tensor) -> Tensor:
        """``tensor`` (per-row sums over this rank's slice) replaced in place by its sum over the
        ranks: the same sums over the whole vocabulary."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def gather(self, tensors: list[Tensor]) -> list[Tensor]:
        """Every rank's ``tensors`` (each ``[n, ...]``, the same shapes and dtypes on every rank)
        as ``[world, n, ...]`` tensors, by group rank, with one ``all_gather``. Exact: they travel
        packed as float64, which holds every fp32 value and every integer below 2**53."""
        rows = tensors[0].shape[0]
        packed = torch.cat([t.reshape(rows, -1).double() for t in tensors], 1)
        world = dist.get_world_size(self.group)
        every = packed.new_empty(world * rows, packed.shape[1])  # received in place, no stack
        _all_gather_single(every, packed, group=self.group)
        columns = every.view(world, rows, -1).split([t[0].numel() for t in tensors], dim=2)
        return [
            c.reshape(world, *t.shape).to(t.dtype) for c, t in zip(columns, tensors, strict=True)
        ]

    def broadcast_first_(self, tensor: Tensor) -> Tensor:
        """``tensor`` replaced in place by group rank 0's."""
        dist.broadcast(tensor, group_src=0, group=self.group)
        return tensor


# The sampler's options in the exchange; every one must agree, or ranks would draw differently.
_SAMPLING_FIELDS = (
    "do_sample",
    "top_k",
    "top_p",
    "min_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "return_logprobs",
    "randomness",
    "seed_low",
    "seed_high",
)
_FINGERPRINTS = ("hidden_sum", "hidden_abs", "targets_checksum", "targets_min", "targets_max")


def _fingerprints(hidden2d: Tensor, targets: Tensor | None) -> Tensor:
    """Summaries of the inputs every rank must share (``_FINGERPRINTS``), reduced on the
    inputs' device. The labels' checksum weighs each by its position (exact int64 arithmetic),
    so that labels in another order differ; once their minimum and maximum agree, every rank
    checks their range against the whole vocabulary alike."""
    # Per-row reductions in hidden's dtype first: a ``dtype=`` argument would copy hidden.
    hidden = [
        hidden2d.sum(1).double().sum(),
        torch.linalg.vector_norm(hidden2d, 1, dim=1).double().sum(),
    ]
    if targets is None or targets.numel() == 0:
        return torch.stack([*hidden, *hidden2d.new_zeros(3, dtype=torch.float64)])
    low, high = torch.aminmax(targets)
    positions = torch.arange(targets.numel(), device=targets.device) % 65521 + 1
    labels = torch.stack([(targets * positions).sum(), low, high]).double()
    return torch.cat([torch.stack(hidden), labels])


class _Agreement:
    """The one metadata exchange of a vocab-parallel call (see ``checked_on_every_rank``)."""

    # One float64 row per rank: these fields, then the UTF-8 bytes of a failed rank's message.
    _FIELDS = (
        "error",
        "message_length",
        "vocab",
        "dim",
        "dtype",
        "hidden_rows",
        "rows",
        "bias",
        "hidden_grad",
        "logit_scale",
        "softcap",
        "temperature",
        *_SAMPLING_FIELDS,
        *_FINGERPRINTS,
    )

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.gathered = False
        self.vocab: int | None = None

    def agree(
        self,
        hidden2d: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        transform: LogitTransform,
        targets: Tensor | None = None,
        targets_name: str = "",
        sampling: dict | None = None,
        top_k: tuple[str, int] | None = None,
    ) -> VocabSlice | None:
        """Exchange this rank's description of its inputs; raise on every rank if they disagree.
        Returns this rank's ``VocabSlice``, or None without a process group. Sets ``vocab``, the
        size of the whole vocabulary, which labels must index. ``sampling``: the sampler's
        options (``_sampling_fields``' arguments), which must agree too; ``top_k``: (argument
        name, value), the count of largest logits an op keeps (``token_accuracy``,
        ``topk_logprobs``), likewise, and at most the whole vocabulary (ValueError)."""
        self.vocab = weight.shape[0]
        if self.group is None:
            _check_top_k(top_k, self.vocab)
            return None
        fields = {
            "vocab": weight.shape[0],
            "dim": weight.shape[1],
            "dtype": _DTYPES.index(weight.dtype),
            "hidden_rows": hidden2d.shape[0],
            "rows": hidden2d.shape[0] if targets is None else targets.numel(),
            "bias": bias is not None,
            "hidden_grad": hidden2d.requires_grad,
            "logit_scale": transform.logit_scale or 0.0,
            "softcap": transform.softcap or 0.0,
            # Per-position temperatures are compared by their sum (one host read).
            "temperature": float(transform.temperature.double().sum())
            if transform.per_row
            else transform.temperature,
        }
        if sampling is not None:
            fields.update(_sampling_fields(**sampling))
        if top_k is not None:
            fields["top_k"] = top_k[1]
        ranks = self._gather(fields, _fingerprints(hidden2d, targets))
        _raise_first_error(ranks)
        _same(ranks, "dim", "weight", "hidden size D")
        _same(ranks, "dtype", "hidden", "dtype", show=lambda code: _DTYPES[int(code)])
        _same(ranks, "hidden_rows", "hidden", "number of rows (hidden.shape[:-1] flattened)")
        if targets is not None:
            _same(ranks, "rows", targets_name, "number of positions that are not ignored")
            for key in ("targets_checksum", "targets_min", "targets_max"):
                _same(ranks, key, targets_name, f"values ({key.split('_')[1]})")
        _same(ranks, "bias", "bias", "presence (a bias on every rank or on none)", show=bool)
        _same(
            ranks,
            "hidden_grad",
            "hidden",
            "requires_grad (each rank's backward all-reduces hidden's gradient)",
            show=bool,
        )
        for name in ("logit_scale", "softcap", "temperature"):
            _same(ranks, name, name, "value")
        if sampling is not None:
            _check_sampling(ranks)
        if top_k is not None:
            _same(ranks, "top_k", top_k[0], "value")
        _check_replicated(ranks)
        sizes = [int(rank["vocab"]) for rank in ranks]
        rank = dist.get_rank(self.group)
        self.vocab = sum(sizes)
        _check_top_k(top_k, self.vocab)  # the same on every rank: the values agree
        return VocabSlice(self.group, sum(sizes[:rank]), sizes[rank], self.vocab)

    def report(self, error: Exception) -> None:
        """Take part in the exchange with this rank's error, so that no rank waits for it."""
        kind = next((k for k in _ERRORS[1:-1] if isinstance(error, k)), RuntimeError)
        fingerprints = torch.zeros(len(_FINGERPRINTS), dtype=torch.float64)
        self._gather({"error": _ERRORS.index(kind)}, fingerprints, message=str(error))

    def _gather(self, fields: dict, fingerprints: Tensor, message: str = "") -> list[dict]:
        self.gathered = True
        encoded = list(message.encode("utf-8")[:_MESSAGE_BYTES])
        fields = {**fields, "message_length": len(encoded)}
        head = [float(fields.get(name, 0)) for name in self._FIELDS[: -len(_FINGERPRINTS)]]
        device = _collective_device(self.group)
        row = torch.cat(
            [
                torch.tensor(head, dtype=torch.float64),
                fingerprints.cpu(),
                torch.tensor(encoded + [0] * (_MESSAGE_BYTES - len(encoded)), dtype=torch.float64),
            ]
        ).to(device)
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(rows, row, group=self.group)
        ranks = []
        for gathered in rows:
            values = gathered.tolist()
            rank = dict(zip(self._FIELDS, values, strict=False))
            start = len(self._FIELDS)
            raw = bytes(int(b) for b in values[start : start + int(rank["message_length"])])
            rank["message"] = raw.decode("utf-8", errors="replace")
            ranks.append(rank)
        return ranks


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where a collective's tensors live: CPU for gloo (and MPI), else the current accelerator."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _check_top_k(top_k: tuple[str, int] | None, vocab: int) -> None:
    if top_k is not None and top_k[1] > vocab:
        name, value = top_k
        raise ValueError(f"{name}: expected an int in [1, V = {vocab}], got {value}")


def _raise_first_error(ranks: list[dict]) -> None:
    """Raise here the error of the lowest rank whose checks failed (it raises its own)."""
    failed = [r for r, rank in enumerate(ranks) if rank["error"]]
    if failed:
        first = ranks[failed[0]]
        raise _ERRORS[int(first["error"])](
            f"{first['message']} (raised on group rank {failed[0]} of process_group)"
        )


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _same(ranks: list[dict], key: str, argument: str, what: str, show=_number) -> None:
    values = [rank[key] for rank in ranks]
    if any(value != values[0] for value in values):
        shown = [show(value) for value in values]
        raise ValueError(
            f"{argument}: expected the same {what} on every rank of process_group, got {shown} "
            "by group rank"
        )


_RANDOMNESS = ("torch's default generator", "a seed", "a generator")


def _sampling_fields(
    *,
    do_sample,
    top_k,
    top_p,
    min_p,
    epsilon_cutoff,
    eta_cutoff,
    repetition_penalty,
    return_logprobs,
    seed,
    generator,
) -> dict:
    """``_SAMPLING_FIELDS`` of already checked options, as numbers (min_p and the cutoffs None:
    -1; the seed in two 32-bit halves, which float64 holds exactly)."""
    source = 1 if seed is not None else 2 if generator is not None else 0
    seed = seed or 0
    return {
        "do_sample": do_sample,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": -1.0 if min_p is None else min_p,
        "epsilon_cutoff": -1.0 if epsilon_cutoff is None else epsilon_cutoff,
        "eta_cutoff": -1.0 if eta_cutoff is None else eta_cutoff,
        "repetition_penalty": repetition_penalty,
        "return_logprobs": return_logprobs,
        "randomness": source,
        "seed_low": seed % 2**32,
        "seed_high": seed // 2**32,
    }


def _check_sampling(ranks: list[dict]) -> None:
    for name in ("do_sample", "return_logprobs"):
        _same(ranks, name, name, "value", show=bool)
    for name in ("top_k", "top_p", "repetition_penalty"):
        _same(ranks, name, name, "value")
    for name in ("min_p", "epsilon_cutoff", "eta_cutoff"):
        _same(ranks, name, name, "value", show=lambda v: None if v == -1 else _number(v))
    _same(
        ranks,
        "randomness",
        "seed, generator",
        "kind of randomness (a seed, a generator or neither)",
        show=lambda code: _RANDOMNESS[int(code)],
    )
    for rank in ranks:
        rank["seed"] = int(rank["seed_low"]) + int(rank["seed_high"]) * 2**32
    _same(ranks, "seed", "seed", "value")


def _check_replicated(ranks: list[dict]) -> None:
    """Vocab-parallel ranks must hold the same hidden states; a data-parallel setup (FSDP,
    DDP: different batches per rank) passed here by mistake would be silently wrong."""
    sums = [rank["hidden_sum"] for rank in ranks]
    scale = max(rank["hidden_abs"] for rank in ranks)
    if max(sums) - min(sums) > _FINGERPRINT_TOLERANCE * scale:
        raise ValueError(
            "hidden: expected the same hidden states on every rank of process_group (vocab-"
            "parallel ranks hold different slices of the head, not different data), got "
            f"different values: sums {sums} by group rank"
        )


def check_process_group(process_group) -> dist.ProcessGroup | None:
    if process_group is None:
        return None
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group: expected a torch.distributed.ProcessGroup or None, got "
            f"{type(process_group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError("process_group: expected an initialised torch.distributed, got none")
    return process_group


@contextmanager
def checked_on_every_rank(process_group):
    """Run an op's argument checks so that a failure on one rank fails every rank.

    The block's last step is ``agreement.agree(...)``, the one metadata exchange. An exception
    raised earlier in the block on some rank is sent through that same exchange, so the other
    ranks raise it too instead of waiting in a collective. Without a process group (None) this
    is a no-op and ``agree`` returns None.
    """
    agreement = _Agreement(check_process_group(process_group))
    try:
        yield agreement
    except Exception as error:
        if agreement.group is not None and not agreement.gathered:
            agreement.report(error)
        raise


class LocalHead(NamedTuple):
    """This rank's slice of a vocabulary-parallel head and its ``process_group``."""

    weight: Tensor
    bias: Tensor | None
    process_group: dist.ProcessGroup | None


def local_head(weight: Tensor, bias: Tensor | None = None) -> LocalHead:
    """Recognise a head whose weight is a ``DTensor`` sharded on the vocabulary dimension.

    weight: ``[V, D]`` plain tensor or ``DTensor`` placed ``Shard(0)`` on one dimension of its
    device mesh and ``Replicate()`` on any others (``ColwiseParallel``); bias: ``[V]`` or None,
    placed like the weight. Returns the local slices (``DTensor.to_local``: their gradients flow
    back to the DTensor parameters) with that mesh dimension's process group, or the tensors
    unchanged with ``process_group=None`` when they are not sharded. Usage::

        weight, bias, group = local_head(lm_head.weight, lm_head.bias)
        loss = chunklogits.linear_cross_entropy(hidden, weight, labels, bias=bias,
                                                process_group=group)

    A weight sharded on another dimension (e.g. ``RowwiseParallel``'s ``Shard(1)``) or partial
    raises a ``ValueError``; the placements are the same on every rank, so every rank raises.
    """
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise TypeError("bias: expected a plain tensor like the weight, got a DTensor")
        return LocalHead(weight, bias, None)
    vocab_dims = [i for i, p in enumerate(weight.placements) if p == Shard(0)]
    others = [p for p in weight.placements if p != Shard(0) and not p.is_replicate()]
    if others or len(vocab_dims) > 1:
        raise ValueError(
            "weight: expected a DTensor sharded on the vocabulary dimension 0 over one mesh "
            f"dimension and replicated over the others (ColwiseParallel), got placements "
            f"{tuple(weight.placements)}"
        )
    if bias is not None and (
        not isinstance(bias, DTensor)
        or bias.device_mesh != weight.device_mesh
        or tuple(bias.placements) != tuple(weight.placements)
    ):
        placed = tuple(bias.placements) if isinstance(bias, DTensor) else "a plain tensor"
        raise ValueError(
            f"bias: expected a DTensor placed like the weight, {tuple(weight.placements)} on the "
            f"same mesh, got {placed}"
        )
    local_bias = None if bias is None else bias.to_local()
    group = weight.device_mesh.get_group(vocab_dims[0]) if vocab_dims else None
    return LocalHead(weight.to_local(), local_bias, group)
