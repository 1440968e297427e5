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

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._checks import check_attention_mask, check_integer_tensor, check_sampling_options
from .distributed import local_head
from .head import ChunkedLMHead
from .integrations.transformers import logit_transform
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
    by ``seed``/``generator``, row and vocabulary index, see ``sampling``). Arguments left to None
    take ``model.generation_config``'s value, then ``generate()``'s default (``top_k=50``,
    ``top_p=1.0``, ``temperature=1.0``, ``repetition_penalty=1.0``, ``min_p`` off,
    ``max_length=20``, ``num_beams=1``, ``length_penalty=1.0``, ``early_stopping=False``).

    Beam search keeps, per beam and step, the ``2 * num_beams`` (more with several eos ids)
    largest log-probs and the row's log-sum-exp, where ``generate()`` builds the
    ``[B * num_beams, V]`` fp32 log-probs; ranks are taken on the logits the model's head returns.
    Of continuations tied in score, the one of lowest (beam, token) index is ranked first, where
    ``generate()`` follows ``torch.topk``'s unspecified order.

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
        return_logprobs: also return the tokens' log-probs (``SampleOutput``); not with beams.
        shards: vocabulary shards per step (None: from the block budget).
        streamer: as in ``generate()`` (e.g. ``TextIteratorStreamer``): receives the prompt,
            each step's tokens as they are drawn, then ``end()``; not with beams.
        stop_strings, tokenizer: as in ``generate()``: stop a row once its text ends with one of
            the strings (the tokenizer is needed to find them).
        generate_kwargs: further ``generate()`` arguments (``max_length``, ``use_cache``,
            ``num_return_sequences``, ``num_beams``, ``length_penalty``, ``early_stopping``,
            ``stopping_criteria``, ...). ``assistant_model=draft`` (a causal LM over the same
            vocabulary) or ``prompt_lookup_num_tokens=n``: assisted decoding of one sequence
            (``chunklogits.assisted``): greedy gives ``generate()``'s tokens; sampling is
            speculative sampling, exact in distribution. Options that would need the full
            logits, another processor or another decoding method (``output_scores``,
            ``no_repeat_ngram_size``, ``assistant_tokenizer``, beam sampling, ...) are refused
            with an error that names them.

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
    check_sampling_options(do_sample=do_sample, **sampling)
    _add_stop_strings(model, stop_strings, tokenizer, generate_kwargs)
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        custom_generate=decode,
        do_sample=do_sample,
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


# ``generate()`` arguments that ``sample`` names, passed on when not None.
_SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_GENERATE_OPTIONS = ("max_new_tokens", *_SAMPLING_OPTIONS, "eos_token_id", "pad_token_id")
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


def _add_stop_strings(model: nn.Module, stop_strings, tokenizer, generate_kwargs: dict) -> None:
    """Turn ``stop_strings`` (given, or from the generation config) into a ``StopStringCriteria``
    among ``generate_kwargs["stopping_criteria"]``, as ``generate()`` does: it would look for the
    tokenizer, which it does not hand to a ``custom_generate`` loop, and fail."""
    config = generate_kwargs.get("generation_config") or model.generation_config
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
# attribute that holds it. Anything else is refused.
_REPRODUCED = {
    "RepetitionPenaltyLogitsProcessor": ("repetition_penalty", "penalty"),
    "TemperatureLogitsWarper": ("temperature", "temperature"),
    "TopKLogitsWarper": ("top_k", "top_k"),
    "TopPLogitsWarper": ("top_p", "top_p"),
    "MinPLogitsWarper": ("min_p", "min_p"),
}
# ``sample_next``'s settings when no processor sets them.
_NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0}
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
    mode = generation_config.get_generation_mode(assistant)
    if getattr(mode, "value", mode) == "assisted_generation":
        from .assisted import assisted_decode

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
        if len(logits_processor):
            names = sorted(type(processor).__name__ for processor in logits_processor)
            raise ValueError(
                "logits_processor: chunklogits.sample's beam search ranks the model's own "
                f"log-probs and applies no processor, got {names} (from generation settings such "
                "as repetition_penalty, or a user processor)"
            )
        return _beam_search(
            model, base, head, input_ids, stopping_criteria, generation_config, model_kwargs
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
    outputs = base(**inputs)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
    return outputs.last_hidden_state[:, -1], model_kwargs


def _beam_search(model, base, head: dict, input_ids, stopping_criteria, config, model_kwargs):
    """``GenerationMixin._beam_search`` (greedy, no processors) on ``beam_candidates``.

    Each step, ``generate()`` ranks all ``num_beams * V`` continuations of a prompt by beam score
    plus log-prob and keeps the best ``keep = max(2, 1 + #eos) * num_beams``; those lie among the
    ``keep`` best tokens of each beam, which is all this loop computes. The bookkeeping after that
    ranking (running and finished beams, length penalty, early stopping) is ``generate()``'s own
    helpers, called on the same small tensors.
    """
    from transformers.generation.utils import ALL_CACHE_NAMES

    beams = config.num_beams
    rows, prompt = input_ids.shape
    batch, device = rows // beams, input_ids.device
    pad, eos = config._pad_token_tensor, config._eos_token_tensor
    keep = max(2, 1 + (0 if eos is None else eos.shape[0])) * beams
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
        logprobs, tokens = beam_candidates(hidden_last, count=keep, **head)
        # The best ``keep`` of all beams' candidates, ties to the lowest (beam, token) index:
        # each beam's candidates in token order, beams in turn, then a stable sort by score.
        tokens, order = tokens.sort(1)
        total = logprobs.gather(1, order).view(batch, beams, keep) + running_scores[:, :, None]
        best, chosen = total.flatten(1).sort(dim=1, descending=True, stable=True)
        best, chosen = best[:, :keep], chosen[:, :keep]
        source = chosen // keep
        token = tokens.view(batch, beams * keep).gather(1, chosen)
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
        if type(processor).__name__ not in _REPRODUCED:
            raise ValueError(
                f"logits_processor: chunklogits.sample reproduces only {sorted(_REPRODUCED)}, "
                f"got {type(processor).__name__} (from generation settings or a user processor)"
            )


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
        option, attribute = _REPRODUCED[name]
        options[option] = getattr(processor, attribute)
    check_sampling_options(**options)
    return options


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
