"""Per-token log-probabilities, entropy, log-sum-exp and top-k log-probs of a linear head without
its logits."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from . import _library
from ._blocks import _check_count, plan_head, row_stats
from ._checks import check_head, check_in_vocab, check_token_tensor, flat_rows, make_transform
from .distributed import checked_on_every_rank


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = False,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    shards: int | None = None,
    chunk_size: int | None = None,
    process_group: ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log p(tokens)`` under ``softmax(z / temperature)``, and optionally the softmax's entropy.

    Naive equivalent (``reference.token_logprobs``; TRL's ``selective_log_softmax``, verl's
    ``logprobs_from_logits`` and ``entropy_from_logits`` on the same logits)::

        z = softcap(F.linear(hidden, weight, bias).float() * logit_scale) / temperature
        logprobs = z.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)

    Args:
        hidden: ``[..., D]``; weight: ``[V, D]``; bias: ``[V]`` or None (hidden's dtype).
        tokens: ``hidden.shape[:-1]`` integers in ``[0, V)``: the token whose log-prob is wanted
            at each position (for a causal LM, the *next* token: see ``sequence_logprobs``).
        temperature: divides the (softcapped) logits, as RL trainers do before the log-softmax:
            a float, or one per position, a floating tensor of ``hidden.shape[:-1]`` (or
            flattened) on hidden's device, finite and positive, dividing that position's logits
            (``z / temperature[..., None]``); not differentiated (a temperature requiring grad
            is refused). Per-position temperatures take the PyTorch block loop on every device.
        return_entropy: also return the entropy of the tempered softmax at each position.
        softcap, logit_scale, shards, chunk_size, process_group: as in ``linear_cross_entropy``
            (with a process group, ``tokens`` index the whole vocabulary).

    Returns:
        fp32 ``logprobs`` shaped like ``tokens`` (and ``entropy``, same shape). Both are
        differentiable with respect to hidden, weight and bias.
    """
    with checked_on_every_rank(process_group) as ranks:
        check_head(hidden, weight, bias)
        tokens = check_token_tensor("tokens", tokens, hidden.shape[:-1], hidden.device)
        flat_tokens = tokens.reshape(-1)
        # One node of the graph under torch.compile (see chunklogits._library), which checks
        # the values of the tokens and the temperatures.
        custom_op = torch.compiler.is_compiling() and process_group is None
        transform = make_transform(
            softcap, logit_scale, temperature, hidden, read_values=not custom_op
        )
        if custom_op:
            logprobs, entropy = _library.token_logprobs(
                hidden, weight, tokens, bias, *_library.temperature_arguments(temperature),
                return_entropy, transform.softcap, transform.logit_scale, shards, chunk_size,
            )  # fmt: skip
            return (logprobs, entropy) if return_entropy else logprobs
        plan = plan_head(
            flat_tokens.numel(),
            hidden,
            weight,
            shards=shards,
            chunk_size=chunk_size,
        )
        hidden2d = flat_rows(hidden)
        vocab_slice = ranks.agree(hidden2d, weight, bias, transform, flat_tokens, "tokens")
    check_in_vocab("tokens", flat_tokens, ranks.vocab)
    stats = row_stats(
        hidden2d,
        weight,
        bias,
        targets=flat_tokens,
        transform=transform,
        plan=plan,
        want_entropy=return_entropy,
        vocab_parallel=vocab_slice,
    )
    logprobs = stats.logprob.reshape(tokens.shape)
    if not return_entropy:
        return logprobs
    return logprobs, stats.entropy.reshape(tokens.shape)


def logsumexp(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    temperature: float | Tensor = 1.0,
    shards: int | None = None,
    chunk_size: int | None = None,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """``logsumexp`` over the vocabulary of the transformed logits, per position.

    Naive equivalent (``reference.logsumexp``)::

        z = softcap(F.linear(hidden, weight, bias).float() * logit_scale) / temperature
        lse = z.logsumexp(-1)

    hidden ``[..., D]``, weight ``[V, D]``, bias ``[V]`` or None; returns fp32 ``[...]``,
    differentiable with respect to hidden, weight and bias. ``temperature``: a float or one per
    position, as in ``token_logprobs``. Other arguments as in ``linear_cross_entropy``.
    """
    with checked_on_every_rank(process_group) as ranks:
        check_head(hidden, weight, bias)
        transform = make_transform(softcap, logit_scale, temperature, hidden)
        rows = flat_rows(hidden)
        plan = plan_head(
            rows.shape[0],
            hidden,
            weight,
            shards=shards,
            chunk_size=chunk_size,
        )
        vocab_slice = ranks.agree(rows, weight, bias, transform)
    stats = row_stats(
        rows, weight, bias, transform=transform, plan=plan, vocab_parallel=vocab_slice
    )
    return stats.lse.reshape(hidden.shape[:-1])


class TopLogprobs(NamedTuple):
    """``topk_logprobs``' result: ``values`` ``[..., k]`` fp32 log-probs and their vocabulary
    ``indices`` ``[..., k]`` (int64), in descending order of the model's logits."""

    values: Tensor
    indices: Tensor


def topk_logprobs(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    temperature: float | Tensor = 1.0,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    shards: int | None = None,
    chunk_size: int | None = None,
    process_group: ProcessGroup | None = None,
) -> TopLogprobs:
    """The ``k`` most probable tokens of each position and their log-probs (OpenAI's and vLLM's
    ``logprobs=k``, top-k distillation targets), without the logits.

    Naive equivalent (``reference.topk_logprobs``)::

        decision = model_logits(hidden, weight, bias, softcap, logit_scale).float()
        # chosen on the head's own logits, ties broken by the smaller token id
        indices = decision.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        z = softcap(F.linear(hidden, weight, bias).float() * logit_scale) / temperature
        values = z.log_softmax(-1).gather(-1, indices)

    The tokens are chosen on the logits the model's own head returns (the product rounded to
    the model dtype, the transform applied in that dtype, as ``generate()`` sees them), whatever
    dtype the block GEMMs run in and whatever the temperature, in descending order, equal logits
    by the smaller token id (as ``log_softmax(...).topk(k)`` with ties broken by the smaller
    token id). Their log-probs are computed at fp32 accuracy from the same pass.

    Order guarantee: the indices are the ``k`` largest of the logits *as this op's block GEMMs
    compute them*, sorted as above, each token once. A GEMM of one vocabulary block and one of
    the whole matrix can differ in the last bit (a CPU BLAS picks its kernel by the shapes; a
    half-precision product rounds that sum to either neighbour), so against the naive code, or
    between blockings, tokens whose logits lie within that rounding of each other (a few fp32
    ulps, or one unit in the last place of a half-precision model dtype) may be chosen or
    ordered differently. Where the logits lie further apart, the tokens and their order are the
    naive code's. Within one tie group the values need not be descending (they are fp32, the
    order is the model dtype's).

    A NaN logit ranks as ``-inf`` (below every number, among equal ones by the smaller id:
    never before a number, whereas the naive ``sort`` puts NaN first). A row with a NaN logit
    (NaN in hidden, weight or bias) has NaN values at every index, as the naive log-softmax.

    Args:
        hidden: ``[..., D]``; weight: ``[V, D]``; bias: ``[V]`` or None (hidden's dtype).
        k: an int in ``[1, V]``.
        temperature: divides the (softcapped) logits before the log-softmax; it does not change
            which tokens are chosen. A float or one per position, as in ``token_logprobs``.
        softcap, logit_scale, shards, chunk_size, process_group: as in ``linear_cross_entropy``
            (with a process group the indices are the whole vocabulary's, the same on every
            rank).

    Returns:
        ``TopLogprobs(values, indices)``, both ``[..., k]``. Not differentiable (the log-probs
        of given tokens, with gradients, are ``token_logprobs``').
    """
    with checked_on_every_rank(process_group) as ranks:
        check_head(hidden, weight, bias)
        _check_count("k", k, 1, optional=False)
        transform = make_transform(softcap, logit_scale, temperature, hidden)
        rows = flat_rows(hidden)
        plan = plan_head(
            rows.shape[0],
            hidden,
            weight,
            shards=shards,
            chunk_size=chunk_size,
        )
        vocab_slice = ranks.agree(rows.detach(), weight, bias, transform, top_k=("k", k))
    with torch.no_grad():
        stats = row_stats(
            rows, weight, bias, transform=transform, plan=plan, vocab_parallel=vocab_slice, top_k=k
        )
    shape = (*hidden.shape[:-1], k)
    values = stats.log_softmax_at(stats.top.value)
    return TopLogprobs(values.reshape(shape), stats.top.index.reshape(shape))
