"""Naive, materialising versions of the public ops, with the same signatures: they state the
semantics and are the test oracle. Each builds the full ``[..., V]`` logits in fp32, exactly what
chunklogits exists to avoid. Arguments that only steer blocking (``shards``, ``chunk_size``) are
accepted and ignored."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def logits(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """``[..., V]`` logits ``softcap(F.linear(hidden, weight, bias).float() * logit_scale) / T``.
    The GEMM runs in the inputs' dtype, as a model's ``lm_head`` does; the rest in fp32 (fp64
    for fp64 inputs)."""
    z = F.linear(hidden, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


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
) -> Tensor:
    z = logits(hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale)
    if shift:
        z, labels = z[..., :-1, :], labels[..., 1:]
    z, flat_labels = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
    per_label = F.cross_entropy(
        z, flat_labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if z_loss:
        per_label = per_label + z_loss * z.logsumexp(-1).square() * (flat_labels != ignore_index)
    if reduction == "none":
        return per_label.reshape(labels.shape)
    if reduction == "sum":
        return per_label.sum()
    count = (
        num_items_in_batch
        if num_items_in_batch is not None
        else (flat_labels != ignore_index).sum()
    )
    return per_label.sum() / count


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    shards: int | None = None,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    z = logits(
        hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale, temperature=temperature
    )
    logp = z.log_softmax(-1)
    picked = logp.gather(-1, tokens[..., None]).squeeze(-1)
    if not return_entropy:
        return picked
    return picked, -(logp.exp() * logp).sum(-1)


def logsumexp(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    temperature: float = 1.0,
    shards: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    z = logits(
        hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale, temperature=temperature
    )
    return z.logsumexp(-1)


def sequence_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """From the model's full logits: ``log_softmax(logits[:, :-1].float() / T)`` at the next
    tokens (and the entropy), 0 where ``attention_mask[:, 1:] == 0``."""
    z = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    logp = z.log_softmax(-1)
    results = (logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1))
    if attention_mask is not None:
        real = attention_mask[:, 1:].bool()
        results = tuple(torch.where(real, r, torch.zeros_like(r)) for r in results)
    return results if return_entropy else results[0]
