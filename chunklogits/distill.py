"""Knowledge distillation between two linear heads without either's logits: TRL's GKD loss.

A student head ``weight_s [V, D_s]`` and a teacher head ``weight_t [V, D_t]`` over the same
vocabulary. The divergence of a row needs, at every token, both heads' log-probabilities, so each
block holds both heads' logits for the same vocabulary shard, centred on both rows' log-sum-exps:

1. the two log-sum-exps, one engine pass per head (``_blocks``' forward statistics);
2. the per-row divergence sums over the blocks of both heads;
3. backward: each block recomputed, ``dL/dlogits`` of both heads formed from the row sums of
   pass 2, and multiplied back through each head's GEMMs (``_blocks._HeadGradients``).

Liger-Kernel's ``LigerFusedLinearJSD`` instead cuts the tokens into chunks that each hold the
whole vocabulary's logits of both heads (and writes the gradients during the forward pass); here
the vocabulary is sharded as in every other op, so a block's size does not grow with ``V``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ._blocks import (
    BlockPlan,
    LogitTransform,
    _block_functions,
    _block_logits,
    _HeadGradients,
    _Rows,
    _shard_params,
    _Workspace,
    log_floor,
    plan_blocks,
)
from ._checks import (
    check_choice,
    check_head,
    check_ignore_index,
    check_num_items,
    check_real_in,
    check_shift,
    check_token_tensor,
    flat_rows,
    make_transform,
)
from .distributed import checked_on_every_rank

_REDUCTIONS = ("batchmean", "sum", "mean", "none")
# Transient bytes one block element costs: both heads' fp32 logits, the two softmaxes, the
# mixture and q / m (6 x 4), the half-precision GEMM outputs of both heads (2 x 2) and the masks
# of zero probabilities of both heads (2 x 1).
_BYTES_PER_BLOCK_ELEMENT = 30


def linear_jsd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch: int | Tensor | None = None,
    shift: bool = False,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    shards: int | None = None,
    chunk_size: int | None = None,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """TRL's generalised Jensen-Shannon divergence (GKD) between a student and a teacher head,
    never holding either head's ``[tokens, V]`` logits.

    Naive equivalent (``reference.linear_jsd``; ``GKDTrainer.generalized_jsd_loss`` of
    ``trl.experimental.gkd`` on the same logits, ``labels`` masking with ``ignore_index``)::

        # T: temperature, or temperature[..., None] for a tensor
        s = F.linear(student_hidden, student_weight, student_bias).float() / T
        t = F.linear(teacher_hidden, teacher_weight, teacher_bias).float() / T
        if shift: s, t, labels = s[..., :-1, :], t[..., :-1, :], labels[..., 1:]
        logp, logq = s.log_softmax(-1), t.log_softmax(-1)           # student p, teacher q
        if beta == 0: jsd = F.kl_div(logp, logq, reduction="none", log_target=True)  # KL(q||p)
        elif beta == 1: jsd = F.kl_div(logq, logp, reduction="none", log_target=True)  # KL(p||q)
        else:
            logm = torch.logaddexp(logp + math.log1p(-beta), logq + math.log(beta))
            jsd = beta * F.kl_div(logm, logq, reduction="none", log_target=True) \\
                + (1 - beta) * F.kl_div(logm, logp, reduction="none", log_target=True)
        jsd = jsd[labels != ignore_index]                            # if labels is not None
        loss = jsd.sum() / n   # batchmean: n = kept positions (>= 1), or s.shape[0] without labels
        # "sum": jsd.sum(); "mean": jsd.mean() (over positions x V); "none": see below

    Args:
        student_hidden: ``[..., D_s]`` the student's last hidden states (fp16, bf16, fp32, fp64).
        student_weight: ``[V, D_s]`` the student's output embedding, its hidden's dtype.
        teacher_hidden: ``[..., D_t]``, the same leading shape and dtype as ``student_hidden``
            (usually computed under ``torch.no_grad()``: then no teacher gradient is formed).
        teacher_weight: ``[V, D_t]``, the same vocabulary as the student's.
        labels: ``student_hidden.shape[:-1]`` integers or None. Only which positions are
            ``ignore_index`` matters: they contribute nothing and are dropped before any logits
            are computed. None: every position counts.
        beta: in ``[0, 1]``: 0 is the forward KL ``KL(teacher || student)``, 1 the reverse
            ``KL(student || teacher)``, in between the generalised JSD through the mixture
            ``m = beta * teacher + (1 - beta) * student`` (TRL's convention). Accurate to fp32
            relative precision however small ``beta`` or ``1 - beta`` (``_log_ratios``).
        temperature: divides both heads' logits before the softmaxes: a float, or one per
            position, a floating tensor of ``student_hidden.shape[:-1]`` (or flattened) on its
            device, finite and positive, ``temperature[..., t]`` dividing both heads' logits at
            position ``t`` (with ``shift``, those paired with ``labels[..., t + 1]``; the last
            position's is unused); not differentiated (one requiring grad is refused).
        ignore_index: the label value of positions to leave out.
        reduction: ``"batchmean"`` (TRL's default: the sum over positions and vocabulary divided
            by the number of kept positions, at least 1, or without labels by the first
            dimension of the logits), ``"sum"``, ``"mean"`` (the sum divided by kept positions
            x V, as ``jsd.mean()``), or ``"none"``: the divergence of each position (TRL's
            elementwise ``[..., V]`` result summed over the vocabulary), shaped like ``labels``
            (``labels[..., 1:]`` with ``shift``), 0 at ignored positions.
        num_items_in_batch: divide the sum by this count instead, whatever the reduction (as
            TRL does for gradient accumulation); not with ``reduction="none"``.
        shift: pair ``hidden[..., t, :]`` with ``labels[..., t + 1]`` and leave out the last
            position (causal LM training, as ``GKDTrainer.compute_loss``), without copies.
        student_bias, teacher_bias: ``[V]`` or None.
        shards, chunk_size, process_group: as in ``linear_cross_entropy``; both heads are cut
            into the same blocks, and with a process group every rank holds the same vocabulary
            slice of both heads (and the same hidden states of both).

    A token masked by a ``-inf`` logit (bias) in either head contributes ``0 log 0 = 0`` where
    its probability weighs the term (``reference.linear_jsd``; TRL's ``F.kl_div`` gives NaN), so
    the divergence and its gradients stay finite; a token one head keeps and the other masks
    makes ``KL(x || y)`` infinite where ``y`` is the masked one (beta 0 or 1), as it is.

    Returns:
        fp32 (fp64 for fp64 inputs) scalar, or per position for ``reduction="none"``;
        differentiable with respect to both heads' hidden states, weights and biases (the
        teacher's gradients are formed only where they require grad).

    Cost: two passes in the forward (each head's log-sum-exp, then the divergence over both
    heads' blocks) and one in the backward, so the logits cost ``3 N V (D_s + D_t)``
    multiply-adds against the naive path's ``N V (D_s + D_t)``; the gradient GEMMs are the naive
    path's. Working memory: the blocks (``chunklogits.set_block_budget``) and ``O(N)`` per-row
    numbers, besides the gradients themselves.
    """
    with checked_on_every_rank(process_group) as ranks:
        _check_head("student", student_hidden, student_weight, student_bias)
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
        _check_same_positions(student_hidden, student_weight, teacher_hidden, teacher_weight)
        lead = student_hidden.shape[:-1]
        if labels is not None:
            check_token_tensor("labels", labels, lead, student_hidden.device)
        check_ignore_index(ignore_index)
        beta = check_real_in("beta", beta, 0.0, 1.0)
        transform = make_transform(
            None, None, temperature, student_hidden, "student_hidden.shape[:-1]"
        )
        check_choice("reduction", reduction, _REDUCTIONS)
        if num_items_in_batch is not None:
            _check_num_items(num_items_in_batch, reduction)
        check_shift("student_hidden", student_hidden, shift)
        out_shape = (*lead[:-1], lead[-1] - 1) if shift else tuple(lead)
        index = _kept_rows(lead, labels, ignore_index, shift, student_hidden.device)
        transform = transform.selected(index)
        rows = math.prod(lead) if index is None else index.numel()
        plan = plan_blocks(
            rows,
            student_weight.shape[0],
            student_hidden.dtype,
            student_hidden.device,
            shards=shards,
            chunk_size=chunk_size,
            bytes_per_element=_BYTES_PER_BLOCK_ELEMENT,
            dim=student_hidden.shape[-1] + teacher_hidden.shape[-1],
        )
        student2d, teacher2d = flat_rows(student_hidden), flat_rows(teacher_hidden)
        # The positions that count, which every rank must share (the exchange needs a tensor).
        kept = index
        if index is None and process_group is not None:
            kept = torch.arange(rows, device=student2d.device)
        vocab_slice = ranks.agree(
            student2d, student_weight, student_bias, transform, kept, "labels"
        )
        # The teacher's slice is the student's: each rank checked that both have the same size.
        ranks.agree(teacher2d, teacher_weight, teacher_bias, transform, kept, "labels")
    divergence = _JSDFunction.apply(
        student2d,
        student_weight,
        student_bias,
        teacher2d,
        teacher_weight,
        teacher_bias,
        index,
        _Options(beta, transform, plan),
        vocab_slice,
    )
    if reduction == "none":
        if index is not None:
            divergence = divergence.new_zeros(math.prod(lead)).index_put((index,), divergence)
        divergence = divergence.reshape(lead)
        return divergence[..., :-1] if shift else divergence
    total = divergence.sum()
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (rows * ranks.vocab)  # 0 / 0 = NaN with no kept position, as TRL's mean
    first = rows if labels is not None else (*out_shape, ranks.vocab)[0]
    return total / max(first, 1)


def _check_head(role: str, hidden, weight, bias) -> None:
    """``check_head`` with the messages naming ``role``'s arguments (``student_hidden``, ...)."""
    try:
        check_head(hidden, weight, bias)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{role}_{error}") from None


def _check_same_positions(student_hidden, student_weight, teacher_hidden, teacher_weight):
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            "teacher_hidden: expected student_hidden's positions "
            f"{tuple(student_hidden.shape[:-1])} (shape[:-1]), "
            f"got {tuple(teacher_hidden.shape[:-1])}"
        )
    if teacher_hidden.dtype != student_hidden.dtype:
        raise TypeError(
            f"teacher_hidden: expected student_hidden's dtype {student_hidden.dtype}, got "
            f"{teacher_hidden.dtype} (cast one of them: both heads' blocks run in one dtype)"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(
            f"teacher_hidden: expected student_hidden's device {student_hidden.device}, "
            f"got {teacher_hidden.device}"
        )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight: expected the student's vocabulary size V = "
            f"{student_weight.shape[0]} (with a process group: this rank's slice), "
            f"got {teacher_weight.shape[0]}"
        )


def _check_num_items(num_items, reduction: str) -> None:
    if reduction == "none":
        raise ValueError(
            "num_items_in_batch: divides the summed divergence, so it needs a reduction other "
            "than 'none', got reduction='none'"
        )
    check_num_items(num_items)


def _kept_rows(lead, labels, ignore_index, shift, device) -> Tensor | None:
    """Flat indices of the positions that count (those whose label, ``labels[..., t + 1]``
    with ``shift``, is not ``ignore_index``; with ``shift`` never the last), None for all."""
    if labels is None and not shift:
        return None
    keep = torch.ones(lead, dtype=torch.bool, device=device)
    if labels is not None:
        keep = labels != ignore_index
    if shift:
        shifted = torch.zeros_like(keep)
        shifted[..., :-1] = keep[..., 1:]
        keep = shifted
    index = keep.reshape(-1).nonzero().squeeze(1)
    return None if index.numel() == keep.numel() else index


@dataclass(frozen=True)
class _Options:
    beta: float
    transform: LogitTransform
    plan: BlockPlan


class _Head(NamedTuple):
    hidden2d: Tensor
    weight: Tensor
    bias: Tensor | None


class _Block(NamedTuple):
    """Rows ``[r0, r1)``; per head (student, teacher): the rows and weight shard in the compute
    dtype, the centred logits ``z - max`` (fp32, in the head's workspace), the ``[rows, 1]``
    offsets that make them log-probabilities (``log_sum``, plus the residual) and the workspace;
    ``gap``: ``[rows, 1]``, the teacher's offset less the student's, formed as the difference of
    the log-sums plus that of the residuals (not rounded at ``|log_sum|`` after adding a residual).
    Centred logits and offsets are kept apart so that the difference of two heads' log-probs is
    formed from the (small) difference of their centred logits, not rounded at ``|log p|``."""

    r0: int
    r1: int
    rows: tuple[Tensor, Tensor]
    weights: tuple[Tensor, Tensor]
    logs: tuple[Tensor, Tensor]
    offsets: tuple[Tensor, Tensor]
    gap: Tensor
    works: tuple[_Workspace, _Workspace]


def _shards(heads, index, lses, options, residuals=None):
    """For each vocabulary shard ``[v0, v1)``: ``(v0, v1, blocks)``, ``blocks`` yielding the
    shard's ``_Block``s chunk by chunk. Both heads' rows are cut alike, so a block holds the
    same positions and tokens of both. ``lses``: each head's ``[2, N]`` (row maximum, centred
    log-sum ``log sum exp(z - max)``); a block's log-probabilities are ``(z - max) - log_sum``
    and, with ``residuals`` (``[2, N]``, see ``_row_terms``), that minus the residual: the
    block's ``logs`` hold ``z - max``, its ``offsets`` the rest."""
    plan, device = options.plan, heads[0].hidden2d.device
    stat_dtype = lses[0].dtype
    rows = [_Rows(head.hidden2d, index, plan) for head in heads]
    works = (_Workspace(plan, device), _Workspace(plan, device))

    def blocks(params):
        for (r0, r1, h_s), (_, _, h_t) in zip(*rows, strict=True):
            logs, offsets = [], []
            for i, (h, (w, b), work) in enumerate(zip((h_s, h_t), params, works, strict=True)):
                log = _block_logits(h, w, b, options.transform.rows(r0, r1), work, stat_dtype)
                logs.append(log.sub_(lses[i][0, r0:r1, None]))
                offset = lses[i][1, r0:r1, None]
                offsets.append(offset if residuals is None else offset + residuals[i, r0:r1, None])
            gap = lses[1][1, r0:r1, None] - lses[0][1, r0:r1, None]
            if residuals is not None:
                gap = gap + (residuals[1, r0:r1, None] - residuals[0, r0:r1, None])
            yield _Block(
                r0, r1, (h_s, h_t), (params[0][0], params[1][0]), tuple(logs), tuple(offsets),
                gap, works,
            )  # fmt: skip

    for v0, v1 in plan.shards:
        params = [_shard_params(head.weight, head.bias, v0, v1, plan) for head in heads]
        yield v0, v1, blocks(params)


def _probs(block: _Block, i: int, work: _Workspace, role: str) -> Tensor:
    """``exp(log - offset)`` of head ``i`` in ``work``'s ``role`` buffer, the exponent floored as
    ``_blocks._floor_`` does (``log`` itself keeps its value: a tiny probability's log enters the
    divergence)."""
    log = block.logs[i]
    out = torch.sub(log, block.offsets[i], out=work.get(role, *log.shape, log.dtype))
    return out.clamp_(min=log_floor(log.dtype)).exp_()


def _mixture(p: Tensor, q: Tensor, beta: float, work: _Workspace) -> Tensor:
    """``beta * q + (1 - beta) * p``, which the floored ``p`` and ``q`` keep above 0."""
    m = torch.mul(q, beta, out=work.get("mixture", *p.shape, p.dtype))
    return m.add_(p, alpha=1.0 - beta)


def _log_ratios(block: _Block, beta: float, work: _Workspace):
    """``(log(p / m), log(q / m))`` of a block, in place of its centred logits ``logs``, with
    ``m = beta * q + (1 - beta) * p``, and 0 where ``p`` (``q``) is 0 (a ``-inf`` logit:
    0 log 0 = 0). In terms of ``u = log q - log p + log(beta / (1 - beta))``:

        log(p / m) = -log1p(-beta) - softplus(u),   log(q / m) = -log(beta) - softplus(-u)

    with ``softplus(±u) = log1p(exp(-|u|)) + max(±u, 0)``: no ``exp`` and ``log`` round trip of
    the probabilities, whose rounding (1e-7 relative) would swamp a divergence of order ``beta``
    when ``beta`` (or ``1 - beta``) is small. Where ``d = log q - log p`` is near 0 (``_near``)
    both cancel to about ``-beta * d`` from terms near ``log 2`` (an error of half an ulp of
    ``log 2``, 3e-8 in fp32, the whole log-ratio of near-equal heads), so there they are

        log(p / m) = -log1p(beta * expm1(d)),   log(q / m) = -log1p((1 - beta) * expm1(-d))

    exact to the rounding of ``d``. Uses ``work``'s ``ratio`` and ``mixture``."""
    logs = block.logs
    zero = [log == -math.inf for log in logs]
    d = torch.sub(logs[1], logs[0], out=work.get("ratio", *logs[0].shape, logs[0].dtype))
    d.sub_(block.gap)
    near = _near(d)
    u = torch.add(d, math.log(beta) - math.log1p(-beta), out=logs[1])
    shared = torch.abs(u, out=work.get("mixture", *u.shape, u.dtype)).neg_().exp_().log1p_()
    log_p = torch.clamp(u, min=0.0, out=logs[0]).add_(shared).add_(math.log1p(-beta)).neg_()
    log_q = u.clamp_(max=0.0).sub_(shared).sub_(math.log(beta))
    for log, weight, sign in ((log_p, beta, 1.0), (log_q, 1.0 - beta, -1.0)):
        close = torch.mul(d, sign, out=shared).expm1_().mul_(weight).log1p_().neg_()
        torch.where(near, close, log, out=log)
    return log_p.masked_fill_(zero[0], 0.0), log_q.masked_fill_(zero[1], 0.0)


def _log_ratio(block: _Block, x: int, y: int) -> Tensor:
    """``log x - log y`` of a block, in place of ``logs[x]``, 0 where ``x`` is 0 (0 log 0 = 0;
    where only ``y`` is 0 it is ``+inf``, as the divergence)."""
    logs = block.logs
    zero = logs[x] == -math.inf
    gap = block.gap if x == 1 else -block.gap  # offset of x less offset of y
    return logs[x].sub_(logs[y]).sub_(gap).masked_fill_(zero, 0.0)


def _near(log_ratio: Tensor) -> Tensor:
    """Where ``|log_ratio| < 1``: there a difference of two probabilities is formed as one of them
    times ``expm1(log_ratio)``, elsewhere as the difference (no cancellation). Two boolean
    temporaries, not an fp32 ``abs``."""
    return (log_ratio > -1.0).logical_and_(log_ratio < 1.0)


def _kl_order(beta: float) -> tuple[int, int]:
    """For ``beta`` 0 or 1, the divergence is ``KL(x || y)``: (index of x, index of y) among
    (student, teacher)."""
    return (1, 0) if beta == 0 else (0, 1)


def _divergence_sums(heads, index, lses, options) -> Tensor:
    """Per-row sums over the blocks, of the probabilities ``p~ = exp(z_s - lse_s)``, ``q~ =
    exp(z_t - lse_t)`` as the fp32 log-sum-exps give them (see ``_row_terms``): for beta 0 or 1,
    ``[sum x~ * (log x~ - log y~), sum x~, sum y~, sum (y~ - x~)]``; else, with ``m~ = beta * q~
    + (1 - beta) * p~``, ``[sum p~ * log(p~ / m~), sum q~ * log(q~ / m~), sum p~, sum q~, sum p~
    q~ / m~, sum (q~ - p~)]``. The last sum is the difference of the two masses, summed term by
    term: the difference of the two summed masses would carry both sums' rounding."""
    beta, plan = options.beta, options.plan
    general = 0 < beta < 1
    sums = lses[0].new_zeros(6 if general else 4, plan.rows)
    for _, _, blocks in _shards(heads, index, lses, options):
        for block in blocks:
            r0, r1 = block.r0, block.r1
            work = block.works[0]
            if general:
                p, q = _probs(block, 0, work, "p"), _probs(block, 1, work, "q")
                m = _mixture(p, q, beta, work)
                ratio = torch.div(q, m, out=work.get("ratio", *m.shape, m.dtype))
                sums[4, r0:r1] += torch.linalg.vecdot(p, ratio)
                # q~ - p~ as p~ * expm1(log q~ - log p~) where the two are near: without the
                # rounding of either exp (1.5e-8 at 0.33, the whole divergence of near-equal
                # heads). Elsewhere (a 0 or floored probability among them) as it is.
                change = torch.sub(block.logs[1], block.logs[0], out=ratio).sub_(block.gap)
                near = _near(change)
                change.expm1_().mul_(p)
                apart = torch.sub(q, p, out=work.get("mixture", *p.shape, p.dtype))
                sums[5, r0:r1] += torch.where(near, change, apart, out=change).sum(1)
                log_ratios = _log_ratios(block, beta, work)
                for k, (prob, log_ratio) in enumerate(zip((p, q), log_ratios, strict=True)):
                    sums[k, r0:r1] += torch.linalg.vecdot(prob, log_ratio)
                    sums[2 + k, r0:r1] += prob.sum(1)
            else:
                x, y = _kl_order(beta)
                prob_x = _probs(block, x, work, "p")
                prob_y = _probs(block, y, work, "q")
                sums[1, r0:r1] += prob_x.sum(1)
                sums[2, r0:r1] += prob_y.sum(1)
                zero_x = block.logs[x] == -math.inf
                log_ratio = _log_ratio(block, x, y)
                sums[0, r0:r1] += torch.linalg.vecdot(prob_x, log_ratio)
                # x~ - y~ as y~ * expm1(log x~ - log y~) where the two are near: without the
                # rounding of either exp (1.5e-8 at 0.33, the whole divergence of near-equal
                # heads). Elsewhere (a 0 or floored probability among them) as it is.
                near = _near(log_ratio).logical_and_(zero_x.logical_not_())
                shape = log_ratio.shape
                change = torch.expm1(log_ratio, out=work.get("ratio", *shape, log_ratio.dtype))
                change.mul_(prob_y)
                apart = prob_x.sub_(prob_y)
                sums[3, r0:r1] -= torch.where(near, change, apart, out=change).sum(1)
    return sums


class _RowTerms(NamedTuple):
    """``divergence`` ``[N]``; ``kl``: ``[KL(x || y)]`` (beta 0 or 1) or ``[KL(p || m),
    KL(q || m)]``, ``[k, N]``; ``residuals``: ``[2, N]``, the student's and teacher's
    ``log(sum exp(z - lse))``."""

    divergence: Tensor
    kl: Tensor
    residuals: Tensor


def _row_terms(sums: Tensor, beta: float) -> _RowTerms:
    """The divergence terms of ``_divergence_sums``' sums, corrected for the rounding of the
    log-sum-exps to fp32.

    ``lse`` is the fp32 rounding of ``max + log(sum_exp)``: off by up to half an ulp of its
    magnitude (4e-6 at |lse| = 100, which low temperatures reach), which shifts every
    log-probability of the row alike; the naive ``log_softmax`` keeps ``x - max`` and
    ``log(sum_exp)`` apart instead. The masses ``M = sum p~`` measure the shift, ``eps =
    log M``, with the true ``p = p~ / M``. For beta 0 or 1, exactly: ``KL(x || y) = A / M_x -
    eps_x + eps_y``. Else to first order in ``eps`` (``|eps|^2`` is below fp32 resolution):
    ``KL(p || m) = k_p (1 - eps_p) + beta R (eps_q - eps_p)``, ``KL(q || m) = k_q (1 - eps_q)
    + (1 - beta) R (eps_p - eps_q)`` with ``R = sum p~ q~ / m~``. The backward pass subtracts
    ``eps`` from each log-probability. The mass difference ``sum (y~ - x~)`` (beta 0 or 1; ``sum
    (q~ - p~)`` else) is summed as ``y~ * -expm1(log x~ - log y~)``, and ``eps_y - eps_x`` taken
    from it, not from ``M_y``: the rounding of each ``exp`` (half an ulp of ``p~``) would
    otherwise be the whole divergence of two near-equal heads."""
    if 0 < beta < 1:
        kl_p, kl_q, mass_p, _, ratio, mass_diff = sums
        shift = torch.log1p(mass_diff / mass_p)  # eps_q - eps_p, without either sum's rounding
        # eps_q from the shift, not from mass_q: the backward pass's log-ratios then carry the
        # same difference as the divergence.
        eps_p = mass_p.log()
        eps_q = eps_p + shift
        kl_p = kl_p * (1.0 - eps_p) + beta * ratio * shift
        kl_q = kl_q * (1.0 - eps_q) - (1.0 - beta) * ratio * shift
        divergence = beta * kl_q + (1.0 - beta) * kl_p
        return _RowTerms(divergence, torch.stack([kl_p, kl_q]), torch.stack([eps_p, eps_q]))
    x, _ = _kl_order(beta)
    weighted, mass_x, _, mass_diff = sums
    # eps_y - eps_x from the mass difference, not from mass_y: the backward pass's log-ratios
    # then carry the same difference as the divergence.
    eps_x = mass_x.log()
    eps_y = eps_x + torch.log1p(mass_diff / mass_x)
    divergence = weighted / mass_x - eps_x + eps_y
    residuals = torch.stack([eps_x, eps_y] if x == 0 else [eps_y, eps_x])
    return _RowTerms(divergence, divergence[None], residuals)


def _gradients(heads, index, lses, terms: _RowTerms, grad_rows, options, needs):
    """Both heads' (hidden, weight, bias) gradients of ``sum(grad_rows * divergence)``.

    With ``d = log x - log y`` summed as ``D = sum x * d`` (the KL terms of ``terms``), the
    gradient with respect to the logits of ``x``'s head is ``x * (d - D)`` and, for beta 0 or 1,
    with respect to those of ``y``'s head ``y - x``; the generalised JSD's terms are
    ``(1 - beta) * p * (log p - log m - KL(p || m))`` and ``beta * q * (log q - log m -
    KL(q || m))`` (the mixture's own derivative cancels). Each is then divided by the
    temperature, ``d z / d x`` of ``z = x / temperature``."""
    beta, plan, transform = options.beta, options.plan, options.transform
    stat_dtype = lses[0].dtype
    sinks = [
        _HeadGradients(*head, index, plan, needs[3 * i : 3 * i + 3], stat_dtype)
        if any(needs[3 * i : 3 * i + 3])
        else None
        for i, head in enumerate(heads)
    ]
    general = 0 < beta < 1
    for v0, v1, blocks in _shards(heads, index, lses, options, terms.residuals):
        for sink in sinks:
            if sink is not None:
                sink.start_shard(v0, v1)
        for block in blocks:
            r0, r1 = block.r0, block.r1
            # d z / d x = 1 / temperature, folded into the per-row factor.
            upstream = grad_rows[r0:r1, None] / transform.rows(r0, r1).temperature
            kl = terms.kl[:, r0:r1, None]
            work = block.works[0]
            grads = [None, None]
            # A token a head masks (-inf logit, p = 0) gets no gradient from that head's
            # p * (log ratio - KL) term, even where the row's KL is not finite (0, not 0 * NaN).
            masked = [log == -math.inf for log in block.logs]
            if general:
                probs = _probs(block, 0, work, "p"), _probs(block, 1, work, "q")
                log_ratios = _log_ratios(block, beta, work)
                for i, weight in ((0, 1.0 - beta), (1, beta)):
                    if sinks[i] is not None:
                        grads[i] = log_ratios[i].sub_(kl[i]).mul_(probs[i])
                        grads[i].mul_(upstream * weight).masked_fill_(masked[i], 0.0)
            else:
                x, y = _kl_order(beta)
                prob_x = _probs(block, x, work, "p")
                prob_y = _probs(block, y, work, "q") if sinks[y] is not None else None
                log_ratio = _log_ratio(block, x, y)
                if sinks[y] is not None:
                    # y - x as x * expm1(log y - log x) where the two are near, as the
                    # divergence's mass difference (_divergence_sums).
                    near = _near(log_ratio).logical_and_(masked[x].logical_not())
                    ratio = work.get("ratio", *log_ratio.shape, log_ratio.dtype)
                    change = torch.neg(log_ratio, out=ratio).expm1_().mul_(prob_x)
                    apart = torch.sub(prob_y, prob_x, out=block.logs[y])
                    grads[y] = torch.where(near, change, apart, out=change).mul_(upstream)
                    grads[y].masked_fill_(masked[x] & masked[y], 0.0)  # q - p = 0 - 0
                if sinks[x] is not None:
                    grads[x] = log_ratio.sub_(kl[0]).mul_(prob_x).mul_(upstream)
                    grads[x].masked_fill_(masked[x], 0.0)
            for i, sink in enumerate(sinks):
                if sink is not None:
                    sink.add(
                        grads[i], block.rows[i], block.weights[i], r0, r1, v0, v1, block.works[i]
                    )
        for sink in sinks:
            if sink is not None:
                sink.finish_shard(v0, v1)
    return [grad for sink in sinks for grad in (sink.result() if sink is not None else (None,) * 3)]


class _JSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student2d,
        student_weight,
        student_bias,
        teacher2d,
        teacher_weight,
        teacher_bias,
        index,
        options,
        vocab_parallel,
    ):
        heads = (
            _Head(student2d, student_weight, student_bias),
            _Head(teacher2d, teacher_weight, teacher_bias),
        )
        forward_stats = _block_functions(student2d, options.transform)[0]
        lses = []
        for head in heads:
            stats = forward_stats(*head, index, None, options.transform, options.plan, False, False)
            if vocab_parallel is not None:
                stats = vocab_parallel.combine(stats)
            # (max, log_sum): a block's log-probabilities are (z - max) - log_sum, exact for
            # the largest logit, where z - lse would carry lse's rounding (eps * |lse|).
            lses.append(torch.stack([stats.max, stats.log_sum]))
        sums = _divergence_sums(heads, index, lses, options)
        if vocab_parallel is not None:
            vocab_parallel.sum_(sums)
        terms = _row_terms(sums, options.beta)
        ctx.save_for_backward(
            *(t for head in heads for t in head), index, *lses, terms.kl, terms.residuals
        )
        ctx.options, ctx.vocab_parallel = options, vocab_parallel
        return terms.divergence

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_divergence):
        saved = ctx.saved_tensors
        heads = (_Head(*saved[0:3]), _Head(*saved[3:6]))
        index, lses = saved[6], saved[7:9]
        terms = _RowTerms(None, *saved[9:11])
        grads = _gradients(
            heads, index, lses, terms, grad_divergence, ctx.options, ctx.needs_input_grad[:6]
        )
        if ctx.vocab_parallel is not None:
            for i in (0, 3):
                if grads[i] is not None:
                    grads[i] = ctx.vocab_parallel.reduce_grad(grads[i])
        return (*grads, None, None, None)
