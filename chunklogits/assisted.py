"""Assisted decoding without the logits: ``generate(assistant_model=draft)`` (a smaller model with
the same vocabulary drafts tokens) and ``generate(prompt_lookup_num_tokens=n)`` (drafts copied
from the sequence itself), run by ``chunklogits.sample`` as ``GenerationMixin._assisted_decoding``
runs them: one sequence, drafts of up to ``g`` tokens per round, one forward of the target over
them, the target's KV cache cropped back to the tokens kept.

The target's head meets the ``g + 1`` new hidden states one vocabulary block at a time:

* greedy decoding, and sampling with prompt lookup: ``sample_next`` picks the target's token at
  every position (given the drafts before it); the drafts are kept up to the first one that
  differs from it, then the target's token there (``generate()``'s rule);
* speculative sampling (``do_sample=True`` with an assistant; Leviathan et al. 2023, algorithm
  1): draft ``i`` is kept with probability ``min(1, p_i / q_i)``, ``p`` and ``q`` the target's and
  the assistant's processed distributions (the token masks and biases, repetition penalty,
  temperature, top-k, top-p, min-p and the epsilon/eta cut-offs, as ``generate()`` applies its
  processors to both, each row given the tokens before it), up to the first rejection; there
  the token is drawn from ``max(0, p - q)``, or from ``p`` at the next position when every draft
  was kept. ``p_i`` is a token log-prob from passes over the target's head (each row's kept set
  found as ``sample_next`` finds it, then the log-sum-exp over it); ``q_i`` is the assistant's
  draw's own log-prob. The draw from the residual is a Gumbel race ``argmax_v log(p_v - q_v) +
  g_v`` over the vocabulary blocks of both heads side by side, the noise a hash of (key,
  vocabulary index) as in ``sampling``, so the token does not depend on the shards. The tokens
  follow the target's processed distribution exactly, whatever the drafts.

No ``[g, V]`` logits of either model exist, only ``[rows, V / shards]`` blocks; prompt lookup's
candidate check is ``generate()``'s own (its processors on a ``[1, V]`` tensor of ones).

A target head parallelised with ``ColwiseParallel`` (``distributed.local_head``): the checks run
``sample_next`` over the process group; speculative sampling's passes run over this rank's slice
and merge their per-row results over the ranks (``sampling._merge_ranks``: log-sums, the token's
log-prob from its rank, the race's largest key and its token). A replicated draft head races
over its rows of the rank's slice (its ``q`` from the whole head, as its draws); a parallelised
one must hold the target's slice.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._blocks import plan_blocks
from ._checks import make_transform
from .distributed import VocabSlice, local_head
from .generate import (
    _base_model,
    _head_of,
    _penalised_prompt,
    _sampling_options,
    _setting_of,
)
from .sampling import (
    _BYTES_PER_ELEMENT,
    _blocks,
    _check_rows,
    _fold_log_sum,
    _gumbel,
    _log_sum_state,
    _log_sum_stats,
    _merge_ranks,
    _noise_key,
    _Problem,
    _Scan,
    _thresholds,
    _token_bias,
    randomness,
    sample_next,
)

# num_assistant_tokens_schedule values generate() knows; "heuristic" keeps the adapted count on
# the assistant's generation_config after the call, "heuristic_transient" does not.
_SCHEDULES = ("constant", "heuristic", "heuristic_transient")
# generation_config settings that select another candidate generator than an assistant's or
# prompt lookup's, or change the verification rule.
_REFUSED_SETTINGS = {
    "assistant_early_exit": "self-speculative decoding from an early layer",
    "use_mtp": "multi-token-prediction drafts",
    "speculation_type": "DFlash drafts",
    "assistant_ensemble_weight": "ensemble verification (DIVERSE), which relaxes the target's "
    "distribution",
}


# The processors that replace a whole row at one step (the forced token 0, every other -inf):
# a round's rows, one per position, would mix replaced rows with biased ones, which one
# ``logit_bias_only`` flag per call cannot express, so they are refused with a draft. The other
# processors cl.sample reproduces (token masks and biases, penalty, warpers, cut-offs) apply to
# every row of a round, each given the tokens before it, as generate() applies them.
_ROW_REPLACING = ("ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor")


def assisted_decode(
    model: nn.Module,
    base: nn.Module,
    head: dict,
    input_ids: Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    model_kwargs: dict,
    *,
    assistant: nn.Module | None,
    token_bias,
    seed: int | None,
    generator: torch.Generator | None,
    return_logprobs: bool,
    shards: int | None,
    token_streamer,
) -> Tensor:
    """``GenerationMixin._assisted_decoding`` for ``generate.decode``: ``[1, L + n]`` tokens.

    Naive equivalent::

        model.generate(input_ids, assistant_model=assistant, ...)   # or prompt_lookup_num_tokens=

    ``head``: the target's ``sample_next`` head arguments (``decode``'s); ``assistant``: the draft
    model (ignored with ``prompt_lookup_num_tokens``, as ``generate()`` ignores it);
    ``token_bias``: ``decode``'s ``_TokenBias`` of ``logits_processor``; the other arguments as
    ``decode`` receives them.
    """
    _refuse_unsupported(input_ids, logits_processor, generation_config, model_kwargs)
    if return_logprobs:
        raise ValueError(
            "return_logprobs: not available with assisted decoding (assistant_model= or "
            "prompt_lookup_num_tokens=)"
        )
    options = _sampling_options(logits_processor, bool(generation_config.do_sample))
    generator = randomness(seed, generator, input_ids.device)
    group = head["process_group"]
    vocab_slice = None if group is None else VocabSlice.of(group, head["weight"].shape[0])
    vocab = head["weight"].shape[0] if vocab_slice is None else vocab_slice.vocab
    if generation_config.prompt_lookup_num_tokens is not None:
        drafter = _PromptLookupDrafts(generation_config, logits_processor, model)
    elif assistant is not None:
        drafter = _AssistantDrafts(assistant, generation_config, model_kwargs, vocab, vocab_slice)
    else:
        raise ValueError(
            "assistant_model: generate() hands no assistant to a custom_generate loop; call "
            "chunklogits.sample(model, input_ids, assistant_model=draft), or pass it to "
            "decode as assistant=draft"
        )
    speculative = options["do_sample"] and isinstance(drafter, _AssistantDrafts)
    if speculative:
        # The residual draw walks both heads' blocks side by side: the same vocabulary shards.
        shards = shards or max(_default_shards(head["weight"]), _default_shards(drafter.weight))
        if vocab_slice is not None and seed is None:
            # Every rank must draw the same drafts, acceptances and races: a seed from rank 0's
            # generator (the key sample_next would broadcast) seeds one generator on each.
            key = vocab_slice.broadcast_first_(_noise_key(generator, input_ids.device))
            generator = randomness(int(key[0]) * 2**32 + int(key[1]), None, input_ids.device)
    head = dict(head, shards=shards)
    context = _Context(
        input_ids,
        model_kwargs,
        options,
        generator,
        generation_config,
        head,
        vocab_slice,
        token_bias,
    )
    cache = model_kwargs.get("cache")
    cache.activate_past_recording(recurrent_states_to_keep=drafter.count)
    if token_streamer is not None:
        token_streamer.put(input_ids.cpu())
    first = True
    while True:
        length = input_ids.shape[1]
        drafts = drafter.propose(input_ids, context)
        count = drafts.tokens.shape[0]
        ids = torch.cat([input_ids, drafts.tokens[None]], 1)
        hidden = _forward_new(model, base, ids, model_kwargs, first)[-count - 1 :]
        if first and not model_kwargs["cache"].is_croppable:
            raise ValueError(
                "cache: assisted decoding needs a cache that can be cropped back after the "
                f"drafts are checked, got {type(model_kwargs['cache']).__name__}"
            )
        prev, bias = context.prefixes(ids, length), context.row_biases(ids, length)
        if speculative:
            tokens = _speculative_tokens(hidden, prev, bias, drafts, drafter, context)
        else:
            picked = sample_next(
                hidden, prev_tokens=prev, generator=generator, **bias, **head, **options
            )
            matches = int((drafts.tokens == picked[:count]).cumprod(0).sum())
            tokens = picked[: matches + 1]
        tokens = context.cut(tokens, length)
        kept = tokens.shape[0] - 1
        input_ids = torch.cat([input_ids, tokens[None]], 1)
        if token_streamer is not None:
            token_streamer.put(tokens[None].cpu())
        model_kwargs["cache"].crop(kept - count)
        drafter.update(kept, count)
        first = False
        if bool(stopping_criteria(input_ids, None).all()):
            break
    drafter.finish()
    if token_streamer is not None:
        token_streamer.end()
    return input_ids


def _refuse_unsupported(input_ids, logits_processor, generation_config, model_kwargs):
    if generation_config.num_return_sequences > 1:
        raise ValueError(
            "num_return_sequences: assisted decoding returns one sequence, as generate() does; "
            f"got {generation_config.num_return_sequences}"
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            "input_ids: assisted decoding (assistant_model= or prompt_lookup_num_tokens=) "
            "decodes one sequence at a time, as generate() does; expected batch size 1, got "
            f"{input_ids.shape[0]}"
        )
    for name, method in _REFUSED_SETTINGS.items():
        value = getattr(generation_config, name, None)
        if value is not None and value is not False:
            raise ValueError(
                f"{name}: chunklogits.sample's assisted decoding does not support {method} "
                f"({name}={value!r}); use model.generate for it"
            )
    for processor in logits_processor:
        if type(processor).__name__ in _ROW_REPLACING:
            raise ValueError(
                f"{_setting_of(processor)}: chunklogits.sample's assisted decoding does not "
                "support a processor that replaces a whole row of logits at one step "
                f"({type(processor).__name__}); use model.generate for it, or decode without "
                "an assistant"
            )
    if model_kwargs.get("cache") is None or not model_kwargs.get("use_cache", True):
        raise ValueError(
            "use_cache: assisted decoding needs the model's KV cache (use_cache=True and a "
            "model whose generate() builds a Cache), got none"
        )


class _Drafts(NamedTuple):
    """One round's draft tokens ``[g]`` (int64); for an assistant's, each token's log-prob under
    the distribution it was drawn from ``[g]`` and the assistant's hidden state it was drawn
    from ``[g, D]`` (None for prompt lookup)."""

    tokens: Tensor
    logprobs: Tensor | None
    hidden: Tensor | None


class _Context:
    """What every round reads: the sampling options, the randomness, the stop rules, the tokens
    the repetition penalty sees (the prompt but its left padding, then all tokens), the
    processors that mask or bias a few tokens (``token_bias``, ``generate._TokenBias``), and the
    target's head: ``sample_next``'s arguments and, over a process group, this rank's slice."""

    def __init__(
        self,
        input_ids,
        model_kwargs,
        options,
        generator,
        generation_config,
        head,
        vocab_slice,
        token_bias,
    ):
        self.options, self.generator, self.head = options, generator, head
        self.vocab_slice = vocab_slice
        self.token_bias = token_bias
        self.max_length = generation_config.max_length
        self.eos = generation_config._eos_token_tensor  # set by generate(), None without eos
        self.prompt = None
        if options["repetition_penalty"] != 1.0:
            self.prompt = _penalised_prompt(input_ids, model_kwargs)

    def penalised(self, ids: Tensor) -> Tensor | None:
        """``[1, L]``: ``ids`` as the repetition penalty sees them, or None when it is off."""
        if self.prompt is None:
            return None
        return torch.cat([self.prompt, ids[:, self.prompt.shape[1] :]], 1)

    def prefixes(self, ids: Tensor, length: int) -> Tensor | None:
        """``[g + 1, L + g]``: row ``i`` is what the penalty sees at the ``i``-th new position
        of ``ids`` (``L = length`` tokens then ``g`` drafts): the tokens before it, -1 after."""
        seen = self.penalised(ids)
        if seen is None:
            return None
        rows = ids.shape[1] - length + 1
        after = torch.arange(ids.shape[1], device=ids.device)[None, :] >= (
            length + torch.arange(rows, device=ids.device)[:, None]
        )
        return seen.expand(rows, -1).masked_fill(after, -1)

    def row_biases(self, ids: Tensor, length: int) -> dict:
        """``sample_next``'s ``logit_bias`` for the ``g + 1`` new positions of ``ids`` (``L =
        length`` tokens then ``g`` drafts): row ``i`` the masks and biases of the tokens before
        position ``L + i``, as ``generate()`` processes that position; rows padded with token -1
        (no bias). Empty when no processor acts."""
        rows = [self.token_bias(ids[:, : length + i]) for i in range(ids.shape[1] - length + 1)]
        if not any(rows):
            return {}
        width = max(row["logit_bias"][0].shape[1] for row in rows if row)
        tokens = ids.new_full((len(rows), width), -1)
        values = torch.zeros(len(rows), width, device=ids.device)
        for i, row in enumerate(rows):
            if row:
                listed, value = row["logit_bias"]
                tokens[i, : listed.shape[1]], values[i, : listed.shape[1]] = listed[0], value[0]
        return {"logit_bias": (tokens, values)}

    def is_eos(self, token: Tensor) -> bool:
        return self.eos is not None and bool(torch.isin(token, self.eos).any())

    def cut(self, tokens: Tensor, length: int) -> Tensor:
        """``tokens`` ``[k]`` kept this round, cut to the length budget and after the first
        eos, as ``generate()`` cuts them."""
        tokens = tokens[: self.max_length - length]
        if self.eos is not None:
            ends = torch.isin(tokens, self.eos).nonzero()
            if ends.numel():
                tokens = tokens[: int(ends[0]) + 1]
        return tokens


def _forward_new(model, base, ids: Tensor, model_kwargs: dict, first: bool) -> Tensor:
    """Run ``model``'s base on the tokens of ``ids`` ``[1, L]`` that its cache does not hold,
    ``model_kwargs`` (mask, positions, cache) brought to ``ids``' length in place as
    ``generate()``'s assisted loop brings them: the new tokens' hidden states ``[n, D]``."""
    from transformers.generation.candidate_generator import (
        _prepare_attention_mask,
        _prepare_position_ids,
        _prepare_token_type_ids,
    )

    length = ids.shape[1]
    _prepare_attention_mask(model_kwargs, length, model.config.is_encoder_decoder)
    _prepare_position_ids(model_kwargs, length, model.config.is_encoder_decoder)
    _prepare_token_type_ids(model_kwargs, length)
    inputs = model.prepare_inputs_for_generation(
        ids,
        next_sequence_length=length - model_kwargs["cache"].get_seq_length(),
        is_first_iteration=first,
        **model_kwargs,
    )
    inputs.pop("logits_to_keep", None)
    outputs = base(**inputs)
    model_kwargs["cache"] = outputs.cache
    return outputs.last_hidden_state[0]


class _AssistantDrafts:
    """``AssistedCandidateGenerator``: the assistant decodes up to ``num_assistant_tokens``
    tokens with the target's processors (greedily or by sampling, as the target), stopping at an
    eos or, with ``assistant_confidence_threshold``, after a token it gave a probability below
    the threshold; ``num_assistant_tokens_schedule`` adapts the count after each round."""

    def __init__(
        self,
        assistant: nn.Module,
        generation_config,
        model_kwargs: dict,
        vocab: int,
        target_slice: VocabSlice | None,
    ):
        from transformers import DynamicCache
        from transformers.generation.candidate_generator import is_sklearn_available

        if not hasattr(assistant, "prepare_inputs_for_generation"):
            raise TypeError(
                "assistant_model: expected a transformers causal LM (a GenerationMixin), got "
                f"{type(assistant).__name__}"
            )
        try:
            self.base = _base_model(assistant)
            weight, bias, softcap, logit_scale = _head_of(assistant)
        except TypeError as error:
            raise TypeError(f"assistant_model: {error}") from None
        if weight.shape[0] != vocab:  # a DTensor's shape is the whole head's
            raise ValueError(
                f"assistant_model: expected a head over the target's {vocab} tokens, got "
                f"{weight.shape[0]}; drafts from another tokenizer (universal assisted decoding, "
                "assistant_tokenizer=) are not supported"
            )
        # A ColwiseParallel head: this rank's slice, which must be the target's (the residual's
        # race walks both heads' blocks side by side); a replicated one: the whole head.
        weight, bias, group = local_head(weight, bias)
        self.vocab_slice = None if group is None else VocabSlice.of(group, weight.shape[0])
        where = [
            (part.start, part.size) if part else None for part in (self.vocab_slice, target_slice)
        ]
        if self.vocab_slice is not None and where[0] != where[1]:
            raise ValueError(
                "assistant_model: expected a vocabulary-parallel head sharded as the target's "
                f"(rows [start, start + size) of the vocabulary on this rank: {where[1]}), got "
                f"{where[0]}"
            )
        self.model, self.weight = assistant, weight
        self.head = dict(
            weight=weight, bias=bias, softcap=softcap, logit_scale=logit_scale, process_group=group
        )
        config = copy.deepcopy(assistant.generation_config)
        config.update(**config._get_default_generation_params(), defaults_only=True)
        self.count = config.num_assistant_tokens
        self.schedule = config.num_assistant_tokens_schedule
        self.threshold = config.assistant_confidence_threshold
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"num_assistant_tokens_schedule: expected one of {_SCHEDULES} on the assistant's "
                f"generation_config, got {self.schedule!r}"
            )
        if self.threshold and is_sklearn_available():
            raise ValueError(
                "assistant_confidence_threshold: with scikit-learn installed, generate() adapts "
                "the assistant's threshold from an ROC curve of its past drafts, which "
                "chunklogits.sample does not reproduce; set "
                "assistant_model.generation_config.assistant_confidence_threshold = 0 (off), got "
                f"{self.threshold}"
            )
        self.kwargs = {name: value for name, value in model_kwargs.items() if name != "cache"}
        self.kwargs["cache"] = DynamicCache(config=assistant.config.get_text_config(decoder=True))
        self.kwargs["cache"].activate_past_recording(recurrent_states_to_keep=self.count)
        self.drafted_length = 0

    def propose(self, input_ids: Tensor, context: _Context) -> _Drafts:
        length = input_ids.shape[1]
        room = min(int(self.count), context.max_length - length - 1)
        tokens, logprobs, rows = [], [], []
        if room > 0:
            surplus = self.drafted_length - length  # drafts the target rejected, in the cache
            if surplus >= 0:
                self.kwargs["cache"].crop(-surplus)
            ids = input_ids
            head = dict(self.head, shards=context.head["shards"])
            for _ in range(room):
                hidden = _forward_new(self.model, self.base, ids, self.kwargs, first=False)[-1:]
                pick = sample_next(
                    hidden,
                    prev_tokens=context.penalised(ids),
                    generator=context.generator,
                    return_logprobs=True,
                    **context.token_bias(ids),
                    **head,
                    **context.options,
                )
                ids = torch.cat([ids, pick.tokens[None]], 1)
                tokens.append(pick.tokens)
                logprobs.append(pick.logprobs)
                rows.append(hidden)
                unsure = self.threshold and math.exp(pick.logprobs.item()) < self.threshold
                if context.is_eos(pick.tokens) or unsure:
                    break
            self.drafted_length = ids.shape[1]
        if not tokens:
            empty = input_ids.new_zeros(0)
            return _Drafts(empty, None, None)
        return _Drafts(torch.cat(tokens), torch.cat(logprobs), torch.cat(rows))

    def update(self, kept: int, count: int) -> None:
        if self.schedule in ("heuristic", "heuristic_transient"):
            self.count = self.count + 2 if kept == count else max(1, self.count - 1)

    def finish(self) -> None:
        if self.schedule == "heuristic":
            self.model.generation_config.num_assistant_tokens = self.count


class _PromptLookupDrafts:
    """``PromptLookupCandidateGenerator`` itself (``generate()``'s lookup): the tokens that
    follow the first earlier occurrence of the sequence's last n-gram, ``n`` from
    ``max_matching_ngram_size`` down to 1."""

    def __init__(self, generation_config, logits_processor, model: nn.Module):
        from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

        self.count = generation_config.prompt_lookup_num_tokens
        self.lookup = PromptLookupCandidateGenerator(
            eos_token_id=generation_config._eos_token_tensor,
            num_output_tokens=self.count,
            max_matching_ngram_size=generation_config.max_matching_ngram_size or 2,
            max_length=generation_config.max_length,
            logits_processor=logits_processor,
            vocab_size=model.config.get_text_config().vocab_size,
        )

    def propose(self, input_ids: Tensor, context: _Context) -> _Drafts:
        ids, _ = self.lookup.get_candidates(input_ids)
        return _Drafts(ids[0, input_ids.shape[1] :], None, None)

    def update(self, kept: int, count: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _default_shards(weight: Tensor) -> int:
    """The vocabulary shards ``sample_next`` cuts ``weight`` into for one row by default."""
    plan = plan_blocks(
        1,
        weight.shape[0],
        weight.dtype,
        weight.device,
        dim=weight.shape[1],
        bytes_per_element=_BYTES_PER_ELEMENT,
        backward=False,
    )
    return len(plan.shards)


def _problem(
    hidden: Tensor,
    head: dict,
    options: dict,
    prev: Tensor | None,
    bias: dict,
    vocab_slice: VocabSlice | None,
):
    """``sample_next``'s problem (``_Problem``) for sampling ``hidden`` ``[n, D]`` with
    ``options`` and ``bias`` (``{"logit_bias": (tokens, values)}`` ``[n, K]``, or empty), over
    this rank's ``vocab_slice`` of the head when given."""
    penalty = float(options["repetition_penalty"])
    return _Problem(
        hidden=hidden,
        weight=head["weight"],
        bias=head["bias"],
        transform=make_transform(head["softcap"], head["logit_scale"]),
        penalty=penalty,
        temperature=float(options["temperature"]),
        prev_tokens=None if penalty == 1.0 else prev.long(),
        key=None,
        shards=head["shards"],
        chunk_size=None,
        want_raw=False,
        logit_bias=_token_bias(bias.get("logit_bias"), False, hidden),
        vocab_slice=vocab_slice,
    )


class _Warped(NamedTuple):
    """Per row, the warped distribution's kept set (``y > tau``, or ``y == tau`` up to index
    ``tau_index``) and log-normaliser ``lse``: ``log p_v = y_v - lse`` on the kept set."""

    tau: Tensor
    tau_index: Tensor
    lse: Tensor

    def logprobs(self, y: Tensor, v0: int, rows: slice) -> Tensor:
        """``log p`` of the block ``y`` (vocabulary ``v0 + j``, rows ``rows``), -inf off the
        kept set."""
        tau, index = self.tau[rows, None], self.tau_index[rows, None]
        vocab = torch.arange(v0, v0 + y.shape[1], device=y.device)
        kept = (y > tau) | ((y == tau) & (vocab[None, :] <= index))
        return (y - self.lse[rows, None]).masked_fill_(~kept, -math.inf)


def _warped(problem: _Problem, options: dict, tokens: Tensor | None = None):
    """Each row's warped distribution (``_Warped``), and with ``tokens`` ``[n]`` (-1: none) the
    log-prob of row ``i``'s token under it ``[n]``: the kept set as ``sample_next`` finds it,
    then one pass for the log-sum-exp over it (the engine's online merge, as ``sample_next``'s:
    the token's log-prob is ``(y - max) - log_sum``, without ``lse``'s rounding)."""
    top_k, top_p, min_p = options["top_k"], float(options["top_p"]), options["min_p"]
    cutoffs = {name: options[name] for name in ("epsilon_cutoff", "eta_cutoff") if options[name]}
    rows, device = problem.hidden.shape[0], problem.hidden.device
    new = dict(device=device, dtype=problem.stat_dtype)
    if top_k or top_p < 1.0 or min_p is not None or cutoffs:
        _, tau, tau_index = _thresholds(problem, top_k, top_p, min_p, cutoffs)
    else:
        tau = torch.full((rows,), -math.inf, **new)
        tau_index = torch.full((rows,), problem.vocab - 1, dtype=torch.long, device=device)
    log_sum = _log_sum_state(rows, new)
    row_max = torch.full((rows,), -math.inf, **new)
    picked = torch.full((rows,), -math.inf, **new)
    kept_set = _Warped(tau, tau_index, torch.zeros_like(row_max))  # log p before normalising
    for r0, r1, v0, _, y in _blocks(problem, tempered=True):
        row_max[r0:r1] = torch.maximum(row_max[r0:r1], y.amax(1))
        kept = kept_set.logprobs(y, v0, slice(r0, r1))
        _fold_log_sum(log_sum, kept, r0, r1)
        if tokens is not None:
            column = tokens[r0:r1] - v0
            inside = (column >= 0) & (column < y.shape[1])
            value = kept.gather(1, column.clamp(0, y.shape[1] - 1)[:, None]).squeeze(1)
            picked[r0:r1] = torch.where(inside, value, picked[r0:r1])
    stats = _log_sum_stats(log_sum)
    if problem.vocab_slice is not None:
        # The whole vocabulary's maximum and log-sum, the token's log-prob from its rank (-inf
        # on the others, whose slices do not hold it).
        s = _Scan(row_max=row_max, lse=stats, win_val=None if tokens is None else picked)
        _merge_ranks(problem.vocab_slice, s, s.win_val)
        row_max, stats, picked = s.row_max, s.lse, s.win_val
    _check_rows(row_max)
    warped = _Warped(tau, tau_index, stats.lse)
    return warped if tokens is None else (warped, stats.log_softmax_at(picked))


def _speculative_tokens(hidden, prev, bias: dict, drafts: _Drafts, drafter, context: _Context):
    """Algorithm 1 of speculative sampling on one round: the kept drafts, then a token from the
    residual ``max(0, p - q)`` at the first rejection, or from ``p`` after the last draft
    (``[k]`` tokens). ``prev``, ``bias``: the rows' penalised tokens and token biases."""
    count, device = drafts.tokens.shape[0], hidden.device
    target = _problem(hidden, context.head, context.options, prev, bias, context.vocab_slice)
    padded = torch.cat([drafts.tokens, drafts.tokens.new_full((1,), -1)])
    p, logp = _warped(target, context.options, padded)
    source = device if context.generator is None else context.generator.device
    uniform = torch.rand(count, generator=context.generator, device=source).to(device)
    kept = 0
    if count:
        # generate() keeps draft i when r_i < p_i / q_i, r_i uniform in [0, 1).
        accepted = uniform.log() < logp[:count] - drafts.logprobs
        kept = int(accepted.cumprod(0).sum())
    key = _noise_key(context.generator, device)
    if kept == count:
        token = _race(key, target, p, kept)
    else:
        # The assistant's problem of draft ``kept``'s draw: the same row, head, shards,
        # penalised tokens and token biases, hence bitwise the logits it was drawn from.
        head = dict(drafter.head, shards=context.head["shards"])
        row = slice(kept, kept + 1)
        draft_prev = None if prev is None else prev[row]
        draft_bias = {name: (tokens[row], values[row]) for name, (tokens, values) in bias.items()}
        draft = _problem(
            drafts.hidden[row], head, context.options, draft_prev, draft_bias, drafter.vocab_slice
        )
        q = _warped(draft, context.options)
        if drafter.vocab_slice is None and target.vocab_slice is not None:
            # A replicated draft head: the race walks its rows of the target rank's slice.
            part = target.vocab_slice
            start, end = part.start, part.start + part.size
            draft = replace(
                draft,
                weight=draft.weight[start:end],
                bias=None if draft.bias is None else draft.bias[start:end],
                vocab_slice=target.vocab_slice,
            )
        token = _race(key, target, p, kept, draft, q)
    return torch.cat([drafts.tokens[:kept], token])


def _race(key, target: _Problem, p: _Warped, row: int, draft=None, q: _Warped | None = None):
    """``[1]`` token: a draw from row ``row`` of ``p``, or from ``max(0, p - q)`` with the
    assistant's one-row problem ``draft`` and its ``q``: the largest ``log r_v + g_v`` over the
    vocabulary, ``g`` Gumbel noise keyed by ``key`` and vocabulary index. ``p``'s own race runs
    alongside, for a residual that rounding left without mass."""
    device = target.hidden.device
    best = torch.full((2,), -math.inf, device=device)
    winner = torch.zeros(2, dtype=torch.long, device=device)
    draft_blocks = None if draft is None else _blocks(draft, tempered=True)
    at = torch.tensor([row], device=device)
    for r0, r1, v0, _, y in _blocks(target, tempered=True):
        if not r0 <= row < r1:
            continue
        log_p = p.logprobs(y[row - r0 : row - r0 + 1], v0, slice(row, row + 1))[0]
        scores = [log_p, log_p]
        if draft_blocks is not None:
            _, _, _, _, y_q = next(draft_blocks)  # the same vocabulary shard of the assistant
            log_q = q.logprobs(y_q, v0, slice(0, 1))[0]
            scores[0] = torch.where(
                log_q < log_p, log_p + torch.log(-torch.expm1(log_q - log_p)), -math.inf
            )
        vocab = torch.arange(v0, v0 + y.shape[1], device=device)
        noise = _gumbel(key, at, vocab)
        keys = torch.stack(scores) + noise
        column = keys.argmax(1)
        value = keys.gather(1, column[:, None]).squeeze(1)
        better = value > best
        best = torch.where(better, value, best)
        winner = torch.where(better, column + v0, winner)
    if target.vocab_slice is not None:
        # The largest key over the ranks, and its token (the lowest rank's among equal keys).
        s = _Scan(win_idx=winner, win_val=best)
        _merge_ranks(target.vocab_slice, s, best)
        winner, best = s.win_idx, s.win_val
    # The residual has mass whenever a draft was rejected, but for rounding (p == q).
    return winner[:1] if bool(best[0] > -math.inf) else winner[1:]
