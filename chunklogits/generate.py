"""``sample(model, input_ids)``: ``generate()`` for transformers causal LMs, with the logits of each
step drawn by ``sampling.sample_next`` instead of ``lm_head`` → ``.float()`` → processors.

The base model runs the prefill and every decode step and returns hidden states; only each row's
last hidden state meets the head, one vocabulary block at a time. Everything else is
``generate()``'s own: ``sample`` calls ``model.generate(..., custom_generate=decode)``, so
argument handling, ``model.generation_config`` defaults, special tokens, attention mask, position
ids, cache, stopping criteria and output shape are those of the installed transformers; ``decode``
replaces only the decoding loop (``GenerationMixin._sample`` and ``_beam_search``) and also
serves directly as ``model.generate(input_ids, custom_generate=chunklogits.generate.decode, ...)``.

``generate()`` hands a callable ``custom_generate`` neither its ``streamer`` nor its ``tokenizer``
(transformers 5.x): ``sample`` therefore drives the streamer itself (``decode(token_streamer=)``)
and builds the stop-string criterion from ``stop_strings`` and ``tokenizer``.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._blocks import _check_count
from ._checks import (
    check_attention_mask,
    check_integer_tensor,
    check_sampling_options,
    check_tensor,
)
from .distributed import local_head
from .head import ChunkedLMHead
from .integrations.transformers import (
    check_head_reproduced,
    forward_transform,
    is_encoder_decoder,
    recorded_forward,
    with_output_bias,
)
from .sampling import beam_candidates, randomness, sample_next


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
    streamer=None,
    stop_strings: str | list[str] | None = None,
    tokenizer=None,
    **generate_kwargs,
) -> Tensor | SampleOutput:
    """Generate continuations of ``input_ids`` as ``model.generate`` does, without full logits.

    Naive equivalent (``reference.sample``)::

        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                       do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer,
                       stop_strings=stop_strings, tokenizer=tokenizer, **generate_kwargs)

    Greedy decoding and beam search (``num_beams > 1, do_sample=False``) give the same tokens;
    sampling the same distribution at every step (not the same random stream: the noise is keyed
    by ``seed``/``generator``, row and vocabulary index, see ``sampling``). Arguments left to None,
    ``do_sample`` included, take ``model.generation_config``'s value, then ``generate()``'s
    default (``do_sample=False``: greedy decoding, or beam search with ``num_beams > 1``;
    ``top_k=50``, ``top_p=1.0``, ``temperature=1.0``, ``repetition_penalty=1.0``, ``min_p`` off,
    ``max_length=20``, ``num_beams=1``, ``length_penalty=1.0``, ``early_stopping=False``): pass
    ``do_sample=True`` to sample from a model whose generation config does not.

    Beam search keeps, per beam and step, the ``2 * num_beams`` (more with several eos ids; the
    whole vocabulary if smaller) largest log-probs and the row's log-sum-exp, where
    ``generate()`` builds the ``[B * num_beams, V]`` fp32 log-probs; ranks are taken on the
    logits the model's head returns. Of continuations tied in score, the one of lowest (beam,
    token) index is ranked first, where ``generate()`` follows ``torch.topk``'s unspecified
    order.

    Args:
        model: a transformers causal LM (``GenerationMixin``) with a base model
            (``model.base_model``, else ``model.model``) whose last hidden state feeds a
            linear ``lm_head``, its logits transformed as ``ChunkedLMHead.wrap`` reads from the
            config; checked once per model with ``wrap``'s probe (a model whose output layer is
            fed something else, such as BERT's prediction head, or whose logits are transformed
            otherwise, is refused by name); possibly wrapped by ``ChunkedLMHead.wrap``, or
            parallelised on the vocabulary dimension
            (``ColwiseParallel``: every rank of its mesh runs ``sample`` with the same inputs and
            gets the same tokens, see ``chunklogits.distributed``). Or an encoder-decoder model
            (T5, BART, Marian, M2M100/NLLB, Whisper, ...): ``generate()`` runs the encoder once,
            the decoder runs each step, and the head is fed what the forward feeds its output
            layer (T5's rescaled decoder output), with ``final_logits_bias`` added; not with
            assisted decoding.
        input_ids: ``[B, L]`` prompts, left-padded when of different lengths; for an
            encoder-decoder model, the encoder's input (``[B, S]`` source tokens, or Whisper's
            ``input_features``), the output then ``generate()``'s decoder sequences.
        attention_mask: ``[B, L]``, 0 at padding; None: derived as ``generate()`` derives it.
        max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
        eos_token_id (one id or several), pad_token_id: as in ``generate()``.
        seed / generator: the randomness (at most one); one key per step is drawn from
            ``torch.Generator().manual_seed(seed)``, from ``generator``, or from torch's default
            generator.
        return_logprobs: also return the tokens' log-probs (``SampleOutput``); not with beams.
        shards: vocabulary shards per step (None: from the block budget).
        streamer: as in ``generate()`` (e.g. ``TextIteratorStreamer``): receives the prompt,
            each step's tokens as they are drawn, then ``end()``; not with beams.
        stop_strings, tokenizer: as in ``generate()``: stop a row once its text ends with one of
            the strings (the tokenizer is needed to find them).
        generate_kwargs: further ``generate()`` arguments (``max_length``, ``use_cache``,
            ``num_return_sequences``, ``num_beams``, ``length_penalty``, ``early_stopping``,
            ``stopping_criteria``, the processors that mask or bias a few tokens:
            ``min_length``, ``min_new_tokens``, ``bad_words_ids``, ``no_repeat_ngram_size``,
            ``suppress_tokens``, ``begin_suppress_tokens``, ``sequence_bias``,
            ``forced_bos_token_id``, ``forced_eos_token_id``, also with beams; the cut-offs
            ``epsilon_cutoff``, ``eta_cutoff``, ...). ``assistant_model=draft`` (a causal LM over
            the same vocabulary) or ``prompt_lookup_num_tokens=n``: assisted decoding of one
            sequence (``chunklogits.assisted``): greedy gives ``generate()``'s tokens; sampling is
            speculative sampling, exact in distribution. Options that would need the full logits,
            another processor or another decoding method (``output_scores``, ``typical_p``,
            ``assistant_tokenizer``, beam sampling, ...) are refused with an error that names them.

    Returns:
        ``[B * num_return_sequences, L + n]`` token ids (prompt, then generated tokens, padding
        after a row's eos as ``generate()`` pads), or ``SampleOutput(sequences, logprobs,
        raw_logprobs)``.
    """
    if not all(hasattr(model, name) for name in ("generate", "prepare_inputs_for_generation")):
        raise TypeError(
            "model: expected a transformers causal LM (a GenerationMixin such as "
            f"LlamaForCausalLM), got {type(model).__name__}"
        )
    encoder_input = is_encoder_decoder(model) and model.main_input_name != "input_ids"
    # A model's own generate() that takes something else first (BLIP's pixel_values) would get
    # the token ids as that; one passing on *args (a PEFT model's) is GenerationMixin's, and an
    # encoder-decoder model's main input (Whisper's input_features) is what it is given.
    first = next(iter(inspect.signature(model.generate).parameters.values()), None)
    positional = (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD) if first else ()
    expected = (*_TOKEN_IDS_NAMES, model.main_input_name) if encoder_input else _TOKEN_IDS_NAMES
    if first is not None and first.kind in positional and first.name not in expected:
        raise ValueError(
            f"model: chunklogits.sample refuses {type(model).__name__}, whose own generate() "
            f"takes {first.name!r} first, not the token ids (GenerationMixin.generate's "
            "decoding loop, which chunklogits replaces, is not the one it runs)"
        )
    if encoder_input:
        # Another encoder input (Whisper's input_features): generate() and the model check it.
        check_tensor("input_ids", input_ids)
    else:
        check_integer_tensor("input_ids", input_ids)
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids: expected a non-empty [B, L] tensor, got shape {tuple(input_ids.shape)}"
            )
        check_attention_mask(attention_mask, input_ids)
    for name, message in _REFUSED_ARGUMENTS.items():
        value = generate_kwargs.get(name)
        if value is not None and value is not False and not (isinstance(value, list) and not value):
            raise ValueError(f"{name}: chunklogits.sample does not support {message}")
    given = generate_options(locals())
    sampling = {name: value for name, value in given.items() if name in _SAMPLING_OPTIONS}
    config = generate_kwargs.get("generation_config") or model.generation_config
    if do_sample is not None and not isinstance(do_sample, bool):
        raise TypeError(f"do_sample: expected a bool or None, got {do_sample!r}")
    # generate()'s decision: do_sample when given, else the generation config's (default False).
    will_sample = bool(config.do_sample) if do_sample is None else do_sample
    check_sampling_options(do_sample=will_sample, **sampling)
    _add_stop_strings(config, stop_strings, tokenizer, generate_kwargs)
    try:
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            custom_generate=decode,
            seed=seed,
            generator=generator,
            return_logprobs=return_logprobs,
            shards=shards,
            token_streamer=streamer,
            # generate() would hand a custom_generate loop no assistant: decode takes it itself.
            assistant=generate_kwargs.pop("assistant_model", None),
            **given,
            **generate_kwargs,
        )
    except ValueError as error:
        # A model's own generate() that keeps its arguments from GenerationMixin.generate
        # (MusicGen-Melody's) refuses the custom_generate loop as an unused model_kwarg.
        if "are not used by the model" not in str(error) or "custom_generate" not in str(error):
            raise
        raise ValueError(
            f"model: chunklogits.sample refuses {type(model).__name__}, whose own generate() "
            "does not hand chunklogits' decoding loop (custom_generate=) to "
            f"GenerationMixin.generate: {error}"
        ) from error


# What ``generate()``'s first parameter is called where it takes the token ids.
_TOKEN_IDS_NAMES = ("inputs", "input_ids")
# ``generate()`` arguments that ``sample`` names, passed on when not None.
_SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_GENERATE_OPTIONS = (
    "max_new_tokens",
    "do_sample",
    *_SAMPLING_OPTIONS,
    "eos_token_id",
    "pad_token_id",
)
# ``generate()`` arguments that it does not pass on to a ``custom_generate`` loop, or that select
# what ``decode`` replaces: refused when given (not None or False).
_REFUSED_ARGUMENTS = {
    "assistant_tokenizer": (
        "an assistant with another tokenizer (universal assisted decoding, "
        "assistant_tokenizer=); use model.generate for it"
    ),
    "synced_gpus": "synced_gpus=True (ZeRO-3 / FSDP lockstep decoding)",
    "logits_processor": (
        "a user logits_processor: its settings would not reach the sharded sampler; "
        "use generate()'s options (temperature=, top_k=, ...) instead"
    ),
    "custom_generate": "custom_generate=: it is chunklogits.generate.decode",
    "token_healing": "token_healing=True (generate() gives its loop no tokenizer to heal with)",
}


def generate_options(arguments: dict) -> dict:
    """The ``generate()`` options among ``sample``'s ``arguments`` that are given (not None)."""
    return {name: arguments[name] for name in _GENERATE_OPTIONS if arguments[name] is not None}


def _add_stop_strings(config, stop_strings, tokenizer, generate_kwargs: dict) -> None:
    """Turn ``stop_strings`` (given, or from the generation ``config``) into a
    ``StopStringCriteria`` among ``generate_kwargs["stopping_criteria"]``, as ``generate()`` does:
    it would look for the tokenizer, which it does not hand to a ``custom_generate`` loop, and
    fail."""
    if stop_strings is None:
        stop_strings = getattr(config, "stop_strings", None)
    if stop_strings is None:
        return
    if tokenizer is None:
        raise ValueError(
            f"tokenizer: stop_strings={stop_strings!r} need the model's tokenizer (tokenizer=), "
            "as in generate(); got None"
        )
    from transformers import StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList(generate_kwargs.get("stopping_criteria") or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    generate_kwargs["stopping_criteria"] = criteria
    generate_kwargs["stop_strings"] = None


# The processors ``decode`` reproduces inside ``sample_next``, in the order ``generate()`` builds
# them and ``sample_next`` applies them: the ``sample_next`` option each sets, and the processor's
# attribute that holds it; None for those that mask or bias a few tokens (``_TokenBias``, through
# ``logit_bias``, which ``sample_next`` adds before the repetition penalty: only sequence_bias's
# finite biases need that place, and the others' -inf masks hold in any). Anything else is refused.
_REPRODUCED = {
    "SequenceBiasLogitsProcessor": None,
    "RepetitionPenaltyLogitsProcessor": ("repetition_penalty", "penalty"),
    "NoRepeatNGramLogitsProcessor": None,
    "EncoderNoRepeatNGramLogitsProcessor": None,
    "NoBadWordsLogitsProcessor": None,
    "MinLengthLogitsProcessor": None,
    "MinNewTokensLengthLogitsProcessor": None,
    "ForcedBOSTokenLogitsProcessor": None,
    "ForcedEOSTokenLogitsProcessor": None,
    "SuppressTokensLogitsProcessor": None,
    "SuppressTokensAtBeginLogitsProcessor": None,
    "TemperatureLogitsWarper": ("temperature", "temperature"),
    "TopKLogitsWarper": ("top_k", "top_k"),
    "TopPLogitsWarper": ("top_p", "top_p"),
    "MinPLogitsWarper": ("min_p", "min_p"),
    "EpsilonLogitsWarper": ("epsilon_cutoff", "epsilon"),
    "EtaLogitsWarper": ("eta_cutoff", "epsilon"),
}
# The ``generate()`` setting from which ``generate()`` builds each processor (transformers 5.x
# ``_get_logits_processor``): a refusal names what the user passed, not the class built from it.
# A class not listed came from a user ``logits_processor``.
_PROCESSOR_SETTINGS = {
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "SequenceBiasLogitsProcessor": "sequence_bias",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
    "MinLengthLogitsProcessor": "min_length",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "TemperatureLogitsWarper": "temperature",
    "TopHLogitsWarper": "top_h",
    "TopKLogitsWarper": "top_k",
    "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
    "LogitNormalization": "renormalize_logits",
}
# ``sample_next``'s settings when no processor sets them.
_NEUTRAL = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "epsilon_cutoff": None,
    "eta_cutoff": None,
}
# The processors ``generate()`` builds from settings whose processing needs each step's whole
# row of logits (typical_p keeps the tokens whose log-prob lies closest to minus the entropy: a
# set that no threshold on the logits cuts out): refused by the setting's name.
_FULL_ROW = frozenset(
    {
        "TypicalLogitsWarper",
        "EncoderRepetitionPenaltyLogitsProcessor",
        "PrefixConstrainedLogitsProcessor",
        "InfNanRemoveLogitsProcessor",
        "ExponentialDecayLengthPenalty",
        "UnbatchedClassifierFreeGuidanceLogitsProcessor",
        "TopHLogitsWarper",
        "LogitNormalization",
        "SynthIDTextWatermarkLogitsProcessor",
        "WatermarkLogitsProcessor",
    }
)
# generation_config settings whose meaning ``decode`` cannot honour.
_REFUSED = {
    "output_scores": bool,
    "output_logits": bool,
    "return_dict_in_generate": bool,
    "output_attentions": bool,
    "output_hidden_states": bool,
    "prefill_chunk_size": lambda v: v is not None,
}
# The decoding methods of ``generate()`` that ``decode`` replaces; the others, by the settings
# that select them (``GenerationConfig.get_generation_mode``).
_DECODED = ("greedy_search", "sample", "beam_search", "assisted_generation")
_MODE_SETTINGS = {
    "beam_sample": ("num_beams, do_sample", "beam sampling (num_beams > 1 with do_sample=True)"),
    "group_beam_search": ("num_beam_groups", "group beam search"),
    "constrained_beam_search": ("constraints, force_words_ids", "constrained beam search"),
    "contrastive_search": ("penalty_alpha", "contrastive search"),
    "dola_generation": ("dola_layers", "DoLa decoding"),
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
    token_streamer=None,
    assistant: nn.Module | None = None,
    **model_kwargs,
) -> Tensor | SampleOutput:
    """``custom_generate`` decoding loop for ``model.generate``: ``GenerationMixin._sample`` with
    ``sample_next`` in place of ``lm_head`` → processors → ``multinomial``/``argmax``, or
    ``GenerationMixin._beam_search`` with ``beam_candidates`` in place of ``lm_head`` →
    ``log_softmax`` → ``topk`` over ``[B, num_beams * V]``.

    Called by ``generate()`` after it has prepared ``input_ids`` ``[B * n, L]`` (``n`` the number
    of beams or of returned sequences), the processors and stopping criteria built from
    ``generation_config``, and ``model_kwargs`` (attention mask, position ids, cache); the
    sampling and beam settings are read from ``generation_config``. ``token_streamer``: a
    ``generate()`` streamer, given the prompt, each step's tokens, then ``end()`` (``generate()``
    keeps its own ``streamer=`` from a ``custom_generate`` loop). ``assistant``: the draft model
    of assisted decoding (``generate()`` keeps its ``assistant_model=`` from the loop too); with
    it or ``prompt_lookup_num_tokens``, ``chunklogits.assisted.assisted_decode`` decodes.
    """
    _refuse_unsupported(generation_config, logits_processor, model_kwargs)
    base = _base_model(model)
    weight, bias, softcap, logit_scale = _head_of(model)
    check_head_reproduced(
        model, base, softcap=softcap, logit_scale=logit_scale, caller="chunklogits.sample"
    )
    vocab = weight.shape[0]  # the whole vocabulary, also of a DTensor sharded on it
    # An lm_head parallelised with ColwiseParallel: this rank's slice, drawn from with the others.
    weight, bias, process_group = local_head(weight, bias)
    head = dict(
        weight=weight,
        bias=bias,
        softcap=softcap,
        logit_scale=logit_scale,
        shards=shards,
        process_group=process_group,
    )
    token_bias = _TokenBias(logits_processor, vocab, input_ids.device)
    mode = generation_config.get_generation_mode(assistant)
    if getattr(mode, "value", mode) == "assisted_generation":
        from .assisted import assisted_decode

        for name, each in (("model", model), ("assistant_model", assistant)):
            if is_encoder_decoder(each):
                raise ValueError(
                    f"{name}: chunklogits.sample's assisted decoding runs causal LMs, got the "
                    f"encoder-decoder {type(each).__name__}; use model.generate for it"
                )
        return assisted_decode(
            model,
            base,
            head,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            model_kwargs,
            assistant=assistant,
            token_bias=token_bias,
            seed=seed,
            generator=generator,
            return_logprobs=return_logprobs,
            shards=shards,
            token_streamer=token_streamer,
        )
    if (generation_config.num_beams or 1) > 1:
        for name, value in (("return_logprobs", return_logprobs), ("streamer", token_streamer)):
            if value:
                raise ValueError(f"{name}: not available with beam search (num_beams > 1)")
        if _sampling_options(logits_processor, False)["repetition_penalty"] != 1.0:
            raise ValueError(
                "repetition_penalty: chunklogits.sample's beam search applies only the processors "
                "that mask or bias a few tokens, got repetition_penalty="
                f"{generation_config.repetition_penalty}"
            )
        return _beam_search(
            model,
            base,
            head,
            vocab,
            token_bias,
            input_ids,
            stopping_criteria,
            generation_config,
            model_kwargs,
        )
    options = _sampling_options(logits_processor, bool(generation_config.do_sample))
    generator = randomness(seed, generator, input_ids.device)

    batch = input_ids.shape[0]
    pad = generation_config._pad_token_tensor  # set by generate() (eos when no pad is given)
    stops_at_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    penalised = (
        _penalised_prompt(input_ids, model_kwargs) if options["repetition_penalty"] != 1.0 else None
    )
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    logprobs, raw_logprobs = [], []
    if token_streamer is not None:
        token_streamer.put(input_ids.cpu())
    first = True
    while True:
        hidden_last, model_kwargs = _next_hidden(model, base, input_ids, model_kwargs, first)
        pick = sample_next(
            hidden_last,
            generator=generator,
            prev_tokens=penalised,
            return_logprobs=return_logprobs,
            **token_bias(input_ids),
            **head,
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
        if token_streamer is not None:
            token_streamer.put(tokens.cpu())
        first = False
        if unfinished.max() == 0:
            break
    if token_streamer is not None:
        token_streamer.end()
    if not return_logprobs:
        return input_ids
    return SampleOutput(input_ids, torch.stack(logprobs, 1), torch.stack(raw_logprobs, 1))


def _next_hidden(model, base, input_ids: Tensor, model_kwargs: dict, first: bool):
    """One forward step of the base model (the prompt when ``first``, then the last token with
    the cache): ``(hidden_last [rows, D], model_kwargs updated as generate() updates them)``."""
    inputs = model.prepare_inputs_for_generation(
        input_ids,
        next_sequence_length=None if first or not model_kwargs.get("use_cache", True) else 1,
        is_first_iteration=first,
        **model_kwargs,
    )
    inputs.pop("logits_to_keep", None)
    if base is None:  # an encoder-decoder model: the decoder output its output layer is fed
        outputs, hidden = recorded_forward(model, inputs)
    else:
        outputs = base(**inputs)
        hidden = outputs.last_hidden_state
    # is_encoder_decoder given as generate() gives it (Mllama's override requires it).
    model_kwargs = model._update_model_kwargs_for_generation(
        outputs, model_kwargs, is_encoder_decoder=base is None
    )
    return hidden[:, -1], model_kwargs


def _beam_search(
    model,
    base,
    head: dict,
    vocab: int,
    token_bias,
    input_ids,
    stopping_criteria,
    config,
    model_kwargs,
):
    """``GenerationMixin._beam_search`` (greedy) on ``beam_candidates``, with the processors that
    mask or bias a few tokens (``token_bias``) applied to each beam's log-probs as there.

    Each step, ``generate()`` ranks all ``num_beams * V`` continuations of a prompt by beam score
    plus log-prob and keeps the best ``keep = max(2, 1 + #eos) * num_beams``; those lie among the
    ``min(keep, V)`` best tokens of each beam, which is all this loop computes. The bookkeeping
    after that ranking (running and finished beams, length penalty, early stopping) is
    ``generate()``'s own helpers, called on the same small tensors.
    """
    from transformers.generation.utils import ALL_CACHE_NAMES

    beams = config.num_beams
    rows, prompt = input_ids.shape
    batch, device = rows // beams, input_ids.device
    pad, eos = config._pad_token_tensor, config._eos_token_tensor
    keep = max(2, 1 + (0 if eos is None else eos.shape[0])) * beams
    # Each beam's candidates: all of a vocabulary smaller than ``keep``.
    per_beam = min(keep, vocab)
    top_beams = torch.arange(keep, device=device) < beams
    # generate()'s filler after a sequence's end: the pad id unless it is None or 0, else eos.
    fill = -1 if eos is None else int(pad) if pad is not None and bool(pad != 0) else int(eos[0])
    running = torch.full((batch, beams, config.max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt] = input_ids.view(batch, beams, prompt)
    sequences = running.clone()
    # Only the first beam of each prompt starts live: the others would repeat its continuations.
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9
    scores = torch.full((batch, beams), -1e9, device=device)
    finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    origins = torch.full(
        (batch, beams, config.max_length - prompt), -1, dtype=torch.int32, device=device
    )
    running_origins = origins.clone()
    offsets = torch.arange(batch, device=device)[:, None] * beams
    length = prompt
    while True:
        flat = running[:, :, :length].reshape(rows, length)
        hidden_last, model_kwargs = _next_hidden(model, base, flat, model_kwargs, length == prompt)
        logprobs, tokens = beam_candidates(hidden_last, count=per_beam, **token_bias(flat), **head)
        # The best ``keep`` of all beams' candidates, ties to the lowest (beam, token) index:
        # each beam's candidates in token order, beams in turn, then a stable sort by score.
        tokens, order = tokens.sort(1)
        total = logprobs.gather(1, order).view(batch, beams, per_beam) + running_scores[:, :, None]
        best, chosen = total.flatten(1).sort(dim=1, descending=True, stable=True)
        best, chosen = best[:, :keep], chosen[:, :keep]
        source = chosen // per_beam
        token = tokens.view(batch, beams * per_beam).gather(1, chosen)
        candidates = model._gather_beams(running, source)
        candidates[:, :, length] = token
        candidate_origins = model._gather_beams(running_origins, source)
        candidate_origins[:, :, length - prompt] = (source + offsets).int()
        hits = stopping_criteria(candidates[:, :, : length + 1].flatten(0, 1), None)
        hits = hits.view(batch, keep)
        running, running_scores, running_origins = model._get_running_beams_for_next_iteration(
            topk_log_probs=best,
            topk_running_sequences=candidates,
            topk_running_beam_indices=candidate_origins,
            next_token_hits_stopping_criteria=hits,
            num_beams=beams,
        )
        sequences, scores, origins, finished = model._update_finished_beams(
            sequences=sequences,
            topk_running_sequences=candidates,
            beam_scores=scores,
            topk_log_probs=best,
            beam_indices=origins,
            topk_running_beam_indices=candidate_origins,
            is_early_stop_heuristic_unsatisfied=improvable,
            is_sent_finished=finished,
            next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=top_beams,
            num_beams=beams,
            cur_len=length,
            decoder_prompt_len=prompt,
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
        )
        cache_name = next((name for name in ALL_CACHE_NAMES if name in model_kwargs), None)
        if cache_name is not None:
            _reorder_cache(model, model_kwargs, cache_name, running_origins[..., length - prompt])
        length += 1
        improvable = model._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=improvable,
            running_beam_scores=running_scores,
            beam_scores=scores,
            is_sent_finished=finished,
            cur_len=length,
            max_length=config.max_length,
            decoder_prompt_len=prompt,
            early_stopping=config.early_stopping,
            length_penalty=config.length_penalty,
        )
        if not model._beam_search_has_unfinished_sequences(
            improvable, finished, hits, config.early_stopping
        ):
            break
    returned = config.num_return_sequences
    sequences = sequences[:, :returned].flatten(0, 1)
    generated = (origins[:, :returned].flatten(0, 1) >= 0).sum(1).max()
    return sequences[:, : prompt + generated]


def _refuse_unsupported(generation_config, logits_processor, model_kwargs: dict) -> None:
    # generate() refuses num_beams=0 but hands it on to a custom_generate loop unchecked.
    _check_count("num_beams", generation_config.num_beams, 1)
    mode = generation_config.get_generation_mode()
    mode = getattr(mode, "value", mode)
    if mode not in _DECODED:
        names, method = _MODE_SETTINGS.get(mode, ("generation_config", mode))
        raise ValueError(
            f"{names}: chunklogits.sample decodes greedily, by sampling or by beam search and "
            f"does not support {method}; use model.generate for it"
        )
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
        name = type(processor).__name__
        if name in _FULL_ROW:
            raise ValueError(
                f"{_setting_of(processor)}: chunklogits.sample does not support it (its processing "
                "needs each step's whole row of logits); use model.generate for it"
            )
        if name not in _REPRODUCED:
            reproduced = ", ".join(_PROCESSOR_SETTINGS[known] for known in _REPRODUCED)
            raise ValueError(
                f"{_setting_of(processor)}: chunklogits.sample reproduces the logits processors "
                f"of {reproduced} only, got {name}; use model.generate for it"
            )


def _setting_of(processor) -> str:
    """The ``generate()`` argument that made ``processor``: the setting ``generate()`` builds
    its class from, else ``logits_processor`` (a user processor)."""
    return _PROCESSOR_SETTINGS.get(type(processor).__name__, "logits_processor")


def _sampling_options(logits_processor, do_sample: bool) -> dict:
    """``sample_next``'s settings from the processors ``generate()`` applies, in its order: those
    it builds from the generation settings and the user's (``logits_processor=``; transformers
    5.x runs them after the repetition penalty and before the warpers it builds, temperature,
    top-k, top-p, min-p). A list ``sample_next`` does not reproduce is refused: one out of
    ``_REPRODUCED``'s order or with a type twice, or a filter with a ``filter_value`` other than
    -inf or ``min_tokens_to_keep`` above 1."""
    options = {"do_sample": do_sample, **_NEUTRAL}
    names = [type(processor).__name__ for processor in logits_processor]
    order = list(_REPRODUCED)
    if names != sorted(set(names), key=order.index):
        raise ValueError(
            f"logits_processor: chunklogits.sample applies {order} in this order, each once, as "
            f"generate() builds them from the generation settings, got {names} (user processors "
            "run where generate() merges them, not where their setting would: pass the setting)"
        )
    for processor, name in zip(logits_processor, names, strict=True):
        kept = getattr(processor, "min_tokens_to_keep", 1)
        filler = getattr(processor, "filter_value", -math.inf)
        if kept != 1 or filler != -math.inf:
            raise ValueError(
                f"logits_processor: chunklogits.sample reproduces {name} with "
                f"min_tokens_to_keep=1 and filter_value=-inf, got {kept} and {filler}"
            )
        if _REPRODUCED[name] is not None:
            option, attribute = _REPRODUCED[name]
            value = getattr(processor, attribute)  # EtaLogitsWarper holds a tensor
            options[option] = float(value) if isinstance(value, Tensor) else value
    check_sampling_options(**options)
    return options


class _TokenBias:
    """``generate()``'s processors that mask or bias a few tokens, as ``sample_next``'s
    ``logit_bias``: called with the sequences so far ``[rows, L]`` (what ``generate()`` hands its
    processors), the keyword arguments ``logit_bias=(tokens, values)`` ``[rows, K]`` and
    ``logit_bias_only`` of this step; none when no processor acts.

    Each processor's ``__call__`` is reproduced on the tokens it lists: sequence_bias and
    bad_words_ids (``SequenceBiasLogitsProcessor``: single tokens always, longer sequences where
    the row ends with their prefix), no_repeat_ngram_size (the last token of every window whose
    other tokens are the row's last n - 1), encoder_no_repeat_ngram_size (the same, over the
    n-grams of the row's encoder input), min_length / min_new_tokens (eos while too short),
    suppress_tokens, begin_suppress_tokens (at its step). forced_bos_token_id (at length 1) and
    forced_eos_token_id (at max_length - 1) replace the row: the processors before them are
    dropped, the forced tokens get 0 and every other token -inf (``logit_bias_only``), and the
    suppressions after them still mask. Biases of one token add up in ``generate()``'s order."""

    def __init__(self, processors, vocab: int, device: torch.device):
        self.processors = [
            (processor, _sequence_biases(processor, vocab, device))
            for processor in processors
            if _REPRODUCED.get(type(processor).__name__, ()) is None
        ]

    def __call__(self, ids: Tensor) -> dict:
        rows, length = ids.shape
        tokens, values, only = [], [], False

        def add(listed: Tensor, value) -> None:
            listed = listed.to(ids.device).long().expand(rows, -1)
            tokens.append(listed)
            values.append(torch.as_tensor(value, dtype=torch.float32, device=ids.device))
            values[-1] = values[-1].expand(listed.shape)

        for processor, sequences in self.processors:
            name = type(processor).__name__
            if sequences is not None:
                for prefixes, last, bias in sequences:
                    if prefixes is None:
                        add(last, bias)
                    elif prefixes.shape[1] <= length:  # the row ends with the prefix
                        match = (ids[:, None, -prefixes.shape[1] :] == prefixes).all(-1)
                        add(last, torch.where(match, bias, 0.0))
            elif name == "NoRepeatNGramLogitsProcessor":
                size = processor.ngram_size
                if length >= size:
                    windows = ids.unfold(1, size, 1)
                    matches = (windows[..., :-1] == ids[:, None, length + 1 - size :]).all(-1)
                    add(windows[..., -1].where(matches, -1), -math.inf)
            elif name == "EncoderNoRepeatNGramLogitsProcessor":
                # The processor's own n-gram tables and lookup; a batch row's beams share its row.
                from transformers.generation.logits_process import _get_generated_ngrams

                beams, tables = rows // processor.batch_size, processor.generated_ngrams
                size = processor.ngram_size
                banned = [
                    _get_generated_ngrams(tables[row // beams], ids[row], size, length)
                    for row in range(rows)
                ]
                width = max(map(len, banned))
                if width:
                    padded = [row + [-1] * (width - len(row)) for row in banned]
                    add(torch.tensor(padded), -math.inf)
            elif name == "MinLengthLogitsProcessor":
                if length < processor.min_length:
                    add(processor.eos_token_id.flatten(), -math.inf)
            elif name == "MinNewTokensLengthLogitsProcessor":
                if length - processor.prompt_length_to_skip < processor.min_new_tokens:
                    add(processor.eos_token_id.flatten(), -math.inf)
            elif name == "ForcedBOSTokenLogitsProcessor":
                if length == 1:
                    tokens, values, only = [], [], True
                    add(torch.tensor([processor.bos_token_id]), 0.0)
            elif name == "ForcedEOSTokenLogitsProcessor":
                if length == processor.max_length - 1:
                    tokens, values, only = [], [], True
                    add(processor.eos_token_id.flatten(), 0.0)
            elif name == "SuppressTokensLogitsProcessor":
                add(processor.suppress_tokens, -math.inf)
            elif length == processor.begin_index:  # SuppressTokensAtBeginLogitsProcessor
                add(processor.begin_suppress_tokens, -math.inf)
        if not tokens:
            return {}
        return {"logit_bias": (torch.cat(tokens, 1), torch.cat(values, 1)), "logit_bias_only": only}


# The processors that bias token sequences, and the generate() setting that builds each.
_SEQUENCE_BIAS = {
    "SequenceBiasLogitsProcessor": "sequence_bias",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
}


def _sequence_biases(processor, vocab: int, device: torch.device) -> list | None:
    """A ``SequenceBiasLogitsProcessor``'s biases as ``(prefixes [G, P], last tokens [G],
    biases [G])`` groups (``prefixes`` None for the single tokens), in the order it adds them
    (``_prepare_bias_variables``); None for other processors. Token ids beyond the vocabulary are
    refused, as the processor refuses them."""
    name = type(processor).__name__
    if name not in _SEQUENCE_BIAS:
        return None
    biases = processor.sequence_bias  # {tuple of tokens: bias} once the processor is built
    outside = sorted({token for sequence in biases for token in sequence if token >= vocab})
    if outside:
        raise ValueError(
            f"{_SEQUENCE_BIAS[name]}: expected token ids below the vocabulary size {vocab}, "
            f"got {outside}"
        )
    groups = {0: []}
    for sequence, bias in biases.items():
        groups.setdefault(len(sequence) - 1, []).append((sequence, bias))
    return [
        (
            torch.tensor([sequence[:-1] for sequence, _ in group], device=device)
            if width
            else None,
            torch.tensor([sequence[-1] for sequence, _ in group], device=device),
            torch.tensor([bias for _, bias in group], dtype=torch.float32, device=device),
        )
        for width, group in groups.items()
        if group
    ]


def _reorder_cache(model, model_kwargs: dict, name: str, origins: Tensor) -> None:
    """Make each row of the cache follow its beam: row ``i`` becomes row ``origins[i]``."""
    rows = origins.flatten()
    if hasattr(model, "_reorder_cache"):
        model_kwargs[name] = model._reorder_cache(model_kwargs[name], rows)
    elif hasattr(model_kwargs[name], "reorder_cache"):
        model_kwargs[name].reorder_cache(rows)
    else:
        raise ValueError(
            f"model: {type(model).__name__}'s cache ({type(model_kwargs[name]).__name__}) cannot "
            "be reordered, which beam search needs"
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


def _base_model(model: nn.Module) -> nn.Module | None:
    """``model.base_model``, else ``model.model`` (where Llama4ForCausalLM and MllamaForCausalLM
    keep their decoder: their ``base_model_prefix`` names no submodule). ``decode`` checks that
    its last hidden state is what the output layer is fed. None for an encoder-decoder model
    (T5 has no base model, and scales the decoder's output in its own forward): ``decode`` runs
    its forward and records what the output layer is fed (``recorded_forward``)."""
    if is_encoder_decoder(model):
        return None
    for base in (getattr(model, "base_model", None), getattr(model, "model", None)):
        if isinstance(base, nn.Module) and base is not model:
            return base
    raise TypeError(
        "model: expected a transformers causal LM with a base model (model.base_model or "
        f"model.model), got {type(model).__name__}"
    )


def _head_of(model: nn.Module) -> tuple[Tensor, Tensor | None, float | None, float | None]:
    """``(weight, bias, softcap, logit_scale)`` of the model's output head: a wrapped model's
    ``ChunkedLMHead``, or a plain ``nn.Linear`` with the transform its forward applies
    (``forward_transform``: the config's); the bias with what the forward adds to the logits
    (BART's ``final_logits_bias``)."""
    head = model.get_output_embeddings()
    if isinstance(head, ChunkedLMHead):
        bias = with_output_bias(model, head.bias, head.weight.dtype)
        return head.weight, bias, head.softcap, head.logit_scale
    if type(head) is not nn.Linear:
        raise TypeError(
            f"model: expected a plain nn.Linear output head, got {type(head).__name__}; "
            "chunklogits.sample does not know what this head computes"
        )
    transform = forward_transform(model, head.weight)
    bias = with_output_bias(model, head.bias, head.weight.dtype)
    return head.weight, bias, transform["softcap"], transform["logit_scale"]
