"""Naive, materialising versions of the public ops, with the same signatures: they state the
semantics and are the test oracle. Each builds the full ``[..., V]`` logits in fp32, exactly what
chunklogits exists to avoid. Arguments that only steer blocking (``shards``, ``chunk_size``) are
accepted and ignored."""

from __future__ import annotations

import math

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
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """``[..., V]`` logits ``softcap(F.linear(hidden, weight, bias).float() * logit_scale) / T``
    (``T``: a float, or one per position, ``hidden.shape[:-1]`` or flattened: ``T[..., None]``).
    The GEMM runs in the inputs' dtype, as a model's ``lm_head`` does; the rest in fp32 (fp64
    for fp64 inputs)."""
    z = F.linear(hidden, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if isinstance(temperature, Tensor):
        temperature = temperature.reshape(z.shape[:-1])[..., None]
    return z / temperature


def model_logits(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> Tensor:
    """``[..., V]`` logits as the model's own head returns them, in the inputs' dtype:
    ``F.linear(hidden, weight, bias)``, then the scale and the softcap applied in that dtype, op
    by op as transformers' forwards do (Cohere ``logits * logit_scale``, Gemma-2/3
    ``tanh(logits / c) * c``). Decisions (greedy argmax, top-k/top-p/min-p membership, ties,
    beam ranks, accuracy) are taken on ``model_logits(...).float()``."""
    z = F.linear(hidden, weight, bias)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


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
):
    """``F.cross_entropy`` on the materialised fp32 logits (``weight=class_weight``), plus
    ``z_loss * logsumexp^2`` per label (times its class weight); ``"mean"`` divides by the
    number of non-ignored labels, their summed class weights, or ``num_items_in_batch``. The
    token accuracy is ``token_accuracy``'s with ``top_k=1``, per label or reduced likewise
    (a fraction for ``"mean"``, a count for ``"sum"``)."""
    from .loss import LossOutput

    z = logits(
        hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale, temperature=temperature
    )
    decision = model_logits(hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale)
    if shift:
        z, decision, labels = z[..., :-1, :], decision[..., :-1, :], labels[..., 1:]
    z, flat_labels = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
    kept = flat_labels != ignore_index
    # Ignored labels' rows are dropped (0), as chunklogits drops them before any logits are
    # computed: F.cross_entropy's backward sends 0 * NaN = NaN to such a row holding a +inf
    # logit (a -inf bias under a negative logit_scale) or a NaN one, where their gradient is 0.
    z = z.masked_fill(~kept[:, None], 0.0)
    # Without smoothing, F.cross_entropy(weight=)'s loss is the unweighted one times the label's
    # class weight; so written, it is differentiable in the class weights too.
    weighted = class_weight is not None and label_smoothing == 0
    per_label = F.cross_entropy(
        z,
        flat_labels,
        weight=None if class_weight is None or weighted else class_weight.to(z.dtype),
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    label_weight = kept.to(z.dtype)
    if class_weight is not None:
        label_weight = label_weight * class_weight.to(z.dtype)[flat_labels.clamp(min=0)]
    if weighted:
        per_label = per_label * label_weight
    z_term = None
    if z_loss or return_z_loss:
        # Filled, not only multiplied, with 0 at ignored labels: "mean" over no counted label
        # is 0 / 0, whose backward would send inf * 0 = NaN to those rows. (A class weight of 0
        # multiplies: its derivative is the z-loss term.)
        z_term = z_loss * z.logsumexp(-1).square().masked_fill(~kept, 0) * label_weight
    if z_loss:
        per_label = per_label + z_term

    def reduce(per: Tensor, denominator: Tensor) -> Tensor:
        if reduction == "none":
            return per.reshape(labels.shape)
        if reduction == "sum":
            return per.sum()
        return per.sum() / (num_items_in_batch if num_items_in_batch is not None else denominator)

    loss = reduce(per_label, label_weight.sum())
    if not (return_z_loss or return_token_accuracy):
        return loss
    out = LossOutput(loss, None, None)
    if return_z_loss:
        out = out._replace(z_loss=reduce(z_term, label_weight.sum()))
    if return_token_accuracy:
        correct = _ranks_above(decision, labels, ignore_index).reshape(-1) == 0
        correct = (correct & kept).to(z.dtype)
        accuracy = correct.sum() / kept.sum() if reduction == "mean" else reduce(correct, None)
        out = out._replace(token_accuracy=accuracy)
    return out


def _ranks_above(decision: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """How many of the model's logits ``decision [..., V]`` are strictly greater than the
    label's own, per position (anything at ignored positions)."""
    decision = decision.to(torch.promote_types(decision.dtype, torch.float32))
    own = decision.gather(-1, labels.clamp(min=0)[..., None])
    return (decision > own).sum(-1)


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
) -> Tensor:
    """The fraction of non-ignored labels with fewer than ``top_k`` of the model's own logits
    (``model_logits``) strictly greater than theirs."""
    decision = model_logits(hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale)
    if shift:
        decision, labels = decision[..., :-1, :], labels[..., 1:]
    kept = labels != ignore_index
    correct = _ranks_above(decision, labels, ignore_index)[kept] < top_k
    return correct.to(torch.promote_types(hidden.dtype, torch.float32)).mean()


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
):
    """The ``k`` largest of the model's own logits (``model_logits``), descending, equal logits
    by the smaller token id (a stable sort), a NaN logit ranked as ``-inf`` (last, where
    ``torch.sort`` puts it first), and the fp32 log-softmax of the tempered logits at them."""
    from .logprobs import TopLogprobs

    decision = model_logits(hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale)
    decision = decision.to(torch.promote_types(decision.dtype, torch.float32))
    decision = decision.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    indices = decision.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    z = logits(
        hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale, temperature=temperature
    )
    return TopLogprobs(z.log_softmax(-1).gather(-1, indices), indices)


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
    temperature: float | Tensor = 1.0,
    shards: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    z = logits(
        hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale, temperature=temperature
    )
    return z.logsumexp(-1)


def next_token_scores(
    raw_scores: Tensor,
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    min_p: float | None = None,
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    repetition_penalty: float = 1.0,
    prev_tokens: Tensor | None = None,
    logit_bias: tuple[Tensor, Tensor] | None = None,
    logit_bias_only: bool = False,
) -> Tensor:
    """HF's own processors, in ``generate()``'s order, on fp32 ``raw_scores`` ``[B, V]``: the
    processed scores (``-inf`` where filtered). ``prev_tokens`` entries outside ``[0, V)`` are
    ignored (HF ignores ids beyond the head's vocabulary). ``logit_bias`` is first made dense
    (``dense_bias``) and added, where ``generate()`` applies ``sequence_bias``."""
    from transformers.generation.logits_process import (
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    vocab = raw_scores.shape[-1]
    if logit_bias is not None:
        dense = dense_bias(logit_bias, vocab, logit_bias_only)
        raw_scores = dense if logit_bias_only else raw_scores + dense
    processors = LogitsProcessorList()
    ids = torch.zeros(raw_scores.shape[0], 0, dtype=torch.long, device=raw_scores.device)
    if repetition_penalty != 1.0:
        ids = prev_tokens.long().where((prev_tokens >= 0) & (prev_tokens < vocab), vocab)
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        if min_p is not None:
            processors.append(MinPLogitsWarper(min_p))
        if epsilon_cutoff is not None:
            processors.append(EpsilonLogitsWarper(epsilon_cutoff))
        if eta_cutoff is not None:
            processors.append(EtaLogitsWarper(eta_cutoff))
    return processors(ids, raw_scores.clone())


def dense_bias(logit_bias: tuple[Tensor, Tensor], vocab: int, only: bool = False) -> Tensor:
    """``sample_next``'s ``logit_bias = (tokens, values)`` ``[B, K]`` as the ``[B, V]`` fp32
    tensor ``generate()``'s processors add: values summed per token, entries outside
    ``[0, V)`` dropped; with ``only``, -inf at the tokens not listed."""
    tokens, values = logit_bias
    inside = (tokens >= 0) & (tokens < vocab)
    column = tokens.long().where(inside, vocab)
    shape = (tokens.shape[0], vocab + 1)
    dense = torch.zeros(shape, device=tokens.device).scatter_add_(1, column, values.float())
    if only:
        listed = torch.zeros(shape, dtype=torch.bool, device=tokens.device)
        dense.masked_fill_(~listed.scatter_(1, column, True), -math.inf)
    return dense[:, :vocab]


def sample_next(
    hidden_last: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    shards: int | None = None,
    chunk_size: int | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    min_p: float | None = None,
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    repetition_penalty: float = 1.0,
    prev_tokens: Tensor | None = None,
    logit_bias: tuple[Tensor, Tensor] | None = None,
    logit_bias_only: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
):
    """``generate()``'s step: the model's logits (``model_logits``) in fp32, HF's processors,
    ``softmax`` + ``multinomial`` (or ``argmax``). Same distribution as
    ``chunklogits.sampling.sample_next``, not the same random stream."""
    from .sampling import NextTokens

    raw = model_logits(hidden_last, weight, bias=bias, softcap=softcap, logit_scale=logit_scale)
    raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
    scores = next_token_scores(
        raw,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        epsilon_cutoff=epsilon_cutoff,
        eta_cutoff=eta_cutoff,
        repetition_penalty=repetition_penalty,
        prev_tokens=prev_tokens,
        logit_bias=logit_bias,
        logit_bias_only=logit_bias_only,
    )
    if not do_sample:
        tokens = scores.argmax(-1)
    else:
        if seed is not None:
            generator = torch.Generator(device=raw.device).manual_seed(seed)
        tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    if not return_logprobs:
        return tokens
    pick = tokens[:, None]
    return NextTokens(
        tokens,
        scores.log_softmax(-1).gather(1, pick).squeeze(1),
        raw.log_softmax(-1).gather(1, pick).squeeze(1),
    )


def sample(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    shards: int | None = None,
    **generate_kwargs,
):
    """``model.generate`` itself (full logits per step, HF's processors, ``multinomial``), with
    the log-probs of ``generate.sample`` computed from its ``scores`` and ``logits``. ``seed``
    seeds torch's default generator, which ``generate()`` draws from; a ``generator`` seeds it
    with a number drawn from it."""
    from .generate import SampleOutput, generate_options

    given = generate_options(locals())
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (), generator=generator))
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        return_dict_in_generate=return_logprobs,
        output_scores=return_logprobs,
        output_logits=return_logprobs,
        **given,
        **generate_kwargs,
    )
    if not return_logprobs:
        return out
    new = out.sequences[:, input_ids.shape[1] :]
    picked = new[..., None]
    logprobs = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, picked).squeeze(-1)
    raw = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, picked).squeeze(-1)
    # Positions after a row's eos hold padding: 0, as generate.sample reports them.
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else eos, device=new.device).reshape(-1)
    ended = torch.isin(new, eos).long().cumsum(1)
    sampled = (ended - torch.isin(new, eos).long()) == 0
    return SampleOutput(out.sequences, logprobs * sampled, raw * sampled)


def sequence_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = False,
    **model_inputs,
) -> Tensor | tuple[Tensor, Tensor]:
    """From the model's full logits (given ``model_inputs`` too, such as ``pixel_values``):
    ``log_softmax(logits[:, :-1].float() / T)`` at the next tokens (and the entropy), 0 where
    ``attention_mask[:, 1:] == 0``; a tensor ``T`` has input_ids' shape ``[B, T]``:
    ``T[:, :-1, None]``."""
    z = model(input_ids=input_ids, attention_mask=attention_mask, **model_inputs).logits[:, :-1]
    if isinstance(temperature, Tensor):
        temperature = temperature.reshape(input_ids.shape)[:, :-1, None]
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    logp = z.log_softmax(-1)
    results = (logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1))
    if attention_mask is not None:
        real = attention_mask[:, 1:].bool()
        results = tuple(torch.where(real, r, torch.zeros_like(r)) for r in results)
    return results if return_entropy else results[0]


def beam_candidates(
    hidden_last: Tensor,
    weight: Tensor,
    count: int,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    shards: int | None = None,
    logit_bias: tuple[Tensor, Tensor] | None = None,
    logit_bias_only: bool = False,
    process_group=None,
) -> tuple[Tensor, Tensor]:
    """The ``count`` largest log-probs per row and their tokens, from the full ``[B, V]``
    log-softmax of the model's logits (``model_logits``) in fp32, as ``generate()``'s beam search
    computes them, plus ``dense_bias(logit_bias)`` (or only it); tokens tied in value in index
    order (a stable sort)."""
    z = model_logits(hidden_last, weight, bias=bias, softcap=softcap, logit_scale=logit_scale)
    z = z.to(torch.promote_types(z.dtype, torch.float32)).log_softmax(-1)
    if logit_bias is not None:
        dense = dense_bias(logit_bias, z.shape[-1], logit_bias_only)
        z = dense if logit_bias_only else z + dense
    values, tokens = z.sort(dim=-1, descending=True, stable=True)
    return values[:, :count], tokens[:, :count]


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` to full precision (``F.softplus`` returns ``x`` itself above 20)."""
    return torch.logaddexp(x, torch.zeros_like(x))


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
) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` on both heads' full fp32 logits, with the mask
    ``labels != ignore_index``; ``reduction="none"``: its elementwise result summed over the
    vocabulary, per position (0 at ignored ones).

    Its terms ``x * log(x / y)`` follow the convention ``0 log 0 = 0`` where a ``-inf`` logit
    makes ``x = 0`` (TRL's ``F.kl_div`` gives NaN there), with finite gradients; and the
    mixture's log-ratios are computed without cancellation for small ``beta`` or ``1 - beta``:
    with ``u = log q - log p + log(beta / (1 - beta))``, ``log(p / m) = -log1p(-beta) -
    softplus(u)`` and ``log(q / m) = -log(beta) - softplus(-u)`` (TRL's ``logsumexp`` of the two
    weighted log-probs, less ``log p``, cancels to an error of ``eps * |log p|`` against a
    divergence of order ``beta``). Elsewhere the same numbers as TRL's formula."""
    s = logits(student_hidden, student_weight, bias=student_bias, temperature=temperature)
    t = logits(teacher_hidden, teacher_weight, bias=teacher_bias, temperature=temperature)
    if shift:
        s, t = s[..., :-1, :], t[..., :-1, :]
        labels = None if labels is None else labels[..., 1:]
    logp, logq = s.log_softmax(-1), t.log_softmax(-1)
    # Masked entries get finite stand-ins, so that the branches torch.where drops stay finite
    # and pass zero gradients.
    zero_p, zero_q = logp == -torch.inf, logq == -torch.inf
    if beta in (0, 1):  # KL(x || y): x the teacher for beta 0, the student for beta 1
        (log_x, zero_x), log_y = ((logq, zero_q), logp) if beta == 0 else ((logp, zero_p), logq)
        log_x, log_y = log_x.masked_fill(zero_x, 0.0), log_y.masked_fill(zero_x, 0.0)
        jsd = torch.where(zero_x, 0.0, log_x.exp() * (log_x - log_y))
    else:
        safe_p, safe_q = logp.masked_fill(zero_p, 0.0), logq.masked_fill(zero_q, 0.0)
        u = safe_q - safe_p + (math.log(beta) - math.log1p(-beta))
        log_p_m = torch.where(zero_q, 0.0, -_softplus(u)) - math.log1p(-beta)
        log_q_m = torch.where(zero_p, 0.0, -_softplus(-u)) - math.log(beta)
        kl_teacher = torch.where(zero_q, 0.0, safe_q.exp() * log_q_m)
        kl_student = torch.where(zero_p, 0.0, safe_p.exp() * log_p_m)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if reduction == "none":
        per_position = jsd.sum(-1)
        return per_position if labels is None else per_position * (labels != ignore_index)
    count = max(jsd.shape[0], 1)
    if labels is not None:
        mask = labels != ignore_index
        jsd, count = jsd[mask], mask.sum().clamp_min(1)
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd.sum() / count
