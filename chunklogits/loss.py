"""Cross-entropy of a linear head without materialising its logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from . import _blocks, _library
from ._blocks import BlockPlan, LogitTransform, RowStats, _check_count, plan_head, row_stats
from ._checks import (
    check_bool,
    check_choice,
    check_head,
    check_ignore_index,
    check_in_vocab,
    check_num_items,
    check_real_in,
    check_shift,
    check_tensor,
    check_token_tensor,
    flat_rows,
    make_transform,
)
from .distributed import checked_on_every_rank

_REDUCTIONS = ("mean", "sum", "none")
# The fewest rows per chunk with which grad_in_forward=None takes the fused pass (see there).
_FUSED_MIN_ROWS = 128


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    shards: int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    temperature: float | Tensor = 1.0,
    shift: bool = False,
    class_weight: Tensor | None = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    process_group: ProcessGroup | None = None,
    grad_in_forward: bool | None = None,
) -> Tensor | LossOutput:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, never holding the logits.

    Naive equivalent (``reference.linear_cross_entropy``)::

        z = F.linear(hidden, weight, bias).float() * logit_scale   # scale, softcap optional
        z = softcap * torch.tanh(z / softcap)
        z = z / temperature                # a tensor: temperature[..., None]
        if shift: z, labels = z[..., :-1, :], labels[..., 1:]
        loss = F.cross_entropy(z.flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing,
                               weight=class_weight)
        # + z_loss * logsumexp(z)^2 per label (times the label's class weight), reduced the
        # same way

    Args:
        hidden: ``[..., D]`` activations in the model dtype (fp16, bf16, fp32 or fp64).
        weight: ``[V, D]`` output embedding, hidden's dtype and device.
        labels: ``hidden.shape[:-1]`` integer targets in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` or None.
        shards: number of vocabulary shards per pass (``1 <= shards <= V``); None picks it from
            the block budget (``chunklogits.set_block_budget``).
        chunk_size: rows per block; None picks it from the block budget.
        ignore_index: label value that contributes neither loss nor gradient. Such rows are
            dropped before any logits are computed.
        reduction: ``"mean"`` (over non-ignored labels), ``"sum"`` or ``"none"`` (labels' shape,
            ``labels[..., 1:]``'s with ``shift``, 0 at ignored positions), as ``F.cross_entropy``.
        num_items_in_batch: with ``reduction="mean"``, divide the sum by this count instead of
            the number of non-ignored labels (transformers' gradient-accumulation rule).
        label_smoothing: ``eps`` in ``[0, 1]``: the target is ``(1 - eps) * onehot + eps / V``.
        z_loss: coefficient of ``logsumexp(z)^2`` added to each label's loss (PaLM).
        softcap: ``c`` of Gemma-2/3's ``c * tanh(z / c)``, applied after ``logit_scale``.
        logit_scale: multiplier of the raw logits (Cohere ``logit_scale``, Granite
            ``1 / logits_scaling``).
        temperature: divides the (softcapped) logits: a float, or one per position, a
            floating tensor of ``hidden.shape[:-1]`` (or flattened) on hidden's device, finite
            and positive, ``temperature[..., t]`` dividing the logits of ``hidden[..., t, :]``
            (with ``shift`` those that predict ``labels[..., t + 1]``; the last position's is
            unused), not differentiated (one requiring grad is refused). Per-position
            temperatures take the PyTorch block loop on every device. The token accuracy's
            comparisons do not depend on it.
        shift: predict ``labels[..., t + 1]`` from ``hidden[..., t, :]`` (causal LM training)
            without copying hidden.
        class_weight: ``[V]`` fp32 (or hidden's dtype) non-negative weights per class, as
            ``F.cross_entropy(weight=)`` and Liger's ``ce_weight``: each label's loss (and its
            z-loss term) is multiplied by its class's weight, and ``"mean"`` divides by the
            summed weights of the non-ignored labels (by ``num_items_in_batch`` when given).
            Not combined with ``label_smoothing`` (refused).
        return_z_loss: also return the z-loss term (already included in the loss), reduced as
            the loss, for logging.
        return_token_accuracy: also return, from the same pass, whether each non-ignored label
            is the argmax of the logits the model's own head returns (model-dtype logits, the
            head's transform applied in that dtype; a label counts when no logit is strictly
            greater than its own): the fraction for ``"mean"``, the count for ``"sum"``, 1 or
            0 per label (0 at ignored positions) for ``"none"``. Not differentiable.
        process_group: vocabulary parallelism (``chunklogits.distributed``): ``weight`` and
            ``bias`` are this rank's slice of the head, the slices of the group's ranks following
            one another in rank order; hidden and labels are the same on every rank. Returns the
            whole vocabulary's loss on every rank; ``shards`` counts this rank's slice. Every rank
            must call ``backward``: each gets its slice's weight and bias gradients and the full
            (all-reduced) gradient of hidden.
        grad_in_forward: compute the gradients of hidden, weight and bias (and of a
            ``class_weight`` that requires grad) during the forward pass, so that ``backward``
            only scales them (see "Memory and time"). Needs a scalar loss (``reduction``
            "mean" or "sum"). ``True`` forces it, ``False`` forbids it, ``None`` (default) uses
            it when gradients of hidden, weight or bias are needed, it holds no more memory than
            the recomputing path (an fp32 or fp64 weight, whose fp32 gradient is its own sum, or
            a frozen half-precision weight whose GEMMs run in its dtype; a trainable one would
            need an fp32 ``[V, D]`` sum of its gradient beyond the block budget: 226 against
            16 MiB of working memory at N = 1,024, D = 1,024, V = 32,768), the device is one the
            Triton kernels do not serve, and the budget holds the logits of at least
            ``_FUSED_MIN_ROWS`` rows (128) for the whole vocabulary. Why: the fused pass saves
            one GEMM of ``2 N V D`` flops but keeps each row chunk's logits for the whole
            vocabulary, so its chunks hold fewer rows (GEMMs of few rows run slower on CPUs)
            and its blocks are written out of the cache and read back. Measured side by side
            (``bench/test_bench_loss.py::test_gradient_path_choice``, AVX512-BF16 without AMX),
            the fused pass takes 0.75x the recomputing path's time for a frozen bf16 weight and
            0.87x for an fp32 one at D = 1,024, V = 32,768 (186-row chunks), but 1.26x and
            1.17x at D = 256, V = 128,256 (59-row chunks); with AVX2 and fp32 GEMMs, 1.24x
            against 1.66x the three-GEMM floor at D = 1,024. Where the CPU has AMX, its
            half-precision GEMMs are so fast that the passes decide: a half-precision weight
            keeps the recomputing path there (2.2x against 1.84x the floor). The rule reads
            dtypes, the instruction set and the budget, never a timing; the two paths differ
            only in the rounding of the gradients. The fused pass computes no top-k statistic:
            with ``return_token_accuracy``, ``None`` uses the recomputing path and ``True`` is
            refused (ValueError). ``class_weight`` and ``return_z_loss`` are served by both.
            Either way the loss behaves as an autograd op: ``backward(retain_graph=True)`` may
            be called again, with the same gradients.

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or per label for ``reduction="none"``.
        Differentiable with respect to hidden, weight and bias. With ``return_z_loss`` or
        ``return_token_accuracy``: ``LossOutput(loss, z_loss, token_accuracy)``, the fields not
        asked for None.

    Memory and time: the logits exist one block (``chunk_size x V / shards``) at a time; the
    forward pass keeps four fp32 numbers per row and saves only the log-sum-exp for backward.
    The backward pass recomputes each block's logits: one more ``2 N V D`` GEMM than the naive
    version (8 instead of 6 ``N V D``).

    With ``grad_in_forward`` the rows are walked in chunks, each through the whole vocabulary,
    and a chunk's fp32 logits (``chunk x V``) are kept from its log-sum-exp to its gradient, so
    each block is computed once (6 ``N V D``, Liger-Kernel's strategy). The gradients then exist
    from the forward pass on: hidden's as an fp32 ``[N, D]`` buffer, weight's as an fp32
    ``[V, D]`` sum over the chunks, saved with the graph. The backward pass scales them by the
    loss's gradient in place and returns them, or, when it retains the graph
    (``retain_graph=True``), returns scaled copies (another fp32 ``[V, D]`` while the graph
    lives) so that a later backward gets the same gradients. For an fp32 weight that sum is the
    gradient itself and the kept logits fit the block budget. For a half-precision weight the
    sum is memory beyond the gradient (4 bytes per weight entry), the kept logits may then be
    as large (chunks of up to ``D`` rows: GEMMs of few rows are slow on CPUs), and where the
    CPU's GEMMs run in fp32 for half-precision inputs (``set_cpu_gemm_dtype``) an fp32 copy of
    the weight is made once (another 4 bytes per entry). The PyTorch block loop serves this path
    on every device.
    """
    with checked_on_every_rank(process_group) as ranks:
        # One node of the graph under torch.compile (see chunklogits._library), which checks
        # the values of the labels and the temperatures. Vocabulary parallelism and the extra
        # outputs run the engine in the trace instead. (``is False``: the flags are checked by
        # _check_arguments, which this decides for; no flag of another type is read as a bool.)
        custom_op = torch.compiler.is_compiling() and process_group is None
        custom_op = custom_op and return_z_loss is False and return_token_accuracy is False
        labels, transform = _check_arguments(
            hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch,
            label_smoothing, z_loss, softcap, logit_scale, temperature, shift, class_weight,
            return_z_loss, return_token_accuracy, grad_in_forward, read_values=not custom_op,
        )  # fmt: skip
        if custom_op:
            return _custom_op_loss(
                hidden, weight, labels, bias, class_weight, num_items_in_batch, shards,
                chunk_size, ignore_index, reduction, label_smoothing, z_loss, transform,
                temperature, shift, grad_in_forward,
            )  # fmt: skip
        rows = _Labelled.select(hidden, weight, labels, ignore_index, shift, shards, chunk_size)
        transform = transform.selected(rows.index)
        vocab_slice = ranks.agree(rows.hidden2d, weight, bias, transform, rows.targets, "labels")
    fused_plan = _fused_plan(
        hidden, weight, bias, rows, ranks.vocab, shards, chunk_size, reduction, grad_in_forward,
        return_token_accuracy,
    )  # fmt: skip
    fused = fused_plan is not None
    if fused:
        rows = rows._replace(plan=fused_plan)
    check_in_vocab("labels", rows.targets, ranks.vocab, ignore_index)
    row_weight = _row_weights(class_weight, rows.targets, ranks.vocab, hidden.dtype)
    row_loss = _RowLoss(label_smoothing, z_loss)
    result = row_stats(
        rows.hidden2d,
        weight,
        bias,
        index=rows.index,
        targets=rows.targets,
        transform=transform,
        plan=rows.plan,
        want_mean=label_smoothing > 0,
        vocab_parallel=vocab_slice,
        top_k=1 if return_token_accuracy else 0,
        row_loss=row_loss if fused else None,
        row_weight=row_weight if fused else None,
    )
    if fused:
        (stats, total), per_row = result, None
    else:
        stats, per_row = result, row_loss(result, row_weight)
        total = per_row.sum()
    loss = rows.reduce(per_row, reduction, num_items_in_batch, row_weight, total=total)
    if not (return_z_loss or return_token_accuracy):
        return loss
    return _with_extra_outputs(
        loss, stats, rows, row_weight, reduction, num_items_in_batch, z_loss, return_z_loss,
        return_token_accuracy,
    )  # fmt: skip


class LossOutput(NamedTuple):
    """``linear_cross_entropy(..., return_z_loss=True and/or return_token_accuracy=True)``: the
    loss (z-loss included), the z-loss term alone (None unless ``return_z_loss``) and the token
    accuracy (None unless ``return_token_accuracy``), each reduced as ``reduction`` says (see
    ``linear_cross_entropy``); the field names are Liger's ``CrossEntropyOutput``'s."""

    loss: Tensor
    z_loss: Tensor | None
    token_accuracy: Tensor | None


def token_accuracy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    top_k: int = 1,
    ignore_index: int = -100,
    shift: bool = False,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    shards: int | None = None,
    chunk_size: int | None = None,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """The fraction of non-ignored positions whose label is among the ``top_k`` largest logits,
    never holding the logits (TRL's SFT ``mean_token_accuracy`` for ``top_k=1``).

    Naive equivalent (``reference.token_accuracy``)::

        z = model_logits(hidden, weight, bias, softcap, logit_scale).float()  # the head's own
        if shift: z, labels = z[..., :-1, :], labels[..., 1:]
        kept = labels != ignore_index
        above = (z[kept] > z[kept].gather(-1, labels[kept][:, None])).sum(-1)
        accuracy = (above < top_k).float().mean()

    A label counts when fewer than ``top_k`` logits are strictly greater than its own (ties with
    the ``top_k``-th logit count). The comparisons are made on the logits the model's own head
    returns: the product rounded to the model dtype, the head's transform (``logit_scale``,
    ``softcap``) applied in that dtype, whatever dtype the block GEMMs run in.

    Args:
        hidden ``[..., D]``, weight ``[V, D]``, labels ``hidden.shape[:-1]``, bias, ignore_index,
            shift, softcap, logit_scale, shards, chunk_size, process_group: as in
            ``linear_cross_entropy``.
        top_k: an int in ``[1, V]``.

    Returns:
        fp32 scalar (fp64 for fp64 inputs) in ``[0, 1]``; NaN when every label is ignored (as
        the mean of nothing). Not differentiable.
    """
    with checked_on_every_rank(process_group) as ranks:
        check_head(hidden, weight, bias)
        labels = _check_labels(labels, hidden, ignore_index, shift)
        _check_count("top_k", top_k, 1, optional=False)
        transform = make_transform(softcap, logit_scale)
        rows = _Labelled.select(hidden, weight, labels, ignore_index, shift, shards, chunk_size)
        vocab_slice = ranks.agree(
            rows.hidden2d.detach(),
            weight,
            bias,
            transform,
            rows.targets,
            "labels",
            top_k=("top_k", top_k),
        )
    check_in_vocab("labels", rows.targets, ranks.vocab, ignore_index)
    with torch.no_grad():
        stats = row_stats(
            rows.hidden2d,
            weight,
            bias,
            index=rows.index,
            targets=rows.targets,
            transform=transform,
            plan=rows.plan,
            vocab_parallel=vocab_slice,
            top_k=top_k,
        )
    return (stats.top.above_target() < top_k).to(stats.lse.dtype).mean()


class _Labelled(NamedTuple):
    """The rows of a labelled call that are not ignored: ``hidden2d [M, D]``, ``index`` of the
    kept rows (None: all), their ``targets [N]``, the flat targets with ignored positions, the
    labels' shape, ``shift`` and the block plan."""

    hidden2d: Tensor
    index: Tensor | None
    targets: Tensor
    flat_targets: Tensor
    shape: tuple[int, ...]
    shift: bool
    plan: BlockPlan

    @staticmethod
    def select(hidden, weight, labels, ignore_index, shift, shards, chunk_size) -> _Labelled:
        targets_full = labels
        if shift:
            targets_full = labels.new_full(labels.shape, ignore_index)
            targets_full[..., :-1] = labels[..., 1:]
        flat_targets = targets_full.reshape(-1)
        index, targets = None, flat_targets
        if not flat_targets.is_meta:  # meta labels have no values: shapes only, all counted
            index = (flat_targets != ignore_index).nonzero().squeeze(1)
            targets = flat_targets[index]
            if index.numel() == flat_targets.numel():
                index, targets = None, flat_targets
        plan = plan_head(
            targets.numel(),
            hidden,
            weight,
            shards=shards,
            chunk_size=chunk_size,
        )
        return _Labelled(
            flat_rows(hidden), index, targets, flat_targets, tuple(labels.shape), shift, plan
        )

    def reduce(self, per_row, reduction, num_items=None, row_weight=None, total=None) -> Tensor:
        """``per_row [N]`` (kept rows) reduced: per label (0 at ignored positions, ``labels
        [..., 1:]``'s shape with ``shift``), summed, or averaged over ``num_items``, the summed
        ``row_weight`` or the number of kept rows. ``total``: the sum when already known (the
        fused pass's loss; ``per_row`` is then unused)."""
        if reduction == "none":
            out = per_row
            if self.index is not None:
                out = per_row.new_zeros(self.flat_targets.shape).index_put((self.index,), per_row)
            out = out.reshape(self.shape)
            return out[..., :-1] if self.shift else out
        total = per_row.sum() if total is None else total
        if reduction == "sum":
            return total
        if num_items is not None:
            return total / torch.as_tensor(num_items, device=total.device)
        if row_weight is not None:
            return total / row_weight.sum()
        return total / self.targets.numel()


def _check_arguments(
    hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, label_smoothing,
    z_loss, softcap, logit_scale, temperature, shift, class_weight, return_z_loss,
    return_token_accuracy, grad_in_forward, *, read_values: bool,
) -> tuple[Tensor, LogitTransform]:  # fmt: skip
    """``linear_cross_entropy``'s arguments checked before any block is computed: the labels as
    int64 and the ``LogitTransform`` (``make_transform``; the temperatures' values are not read
    without ``read_values``: the custom op checks them when it runs). What needs the whole
    vocabulary (the labels' range, ``class_weight``'s size) is checked once the ranks agreed."""
    check_head(hidden, weight, bias)
    labels = _check_labels(labels, hidden, ignore_index, shift)
    check_choice("reduction", reduction, _REDUCTIONS)
    check_real_in("label_smoothing", label_smoothing, 0, 1.0)
    check_real_in("z_loss", z_loss, 0, None)
    if num_items_in_batch is not None:
        _check_num_items(num_items_in_batch, reduction)
    _check_class_weight(class_weight, weight, label_smoothing)
    check_bool("return_z_loss", return_z_loss)
    check_bool("return_token_accuracy", return_token_accuracy)
    transform = make_transform(softcap, logit_scale, temperature, hidden, read_values=read_values)
    if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
        raise TypeError(f"grad_in_forward: expected True, False or None, got {grad_in_forward!r}")
    if grad_in_forward and reduction == "none":
        raise ValueError(
            "grad_in_forward: True needs a scalar loss (reduction 'mean' or 'sum'), "
            "got reduction='none'"
        )
    if grad_in_forward and return_token_accuracy:
        raise ValueError(
            "grad_in_forward: True does not serve return_token_accuracy=True (the fused pass "
            "computes no top-k statistic); use grad_in_forward=None or False"
        )
    return labels, transform


def _custom_op_loss(
    hidden, weight, labels, bias, class_weight, num_items_in_batch, shards, chunk_size,
    ignore_index, reduction, label_smoothing, z_loss, transform, temperature, shift,
    grad_in_forward,
) -> Tensor:  # fmt: skip
    """The loss as one node of the graph that ``torch.compile`` traces (``chunklogits._library``'s
    custom ops, whose schemas take these arguments in this order), the checked ``transform``
    giving the softcap and the logit scale."""
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = torch.tensor(num_items_in_batch, device=hidden.device)
    arguments = (
        hidden, weight, labels, bias, class_weight, num_items_in_batch, shards, chunk_size,
        ignore_index, reduction, label_smoothing, z_loss, transform.softcap,
        transform.logit_scale, *_library.temperature_arguments(temperature), shift,
        grad_in_forward,
    )  # fmt: skip
    needs = [_grads_needed(t) for t in (hidden, weight, bias, class_weight)]
    if reduction != "none" and any(needs):
        # The gradients from the forward call, as eager's cost (see _library).
        return _library.linear_cross_entropy_and_grads(needs, *arguments)[0]
    return _library.linear_cross_entropy(*arguments)


def _fused_plan(
    hidden, weight, bias, rows: _Labelled, vocab: int, shards, chunk_size, reduction: str,
    grad_in_forward: bool | None, return_token_accuracy: bool,
) -> BlockPlan | None:  # fmt: skip
    """The block plan of the ``grad_in_forward`` pass (row chunks through the whole vocabulary,
    ``vocab`` the group's, the same on every rank), or None where the loss takes the
    recomputing path: no gradient or no scalar loss asked for, no kept row, the token accuracy
    asked for (its top-1 statistic is computed by the recomputing path only), or, for
    ``grad_in_forward=None``, more memory or time (``_fused_fits``, chunks of fewer than
    ``_FUSED_MIN_ROWS`` rows) than the recomputing path (see ``linear_cross_entropy``)."""
    if reduction == "none" or rows.targets.numel() == 0 or not _grads_needed(hidden, weight, bias):
        return None
    if return_token_accuracy or grad_in_forward is False:
        return None
    if grad_in_forward is None and not _fused_fits(rows.hidden2d, weight):
        return None
    # Where an fp32 [V, D] sum of the weight gradient is held anyway, a chunk's kept logits may
    # be as large (D rows): CPU GEMMs of a few dozen rows run at a fraction of their speed.
    summed = _grads_needed(weight) and weight.dtype not in (torch.float32, torch.float64)
    kept_rows = hidden.shape[-1] if summed else 1
    plan = plan_head(
        rows.targets.numel(),
        hidden,
        weight,
        shards=shards,
        chunk_size=chunk_size,
        kept_vocab=vocab,
        kept_rows=kept_rows,
    )
    if grad_in_forward is None and plan.chunk_size < min(plan.rows, _FUSED_MIN_ROWS):
        return None
    return plan


def _row_weights(class_weight, targets: Tensor, vocab: int, dtype: torch.dtype) -> Tensor | None:
    """The class weight of each kept row's label (``[N]``, in the statistics' dtype for
    ``hidden``'s ``dtype``), or None without ``class_weight``, which must span the whole
    vocabulary (``vocab``: with a process group, the group's)."""
    if class_weight is None:
        return None
    if class_weight.shape[0] != vocab:
        raise ValueError(
            f"class_weight: expected shape [V] = [{vocab}] (the whole vocabulary), got "
            f"{tuple(class_weight.shape)}"
        )
    return class_weight.to(torch.promote_types(dtype, torch.float32))[targets]


@dataclass(frozen=True)
class _RowLoss:
    """Each kept row's loss from its ``RowStats``: ``-log p_target``, smoothed by
    ``label_smoothing``, plus ``z_loss * lse^2``, times the row's class weight (``row_weight
    [rows]`` or None). The fused pass calls it chunk by chunk (``row_stats(row_loss=)``)."""

    label_smoothing: float
    z_loss: float

    def __call__(self, stats: RowStats, row_weight: Tensor | None) -> Tensor:
        # -log p_target, formed from the centred statistics (``RowStats.logprob``), not as
        # lse - z_target: exact for a confident token, whose loss is far below eps * |lse|.
        row_loss = -stats.logprob
        if self.label_smoothing > 0:
            # lse - (1 - eps) z_t - eps * mean(z) = -(1 - eps) log p_t + eps * (lse - mean(z))
            spread = stats.log_sum - (stats.mean - stats.max)
            row_loss = (1.0 - self.label_smoothing) * row_loss + self.label_smoothing * spread
        if self.z_loss > 0:
            row_loss = row_loss + self.z_loss * stats.lse.square()
        if row_weight is not None:
            row_loss = row_loss * row_weight
        return row_loss


def _with_extra_outputs(
    loss, stats: RowStats, rows: _Labelled, row_weight, reduction, num_items_in_batch, z_loss,
    return_z_loss, return_token_accuracy,
) -> LossOutput:  # fmt: skip
    """``LossOutput``: the loss with the z-loss term and the token accuracy asked for, from the
    same statistics, each reduced as the loss."""
    out = LossOutput(loss, None, None)
    if return_z_loss:
        row_z = z_loss * stats.lse.square()
        if row_weight is not None:
            row_z = row_z * row_weight
        out = out._replace(z_loss=rows.reduce(row_z, reduction, num_items_in_batch, row_weight))
    if return_token_accuracy:
        correct = (stats.top.above_target() == 0).to(stats.lse.dtype)
        out = out._replace(token_accuracy=rows.reduce(correct, reduction))
    return out


def _check_labels(labels, hidden: Tensor, ignore_index, shift: bool) -> Tensor:
    """The labels as int64 (``check_token_tensor``), after checking them and the options."""
    labels = check_token_tensor("labels", labels, hidden.shape[:-1], hidden.device)
    check_ignore_index(ignore_index)
    check_shift("hidden", hidden, shift)
    return labels


def _check_class_weight(class_weight, weight: Tensor, label_smoothing: float) -> None:
    if class_weight is None:
        return
    check_tensor("class_weight", class_weight)
    if class_weight.dim() != 1:
        raise ValueError(f"class_weight: expected shape [V], got {tuple(class_weight.shape)}")
    if not class_weight.dtype.is_floating_point:
        raise TypeError(f"class_weight: expected a floating-point tensor, got {class_weight.dtype}")
    if class_weight.device != weight.device:
        raise ValueError(
            f"class_weight: expected weight's device {weight.device}, got {class_weight.device}"
        )
    if label_smoothing > 0:
        raise ValueError(
            "class_weight: not supported together with label_smoothing > 0 (the smoothing term "
            f"would need the class-weighted mean logit), got label_smoothing={label_smoothing}"
        )


def _grads_needed(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fused_fits(hidden2d: Tensor, weight: Tensor) -> bool:
    """Whether ``grad_in_forward`` needs no memory beyond the block budget and the gradients,
    the PyTorch loop is what would run anyway (no Triton kernels), and its kind of weight is one
    the fused pass serves faster where it is (see ``linear_cross_entropy``): an fp32/fp64
    weight (its fp32 gradient is its own sum), or a frozen one whose GEMMs run in its own
    half precision (no gradient to sum, no converted copy of it) on a CPU without AMX (whose
    half-precision GEMMs are so fast that the passes over the kept blocks decide)."""
    if _blocks._block_functions(hidden2d)[0] is not _blocks._forward_stats:
        return False
    if weight.dtype in (torch.float32, torch.float64):
        return True
    own_dtype = _blocks.block_compute_dtype(weight.dtype, weight.device) == weight.dtype
    amx = weight.device.type == "cpu" and torch.cpu._is_amx_tile_supported()
    return own_dtype and not amx and not _grads_needed(weight)


def _check_num_items(num_items, reduction: str) -> None:
    if reduction != "mean":
        raise ValueError(
            "num_items_in_batch: only meaningful with reduction='mean', "
            f"got reduction={reduction!r}"
        )
    check_num_items(num_items)
