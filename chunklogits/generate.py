"""``sample(model, input_ids)``: ``generate()`` for transformers causal LMs, with the logits of each
step drawn by ``sampling.sample_next`` instead of ``lm_head`` → ``.float()`` → processors.

The base model runs the prefill and every decode step and returns hidden states; only each row's
last hidden state meets the head, one vocabulary block at a time. Everything else is
``generate()``'s own: ``sample`` calls ``model.generate(..., custom_generate=decode)``, so
argument handling, ``model.generation_config`` defaults, special tokens, attention mask, position
ids, cache, stopping criteria and output shape are those of the installed transformers; ``decode``
replaces only the decoding loop (``GenerationMixin._sample``) and also serves directly as
``model.generate(input_ids, custom_generate=chunklogits.generate.decode, ...)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._checks import check_attention_mask, check_integer_tensor, check_sampling_options
from .distributed import local_head
from .head import ChunkedLMHead
from .integrations.transformers import logit_transform
from .sampling import randomness, sample_next


class SampleOutput(NamedTuple):
    """``sample(..., return_logprobs=True)``: ``sequences`` ``[B, L + n]`` as ``generate()``
    returns them, and per generated position ``[B, n]`` the token's log-prob under the processed
    distribution it was drawn from and under the model's raw distribution (see
    ``sampling.NextTokens``); 0 at positions after a row finished (padding)."""

    sequences: Tensor
    logprobs: Tensor
    raw_logprobs: Tensor


def sample(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    do_sample: bool = True,
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
) -> Tensor | SampleOutput:
    """Generate continuations of ``input_ids`` as ``model.generate`` does, without full logits.

    Naive equivalent (``reference.sample``)::

        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                       do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    Greedy decoding gives the same tokens; sampling the same distribution at every step (not
    the same random stream: the noise is keyed by ``seed``/``generator``, row and vocabulary
    index, see ``sampling``). Arguments left to None take ``model.generation_config``'s value,
    then ``generate()``'s default (``top_k=50``, ``top_p=1.0``, ``temperature=1.0``,
    ``repetition_penalty=1.0``, ``min_p`` off, ``max_length=20``).

    Args:
        model: a transformers causal LM (``GenerationMixin``) with a base model
            (``model.base_model``) whose last hidden state feeds a linear ``lm_head``; possibly
            wrapped by ``ChunkedLMHead.wrap``, or parallelised on the vocabulary dimension
            (``ColwiseParallel``: every rank of its mesh runs ``sample`` with the same inputs and
            gets the same tokens, see ``chunklogits.distributed``).
        input_ids: ``[B, L]`` prompts, left-padded when of different lengths.
        attention_mask: ``[B, L]``, 0 at padding; None: derived as ``generate()`` derives it.
        max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
        eos_token_id (one id or several), pad_token_id: as in ``generate()``.
        seed / generator: the randomness (at most one); one key per step is drawn from
            ``torch.Generator().manual_seed(seed)``, from ``generator``, or from torch's default
            generator.
        return_logprobs: also return the tokens' log-probs (``SampleOutput``).
        shards: vocabulary shards per step (None: from the block budget).
        generate_kwargs: further ``generate()`` arguments (``max_length``, ``use_cache``,
            ``num_return_sequences``, ...). Options that would need the full logits or another
            processor (``output_scores``, ``no_repeat_ngram_size``, ``num_beams > 1``, ...) are
            refused with an error that names them.

    Returns:
        ``[B, L + n]`` token ids (prompt, then generated tokens, ``pad_token_id`` after a row's
        eos), or ``SampleOutput(sequences, logprobs, raw_logprobs)``.
    """
    check_integer_tensor("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids: expected a non-empty [B, L] tensor, got shape {tuple(input_ids.shape)}"
        )
    check_attention_mask(attention_mask, input_ids)
    given = generate_options(locals())
    sampling = {name: value for name, value in given.items() if name in _SAMPLING_OPTIONS}
    check_sampling_options(do_sample=do_sample, **sampling)
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        custom_generate=decode,
        do_sample=do_sample,
        seed=seed,
        generator=generator,
        return_logprobs=return_logprobs,
        shards=shards,
        **given,
        **generate_kwargs,
    )


# ``generate()`` arguments that ``sample`` names, passed on when not None.
_SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_GENERATE_OPTIONS = ("max_new_tokens", *_SAMPLING_OPTIONS, "eos_token_id", "pad_token_id")


def generate_options(arguments: dict) -> dict:
    """The ``generate()`` options among ``sample``'s ``arguments`` that are given (not None)."""
    return {name: arguments[name] for name in _GENERATE_OPTIONS if arguments[name] is not None}


# The processors ``decode`` reproduces inside ``sample_next``; anything else is refused.
_REPRODUCED = {
    "RepetitionPenaltyLogitsProcessor",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinPLogitsWarper",
}
# The sampling settings ``decode`` reads from generation_config, and their value when unset.
_NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0}
# generation_config settings whose meaning ``decode`` cannot honour.
_REFUSED = {
    "num_beams": lambda v: v is not None and v > 1,
    "output_scores": bool,
    "output_logits": bool,
    "return_dict_in_generate": bool,
    "output_attentions": bool,
    "output_hidden_states": bool,
}


def decode(
    model: nn.Module,
    input_ids: Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    shards: int | None = None,
    **model_kwargs,
) -> Tensor | SampleOutput:
    """``custom_generate`` decoding loop for ``model.generate``: ``GenerationMixin._sample`` with
    ``sample_next`` in place of ``lm_head`` → processors → ``multinomial``/``argmax``.

    Called by ``generate()`` after it has prepared ``input_ids`` ``[B, L]``, the processors and
    stopping criteria built from ``generation_config``, and ``model_kwargs`` (attention mask,
    position ids, cache); the sampling settings are read from ``generation_config``.
    """
    _refuse_unsupported(generation_config, logits_processor, model_kwargs)
    options = {"do_sample": bool(generation_config.do_sample)}
    for name, off in _NEUTRAL.items():
        value = getattr(generation_config, name, None)
        options[name] = off if value is None else value
    check_sampling_options(**options)
    generator = randomness(seed, generator, input_ids.device)
    base = _base_model(model)
    weight, bias, softcap, logit_scale = _head_of(model)
    # An lm_head parallelised with ColwiseParallel: this rank's slice, drawn from with the others.
    weight, bias, process_group = local_head(weight, bias)

    batch = input_ids.shape[0]
    pad = generation_config._pad_token_tensor  # set by generate() (eos when no pad is given)
    stops_at_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    penalised = (
        _penalised_prompt(input_ids, model_kwargs) if options["repetition_penalty"] != 1.0 else None
    )
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    logprobs, raw_logprobs = [], []
    first = True
    while True:
        inputs = model.prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=None if first or not model_kwargs.get("use_cache", True) else 1,
            is_first_iteration=first,
            **model_kwargs,
        )
        inputs.pop("logits_to_keep", None)
        outputs = base(**inputs)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        hidden_last = outputs.last_hidden_state[:, -1]
        del outputs
        pick = sample_next(
            hidden_last,
            weight,
            bias=bias,
            softcap=softcap,
            logit_scale=logit_scale,
            shards=shards,
            prev_tokens=penalised,
            generator=generator,
            return_logprobs=return_logprobs,
            process_group=process_group,
            **options,
        )
        tokens = pick.tokens if return_logprobs else pick
        if return_logprobs:
            logprobs.append(pick.logprobs * unfinished)
            raw_logprobs.append(pick.raw_logprobs * unfinished)
        if stops_at_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        if penalised is not None:
            penalised = torch.cat([penalised, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        first = False
        if unfinished.max() == 0:
            break
    if not return_logprobs:
        return input_ids
    return SampleOutput(input_ids, torch.stack(logprobs, 1), torch.stack(raw_logprobs, 1))


def _refuse_unsupported(generation_config, logits_processor, model_kwargs: dict) -> None:
    for name, refused in _REFUSED.items():
        value = getattr(generation_config, name, None)
        if refused(value):
            raise ValueError(
                f"{name}: chunklogits.sample never materialises full logits or per-step model "
                f"outputs and does not support {name}={value!r}; use model.generate for it"
            )
    cache = model_kwargs.get("cache")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            "cache: chunklogits.sample starts from an empty cache, got one holding "
            f"{cache.get_seq_length()} positions; pass the whole sequence instead"
        )
    for processor in logits_processor:
        if type(processor).__name__ not in _REPRODUCED:
            raise ValueError(
                f"logits_processor: chunklogits.sample reproduces only {sorted(_REPRODUCED)}, "
                f"got {type(processor).__name__} (from generation settings or a user processor)"
            )


def _penalised_prompt(input_ids: Tensor, model_kwargs: dict) -> Tensor:
    """The prompt tokens the repetition penalty sees: all but the left padding, -1 there, as
    ``generate()`` sets up ``RepetitionPenaltyLogitsProcessor(prompt_ignore_length=...)``."""
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        return input_ids
    padding = (mask != 0).int().argmax(dim=1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return input_ids.masked_fill(positions[None, :] < padding[:, None], -1)


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise TypeError(
            f"model: expected a transformers causal LM with a base model (model.base_model), "
            f"got {type(model).__name__}"
        )
    return base


def _head_of(model: nn.Module) -> tuple[Tensor, Tensor | None, float | None, float | None]:
    """``(weight, bias, softcap, logit_scale)`` of the model's output head: a wrapped model's
    ``ChunkedLMHead``, or a plain ``nn.Linear`` with the transform read from the config."""
    head = model.get_output_embeddings()
    if isinstance(head, ChunkedLMHead):
        return head.weight, head.bias, head.softcap, head.logit_scale
    if type(head) is not nn.Linear:
        raise TypeError(
            f"model: expected a plain nn.Linear output head, got {type(head).__name__}; "
            "chunklogits.sample does not know what this head computes"
        )
    transform = logit_transform(model.config)
    return head.weight, head.bias, transform["softcap"], transform["logit_scale"]
