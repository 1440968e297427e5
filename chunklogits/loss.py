"""Cross-entropy of a linear head without materialising its logits."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from . import _blocks
from ._blocks import RowStats, plan_blocks, row_stats
from ._checks import check_head, check_in_vocab, check_token_tensor, flat_rows, make_transform
from .distributed import checked_on_every_rank

_REDUCTIONS = ("mean", "sum", "none")


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
    shift: bool = False,
    process_group: ProcessGroup | None = None,
    grad_in_forward: bool | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, never holding the logits.

    Naive equivalent (``reference.linear_cross_entropy``)::

        z = F.linear(hidden, weight, bias).float() * logit_scale   # scale, softcap optional
        z = softcap * torch.tanh(z / softcap)
        if shift: z, labels = z[..., :-1, :], labels[..., 1:]
        loss = F.cross_entropy(z.flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
        # + z_loss * logsumexp(z)^2 per label, reduced the same way

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
        shift: predict ``labels[..., t + 1]`` from ``hidden[..., t, :]`` (causal LM training)
            without copying hidden.
        process_group: vocabulary parallelism (``chunklogits.distributed``): ``weight`` and
            ``bias`` are this rank's slice of the head, the slices of the group's ranks following
            one another in rank order; hidden and labels are the same on every rank. Returns the
            whole vocabulary's loss on every rank; ``shards`` counts this rank's slice. Every rank
            must call ``backward``: each gets its slice's weight and bias gradients and the full
            (all-reduced) gradient of hidden.
        grad_in_forward: compute the gradients of hidden, weight and bias during the forward
            pass, so that ``backward`` only scales them (see "Memory and time"). Needs a scalar
            loss (``reduction`` "mean" or "sum"). ``True`` forces it, ``False`` forbids it,
            ``None`` (default) uses it when gradients are needed and it costs no memory beyond
            the block budget: an fp32 or fp64 weight (or one that needs no gradient), on a
            device the Triton kernels do not serve.

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or per label for ``reduction="none"``.
        Differentiable with respect to hidden, weight and bias.

    Memory and time: the logits exist one block (``chunk_size x V / shards``) at a time; the
    forward pass keeps four fp32 numbers per row and saves only the log-sum-exp for backward.
    The backward pass recomputes each block's logits: one more ``2 N V D`` GEMM than the naive
    version (8 instead of 6 ``N V D``).

    With ``grad_in_forward`` the rows are walked in chunks, each through the whole vocabulary,
    and a chunk's fp32 logits (``chunk x V``) are kept from its log-sum-exp to its gradient, so
    each block is computed once (6 ``N V D``, Liger-Kernel's strategy). The gradients then exist
    from the forward pass on: hidden's as an fp32 ``[N, D]`` buffer, weight's as an fp32
    ``[V, D]`` sum over the chunks. For an fp32 weight that sum is the gradient itself and the
    kept logits fit the block budget. For a half-precision weight the sum is memory beyond the
    gradient (4 bytes per weight entry), the kept logits may then be as large (chunks of up to
    ``D`` rows: GEMMs of few rows are slow on CPUs), and where the CPU's GEMMs run in fp32 for
    half-precision inputs (``set_cpu_gemm_dtype``) an fp32 copy of the weight is made once
    (another 4 bytes per entry). The PyTorch block loop serves this path on every device.
    """
    with checked_on_every_rank(process_group) as ranks:
        check_head(hidden, weight, bias)
        labels = check_token_tensor("labels", labels, hidden.shape[:-1], hidden.device)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
        _check_fraction("label_smoothing", label_smoothing, high=1.0)
        _check_fraction("z_loss", z_loss, high=None)
        if num_items_in_batch is not None:
            _check_num_items(num_items_in_batch, reduction)
        if shift and hidden.dim() < 2:
            raise ValueError(
                f"hidden: shift=True needs shape [..., T, D], got {tuple(hidden.shape)}"
            )
        transform = make_transform(softcap, logit_scale)
        if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
            raise TypeError(
                f"grad_in_forward: expected True, False or None, got {grad_in_forward!r}"
            )
        if grad_in_forward and reduction == "none":
            raise ValueError(
                "grad_in_forward: True needs a scalar loss (reduction 'mean' or 'sum'), "
                "got reduction='none'"
            )

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
        plan_args = (targets.numel(), weight.shape[0], hidden.dtype, hidden.device)
        plan_options = {"shards": shards, "chunk_size": chunk_size, "dim": hidden.shape[-1]}
        plan = plan_blocks(*plan_args, **plan_options)
        hidden2d = flat_rows(hidden)
        vocab_slice = ranks.agree(hidden2d, weight, bias, transform, targets, "labels")
    fused = reduction != "none" and targets.numel() > 0 and _grads_needed(hidden, weight, bias)
    if grad_in_forward is None:
        fused = fused and _fused_costs_nothing(hidden2d, weight)
    else:
        fused = fused and grad_in_forward
    if fused:  # chunks sized for the whole vocabulary, the same on every rank
        # Where an fp32 [V, D] sum of the weight gradient is held anyway, a chunk's kept logits
        # may be as large (D rows): CPU GEMMs of a few dozen rows run at a fraction of their speed.
        summed = weight.requires_grad and weight.dtype not in (torch.float32, torch.float64)
        kept_rows = hidden.shape[-1] if summed else 1
        plan = plan_blocks(*plan_args, **plan_options, kept_vocab=ranks.vocab, kept_rows=kept_rows)
    check_in_vocab("labels", targets, ranks.vocab, ignore_index)

    def row_loss_of(stats: RowStats) -> Tensor:
        row_loss = stats.lse - stats.target
        if label_smoothing > 0:
            smoothed = stats.lse - (1.0 - label_smoothing) * stats.target
            row_loss = smoothed - label_smoothing * stats.mean
        if z_loss > 0:
            row_loss = row_loss + z_loss * stats.lse.square()
        return row_loss

    result = row_stats(
        hidden2d,
        weight,
        bias,
        index=index,
        targets=targets,
        transform=transform,
        plan=plan,
        want_mean=label_smoothing > 0,
        vocab_parallel=vocab_slice,
        row_loss=row_loss_of if fused else None,
    )
    if fused:
        _, total = result
    else:
        row_loss = row_loss_of(result)
        total = row_loss.sum()

    if reduction == "none":
        out = row_loss
        if index is not None:
            out = row_loss.new_zeros(flat_targets.shape).index_put((index,), row_loss)
        out = out.reshape(labels.shape)
        return out[..., :-1] if shift else out
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    return total / targets.numel()


def _grads_needed(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fused_costs_nothing(hidden2d: Tensor, weight: Tensor) -> bool:
    """Whether ``grad_in_forward`` needs no memory beyond the block budget and the gradients
    themselves: the weight gradient is its own fp32 sum (an fp32/fp64 weight, or none is
    needed), and the PyTorch loop is what would run anyway (no Triton kernels)."""
    wide = weight.dtype in (torch.float32, torch.float64) or not weight.requires_grad
    return wide and _blocks._block_functions(hidden2d)[0] is _blocks._forward_stats


def _check_fraction(name: str, value, high: float | None) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a float, got {value!r}")
    if not (value >= 0 and (high is None or value <= high)):
        expected = f"in [0, {high}]" if high is not None else ">= 0"
        raise ValueError(f"{name}: expected a float {expected}, got {value!r}")


def _check_num_items(num_items, reduction: str) -> None:
    if reduction != "mean":
        raise ValueError(
            "num_items_in_batch: only meaningful with reduction='mean', "
            f"got reduction={reduction!r}"
        )
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.dtype.is_complex:
            raise ValueError(
                "num_items_in_batch: expected a scalar, "
                f"got a tensor of shape {tuple(num_items.shape)}"
            )
        return
    if not isinstance(num_items, numbers.Real) or isinstance(num_items, bool) or num_items <= 0:
        raise ValueError(
            f"num_items_in_batch: expected a positive number or scalar tensor, got {num_items!r}"
        )
