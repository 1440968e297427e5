"""Next-token selection from a linear head's last hidden states without the ``[B, V]`` logits.

HF's sampling step is ``scores = lm_head(h).float()``, then its processors in this order:
repetition penalty, temperature, top-k, top-p, min-p, epsilon, eta; then ``softmax`` and
``multinomial`` (greedy decoding applies only the repetition penalty, then ``argmax``). Each
filter keeps the tokens whose processed logit ``y`` reaches a per-row threshold:

* top-k keeps ``y >= y_(k)``, the k-th largest value (ties with it are kept);
* top-p keeps the most probable tokens up to and including the one at which the descending
  cumulative probability reaches ``top_p`` (the "crossing" token): ``y >= y_cross``. Of several
  tokens tied at ``y_cross`` HF keeps as many as its cumulative rule admits, which ones following
  ``torch.sort``'s unstable order; we keep as many, those of smallest vocabulary index, so the
  threshold is a pair: ``y > y_cross``, or ``y == y_cross`` up to an index;
* min-p keeps ``p >= min_p * p_max``, i.e. ``y >= max(y) + log(min_p)`` (top-k and top-p never
  drop the most probable token, so the maximum is the global one);
* epsilon_cutoff and eta_cutoff (after min-p) keep ``p >= epsilon``, ``p >= min(eta, sqrt(eta) *
  exp(-H))``, with ``p`` and ``H`` the probabilities and entropy of what the filters before left:
  ``y >= lse + log(epsilon)`` (and the maximum), from a pass that sums that set's mass and
  entropy per row.

Processors that mask or bias a known few tokens per row (generate()'s sequence_bias,
bad_words_ids, no_repeat_ngram_size, min_new_tokens, suppress_tokens, forced eos, ...) arrive as
``logit_bias``, ``[B, K]`` (token, value) pairs added to each block as it is computed.

So the sampled distribution is ``softmax(y)`` restricted to ``y >= tau`` for one threshold ``tau``
per row, and a draw from it is ``argmax_{y_v >= tau} (y_v + g_v)`` with standard Gumbel noise
``g`` (the Gumbel-max trick). The noise is a hash of (key, row, vocabulary index), so a draw does
not depend on how the vocabulary is cut into shards, only on the key (``seed``/``generator``).

One pass over the vocabulary shards (``_blocks``) keeps, per row, the largest processed logits
("candidates": per-shard top-C merged into a running top-C) and, when asked, the log-sum-exp and
the raw log-sum-exp. Thresholds come from the candidates: top-k's directly; top-p's from their
cumulative mass when it reaches ``top_p`` (otherwise a bisection on the value of the crossing
token, a few passes that count mass above evenly spread levels, then a pass that collects the
tokens of the last interval); min-p's from the maximum. The draw is made among the candidates
when they provably hold every kept token (the smallest candidate is below ``tau``), otherwise by a
masked Gumbel-max pass over the vocabulary. Plain sampling and greedy decoding are one pass that
keeps a running (noisy) argmax. Every pass walks all rows with the same block plan, so later
passes see bitwise the logits the first one saw. Host synchronisation: none per shard; one or two
checks per call, a few more on the rare paths (nucleus beyond the candidates, kept tokens beyond
them, tokens tied at a threshold beyond them).

Over a process group (vocabulary parallelism) each rank walks only its slice of the head, with
the whole vocabulary's indices (so the noise, candidates, winners and repetition penalty see
global token ids), and every pass ends with one ``all_gather`` of its few per-row results
(``_merge_ranks``): the top-C of all ranks' candidates, the winner of largest key, log-sum-exps
and level statistics combined. Every rank then holds the same numbers, so every host-side
decision (which path, how many passes) is taken alike on every rank and the tokens are those one
process would draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ._blocks import (
    LogitTransform,
    RowStats,
    _block_logits,
    _fold_block,
    _FoldState,
    _Fresh,
    _merge_top,
    _Rows,
    _shard_params,
    _Workspace,
    plan_blocks,
)
from ._checks import (
    check_bool,
    check_head,
    check_integer_tensor,
    check_sampling_options,
    check_tensor,
    make_transform,
)
from .distributed import VocabSlice, checked_on_every_rank

# Candidates kept beyond top_k, so that ties with the k-th value (frequent with half-precision
# logits) rarely spill over the candidate set.
_TOPK_MARGIN = 64
# The candidates' merges (``_merge_top``) keep torch.topk's order among equal values: no result
# depends on it (``_tie_index``, ``_draw`` and ``beam_candidates`` order tied candidates by index
# themselves, and a tie at the C-th place is seen in ``cand_vals[:, -1]``), and the sort that
# orders them by index made ``sample_next`` 5% slower on the CPU (B=64, V=32768, D=1024).
_CANDIDATES_BY_INDEX = False
# Candidates kept when top-p or min-p act without top-k, and tokens one search interval may hold.
_CANDIDATES = 256
# Thresholds per bisection pass of the top-p search.
_LEVELS = 32
# exp(-104) is below fp32's smallest subnormal: tokens this far below the row maximum have
# probability 0 in HF's fp32 softmax, so the top-p crossing token never lies below.
_NEGLIGIBLE = 104.0
# Transient bytes per block element of the costliest sampling pass: fp32 logits and a copy, the
# half-precision GEMM output (or the fp32 one's rounding to the model dtype), and for Gumbel noise
# an int64 hash, its shifted copy and the fp32 noise. Every pass plans its blocks with it, so that
# all passes share one block shape.
_BYTES_PER_ELEMENT = 40
_MASK32 = 0xFFFFFFFF


class NextTokens(NamedTuple):
    """``sample_next(..., return_logprobs=True)``: the tokens ``[B]`` (int64), their log-prob
    under the processed distribution that was sampled (after repetition penalty, temperature,
    top-k, top-p, min-p; for greedy decoding after the repetition penalty) and under the model's
    own distribution ``log_softmax(transform(hidden @ weight.T + bias))`` (fp32, ``[B]``)."""

    tokens: Tensor
    logprobs: Tensor
    raw_logprobs: Tensor


@torch.no_grad()
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
    process_group: ProcessGroup | None = None,
) -> Tensor | NextTokens:
    """The next token of each row, drawn as HF's ``generate()`` draws it, from hidden states.

    Naive equivalent (``reference.sample_next``; what ``generate()`` does per step)::

        scores = softcap(F.linear(hidden_last, weight, bias).float() * logit_scale)
        scores = scores + dense(logit_bias)      # [B, V]: the listed tokens' values, 0 elsewhere
        for processor in (RepetitionPenaltyLogitsProcessor(repetition_penalty),
                          TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                          TopPLogitsWarper(top_p), MinPLogitsWarper(min_p),
                          EpsilonLogitsWarper(epsilon_cutoff), EtaLogitsWarper(eta_cutoff)):
            scores = processor(prev_tokens, scores)   # those switched on
        tokens = torch.multinomial(scores.softmax(-1), 1).squeeze(1)   # or scores.argmax(-1)

    Same distribution (same processor order, same tie rules: top-k keeps ties with the k-th
    value, top-p keeps the token that crosses ``top_p``), greedy decoding token for token, but the
    logits exist one ``[chunk, V / shards]`` block at a time and are never sorted.

    Args:
        hidden_last: ``[B, D]`` last hidden state of each sequence (model dtype).
        weight: ``[V, D]`` output embedding; bias: ``[V]`` or None (hidden's dtype and device).
        softcap, logit_scale: the head's logit transform, as in ``linear_cross_entropy``.
        shards, chunk_size: blocking, as in ``linear_cross_entropy``; the tokens drawn do not
            depend on them.
        do_sample: False for greedy decoding (argmax after the repetition penalty; temperature,
            top-k, top-p and min-p are then ignored, as in ``generate()``).
        temperature: > 0 when sampling; divides the (penalised) logits.
        top_k: keep the ``top_k`` most probable tokens and ties with the last; 0 turns it off.
        top_p: in (0, 1]; keep the smallest most-probable set whose mass reaches ``top_p``; 1 off.
        min_p: in [0, 1] or None (off); keep tokens with ``p >= min_p * max(p)``.
        epsilon_cutoff: in (0, 1) or None (off); keep tokens with ``p >= epsilon_cutoff`` and
            the most probable, ``p`` the distribution left by the filters above (one more pass).
        eta_cutoff: in (0, 1) or None (off); keep tokens with ``p >= min(eta, sqrt(eta) *
            exp(-H))``, ``H`` the entropy of the distribution left by the filters above (one more
            pass); the probability comparisons are those of HF's fp32 softmax up to rounding.
        repetition_penalty: > 0; 1 is off. Logits of tokens in ``prev_tokens`` are divided by it
            when positive and multiplied by it when negative (HF's rule).
        prev_tokens: ``[B, L]`` integer tokens already in each sequence (prompt and generated);
            entries outside ``[0, V)`` (e.g. -1 for padding) are ignored. Needed when
            ``repetition_penalty != 1``.
        logit_bias: ``(tokens, values)``, ``[B, K]`` integer and ``[B, K]`` float: each row's
            ``values`` are added to its ``tokens``' logits before the repetition penalty (the
            place of generate()'s ``sequence_bias``; -inf masks a token, as ``bad_words_ids``,
            ``no_repeat_ngram_size``, ``min_new_tokens``, ``suppress_tokens`` do); a token listed
            twice in a row gets the sum; entries outside ``[0, V)`` (e.g. -1) are ignored.
        logit_bias_only: the listed tokens' logits are their (summed) values and every other
            token's -inf (``forced_bos_token_id``, ``forced_eos_token_id``), instead of adding.
        seed / generator: the randomness (at most one): an int, or a ``torch.Generator`` from
            which one 64-bit key is drawn per call; neither draws the key from torch's default
            generator (so ``torch.manual_seed`` makes it reproducible).
        return_logprobs: also return the tokens' log-probs (see ``NextTokens``).
        process_group: vocabulary parallelism (``chunklogits.distributed``): ``weight`` and
            ``bias`` are this rank's slice of the head, the slices of the group's ranks following
            one another in rank order; ``hidden_last``, ``prev_tokens`` and every option are the
            same on every rank (checked; ``logit_bias``'s tensors must be, unchecked), and so are
            the tokens returned: the same tokens, for
            the same seed, as one process holding the whole head draws. ``shards`` counts this
            rank's slice. With a ``generator`` (or neither), group rank 0's key is used.

    Returns:
        ``tokens`` ``[B]`` int64, or ``NextTokens(tokens, logprobs, raw_logprobs)``; not
        differentiable (the log-probs of a trainer are ``token_logprobs``'s).
    """
    with checked_on_every_rank(process_group) as ranks:
        check_head(hidden_last, weight, bias)
        if hidden_last.is_meta:
            raise ValueError(
                "hidden_last: expected a tensor with values to sample from, got a meta tensor "
                "(the loss and log-prob ops accept meta tensors for shape and memory planning)"
            )
        if hidden_last.dim() != 2 or hidden_last.shape[0] == 0:
            raise ValueError(
                f"hidden_last: expected shape [B, D] with B >= 1, got {tuple(hidden_last.shape)}"
            )
        options = dict(
            do_sample=do_sample,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            epsilon_cutoff=epsilon_cutoff,
            eta_cutoff=eta_cutoff,
        )
        check_sampling_options(temperature=temperature, **options)
        cutoffs = {
            name: float(value)
            for name, value in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff))
            if value is not None
        }
        token_bias = _token_bias(logit_bias, logit_bias_only, hidden_last)
        check_bool("return_logprobs", return_logprobs)
        penalty = float(repetition_penalty)
        source = randomness(seed, generator, hidden_last.device)
        prev = _penalised_tokens(prev_tokens, hidden_last, penalty)
        temperature = float(temperature) if do_sample else 1.0
        transform = make_transform(softcap, logit_scale)
        # Checked here, not in the first pass: an error must reach every rank.
        plan_blocks(
            1, weight.shape[0], weight.dtype, weight.device, shards=shards, chunk_size=chunk_size
        )
        vocab_slice = ranks.agree(
            hidden_last.detach(),
            weight,
            bias,
            replace(transform, temperature=temperature),
            None if prev is None else prev.flatten(),
            "prev_tokens",
            sampling=dict(
                **options, return_logprobs=return_logprobs, seed=seed, generator=generator
            ),
        )
    key = None
    if do_sample:
        key = _noise_key(source, hidden_last.device)
        if vocab_slice is not None and seed is None:  # a seed gives every rank the same key
            vocab_slice.broadcast_first_(key)
    problem = _Problem(
        hidden=hidden_last,
        weight=weight,
        bias=bias,
        transform=transform,
        penalty=penalty,
        temperature=temperature,
        prev_tokens=prev,
        key=key,
        shards=shards,
        chunk_size=chunk_size,
        want_raw=return_logprobs,
        vocab_slice=vocab_slice,
        logit_bias=token_bias,
        logit_bias_only=logit_bias_only,
    )
    if do_sample and (top_k > 0 or top_p < 1.0 or min_p is not None or cutoffs):
        pick = _sample_filtered(problem, top_k, float(top_p), min_p, cutoffs)
    else:
        pick = _scan(
            problem,
            winner=True,
            noisy=do_sample,
            lse=return_logprobs,
            raw_lse=return_logprobs,
            checked=True,
        )
    if not return_logprobs:
        return pick.win_idx
    return NextTokens(
        pick.win_idx,
        pick.lse.log_softmax_at(pick.win_val),
        pick.raw_lse.log_softmax_at(pick.win_raw),
    )


@dataclass(frozen=True)
class _Problem:
    """One call's inputs. ``y = penalise(transform(hidden @ weight.T + bias) + logit_bias) /
    temperature`` are the processed logits; ``x = transform(...)`` the raw ones, carried when
    ``want_raw``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    transform: LogitTransform
    penalty: float
    temperature: float
    prev_tokens: Tensor | None
    key: Tensor | None
    shards: int | None
    chunk_size: int | None
    want_raw: bool
    vocab_slice: VocabSlice | None = None
    logit_bias: tuple[Tensor, Tensor] | None = None  # [B, K] tokens, [B, K] values
    logit_bias_only: bool = False

    @property
    def vocab(self) -> int:
        """The whole vocabulary's size (``weight`` holds all of it without a process group)."""
        return self.weight.shape[0] if self.vocab_slice is None else self.vocab_slice.vocab

    @property
    def stat_dtype(self) -> torch.dtype:
        return torch.promote_types(self.hidden.dtype, torch.float32)

    @property
    def keep_raw(self) -> bool:
        """Whether the raw block must be copied before processing (which would change it)."""
        return self.want_raw and (self.penalty != 1.0 or self.temperature != 1.0)


def _penalised_tokens(prev_tokens, hidden: Tensor, penalty: float) -> Tensor | None:
    """``[B, L]`` int64 tokens whose logits the repetition penalty changes (entries outside the
    vocabulary change none), or None when the penalty is off."""
    if prev_tokens is None:
        if penalty != 1.0:
            raise ValueError(
                f"prev_tokens: repetition_penalty={penalty} needs the tokens to penalise, got None"
            )
        return None
    check_integer_tensor("prev_tokens", prev_tokens)
    if prev_tokens.dim() != 2 or prev_tokens.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"prev_tokens: expected shape [B, L] with B = hidden_last.shape[0] = {hidden.shape[0]},"
            f" got {tuple(prev_tokens.shape)}"
        )
    if prev_tokens.device != hidden.device:
        raise ValueError(
            f"prev_tokens: expected hidden_last's device {hidden.device}, got {prev_tokens.device}"
        )
    return None if penalty == 1.0 else prev_tokens.long()


def randomness(seed, generator, device: torch.device) -> torch.Generator | None:
    """The generator that ``seed=`` / ``generator=`` (at most one) stand for; None for torch's
    default generator."""
    if seed is not None and generator is not None:
        raise ValueError("seed, generator: expected at most one of them, got both")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")
        return torch.Generator(device=device).manual_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    return generator


def _noise_key(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``[2]`` int64 in ``[0, 2**32)`` on ``device``: the key of one call's Gumbel noise, drawn
    from ``generator`` without a host synchronisation."""
    source = device if generator is None else generator.device
    return torch.randint(0, 2**32, (2,), generator=generator, device=source).to(device)


def _mix32_(h: Tensor) -> Tensor:
    """A bijective 32-bit integer hash, in place on int64 values in ``[0, 2**32)``; every product
    stays below 2**59, so no int64 overflow."""
    for _ in range(2):
        h.bitwise_xor_(h >> 16).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    return h.bitwise_xor_(h >> 16)


def _gumbel(key: Tensor, rows: Tensor, vocab: Tensor) -> Tensor:
    """Standard Gumbel noise for every (row, vocabulary index) pair of the broadcast ``rows`` and
    ``vocab`` (int64), a function of ``key`` and the pair only. fp32."""
    h = _mix32_(vocab ^ key[0])
    h = _mix32_(h ^ ((rows * 0x9E3779B1) & _MASK32) ^ key[1])
    # u in (0, 1) with 32 random bits; g = -log(-log(1 - u)) keeps full relative precision in
    # the upper tail (small u), where the winners of a Gumbel-max draw come from.
    u = h.to(torch.float32).add_(0.5).mul_(2.0**-32).clamp_(max=1.0 - 2.0**-24)
    return u.neg_().log1p_().neg_().log_().neg_()


def _token_bias(logit_bias, only, hidden: Tensor) -> tuple[Tensor, Tensor] | None:
    """``logit_bias`` checked: ``(tokens int64, values in the statistics' dtype)``, or None."""
    check_bool("logit_bias_only", only)
    if logit_bias is None:
        if only:
            raise ValueError("logit_bias: logit_bias_only=True needs the tokens to keep, got None")
        return None
    if not isinstance(logit_bias, tuple) or len(logit_bias) != 2:
        raise TypeError(f"logit_bias: expected a (tokens, values) pair, got {logit_bias!r}")
    tokens, values = logit_bias
    check_integer_tensor("logit_bias", tokens)
    check_tensor("logit_bias", values)
    rows = hidden.shape[0]
    if tokens.dim() != 2 or tokens.shape[0] != rows or values.shape != tokens.shape:
        raise ValueError(
            f"logit_bias: expected tokens and values of one shape [B, K] with B = "
            f"hidden_last.shape[0] = {rows}, got {tuple(tokens.shape)} and {tuple(values.shape)}"
        )
    if not values.dtype.is_floating_point:
        raise TypeError(f"logit_bias: expected floating-point values, got dtype {values.dtype}")
    for tensor in logit_bias:
        if tensor.device != hidden.device:
            raise ValueError(
                f"logit_bias: expected hidden_last's device {hidden.device}, got {tensor.device}"
            )
    return tokens.long(), values.to(torch.promote_types(hidden.dtype, torch.float32))


def _bias_block(y: Tensor, bias: tuple[Tensor, Tensor], v0: int, only: bool) -> Tensor:
    """``logit_bias`` on the block ``y`` (columns ``v0 + j``): the listed values added (summed
    where a token is listed twice), or, when ``only``, in place of the logits, -inf elsewhere."""
    tokens, values = bias
    width = y.shape[1]
    local = tokens - v0
    local = local.where((local >= 0) & (local < width), width)
    add = torch.zeros(y.shape[0], width + 1, dtype=y.dtype, device=y.device)
    add = add.scatter_add_(1, local, values)[:, :width]
    if not only:
        return y + add
    hit = torch.zeros(y.shape[0], width + 1, dtype=torch.bool, device=y.device)
    return add.masked_fill_(~hit.scatter_(1, local, True)[:, :width], -math.inf)


def _penalise(y: Tensor, prev: Tensor, v0: int, penalty: float) -> Tensor:
    """HF's repetition penalty on the block ``y`` (columns ``v0 + j``) for the tokens ``prev``."""
    width = y.shape[1]
    local = prev - v0
    local = local.where((local >= 0) & (local < width), width)
    hit = torch.zeros(y.shape[0], width + 1, dtype=torch.bool, device=y.device).scatter_(
        1, local, True
    )
    return torch.where(hit[:, :width], torch.where(y < 0, y * penalty, y / penalty), y)


def _blocks(problem: _Problem, tempered: bool):
    """Yield ``(r0, r1, v0, x, y)`` per block: raw logits ``x`` and processed logits ``y`` (the
    same tensor when the raw ones are not wanted) of rows ``[r0, r1)`` and vocabulary entries
    ``[v0, v0 + width)``; ``y`` not yet divided by the temperature unless ``tempered``. Every pass
    walks all rows with the same plan, so each recomputes exactly the first pass's logits (a GEMM's
    rounding can depend on its shape) and thresholds taken from one pass hold in the next."""
    hidden, weight, prev = problem.hidden, problem.weight, problem.prev_tokens
    plan = plan_blocks(
        hidden.shape[0],
        weight.shape[0],
        hidden.dtype,
        hidden.device,
        shards=problem.shards,
        chunk_size=problem.chunk_size,
        bytes_per_element=_BYTES_PER_ELEMENT,
        dim=hidden.shape[1],
        backward=False,
    )
    chunks, work = _Rows(hidden, None, plan), _Workspace(plan, hidden.device)
    start = 0 if problem.vocab_slice is None else problem.vocab_slice.start
    for v0, v1 in plan.shards:
        w, b = _shard_params(weight, problem.bias, v0, v1, plan)
        for r0, r1, h in chunks:
            x = _block_logits(
                h, w, b, problem.transform, work, problem.stat_dtype, rounded_to=hidden.dtype
            )
            y = x.clone() if problem.keep_raw else x
            if problem.logit_bias is not None:
                rows = [part[r0:r1] for part in problem.logit_bias]
                y = _bias_block(y, rows, start + v0, problem.logit_bias_only)
            if prev is not None:
                y = _penalise(y, prev[r0:r1], start + v0, problem.penalty)
            if tempered and problem.temperature != 1.0:
                y.div_(problem.temperature)
            yield r0, r1, start + v0, x, y


@dataclass
class _Scan:
    """Per-row results of a pass over the vocabulary (``n`` rows); unrequested ones stay
    None. ``win_*`` also serve as the final pick of ``sample_next``."""

    cand_vals: Tensor | None = None  # [n, C] largest processed logits, descending
    cand_idx: Tensor | None = None  # [n, C] their vocabulary indices
    cand_raw: Tensor | None = None  # [n, C] their raw logits
    win_idx: Tensor | None = None  # [n] argmax over the vocabulary of y (+ Gumbel noise)
    win_val: Tensor | None = None  # [n] its processed logit
    win_raw: Tensor | None = None  # [n] its raw logit
    # Log-sum-exps as the engine keeps them (RowStats' max and log_sum: log-probs formed as
    # (x - max) - log_sum carry no rounding of lse): of the selected processed logits, of all
    # raw logits.
    lse: RowStats | None = None
    raw_lse: RowStats | None = None
    level_mass: Tensor | None = None  # [n, G] sum of exp(y - ref) over y >= levels[:, i]
    level_count: Tensor | None = None  # [n, G] number of those tokens
    tied_index: Tensor | None = None  # [n] index of the keep-th token (by index) with y == value
    tied_count: Tensor | None = None  # [n] number of tokens with y == value
    row_max: Tensor | None = None  # [n] max of y over the vocabulary (NaN if any y is NaN)
    moment_mass: Tensor | None = None  # [n] sum of exp(y - ref) over the selected tokens
    moment_sum: Tensor | None = None  # [n] sum of exp(y - ref) * (y - ref) over them


def _scan(
    problem: _Problem,
    *,
    candidates: int = 0,
    winner: bool = False,
    noisy: bool = False,
    floor: Tensor | None = None,
    floor_index: Tensor | None = None,
    ceiling: Tensor | None = None,
    levels: Tensor | None = None,
    ref: Tensor | None = None,
    nth_tied: tuple[Tensor, Tensor] | None = None,
    moments: bool = False,
    lse: bool = False,
    raw_lse: bool = False,
    checked: bool = False,
) -> _Scan:
    """One pass over the vocabulary for every row of ``problem``.

    Tokens are selected by ``floor <= y < ceiling`` (per-row bounds; None: unbounded), and those
    with ``y == floor`` only up to vocabulary index ``floor_index`` when given; the candidates,
    the winner and ``lse`` see only selected tokens, ``raw_lse``, the level statistics and
    ``nth_tied`` all of them. ``candidates``: how many largest processed logits to keep. ``winner``:
    track the argmax of ``y`` (first index among ties, as ``torch.argmax``), of ``y + g`` with
    Gumbel noise when ``noisy``. ``levels``: ``[n, G]`` increasing thresholds per row; ``ref``:
    ``[n]`` offsets for the masses (the row maxima). ``nth_tied``: ``(value, keep)``, find the
    index of the ``keep``-th token (in index order) with ``y == value`` (``V - 1`` if fewer).
    ``moments``: the selected tokens' masses and mass-weighted logits, offset by ``ref``.
    ``checked``: refuse rows whose processed logits have no finite maximum (``_check_rows``).
    """
    hidden = problem.hidden
    count = hidden.shape[0]
    row_ids = torch.arange(count, device=hidden.device)
    new = {"device": hidden.device, "dtype": problem.stat_dtype}
    raw = problem.want_raw
    s = _Scan()
    if candidates:
        s.cand_vals = torch.full((count, candidates), -math.inf, **new)
        s.cand_idx = torch.zeros(count, candidates, dtype=torch.long, device=hidden.device)
        s.cand_raw = torch.full((count, candidates), -math.inf, **new) if raw else None
    if winner:
        win_key = torch.full((count,), -math.inf, **new)
        s.win_idx = torch.zeros(count, dtype=torch.long, device=hidden.device)
        s.win_val = torch.full((count,), -math.inf, **new)
        s.win_raw = torch.full((count,), -math.inf, **new) if raw else None
    if lse:
        lse_state = _log_sum_state(count, new)
    if moments:
        s.moment_mass = torch.zeros(count, **new)
        s.moment_sum = torch.zeros(count, **new)
    if raw_lse:
        raw_state = _log_sum_state(count, new)
    if checked:
        s.row_max = torch.full((count,), -math.inf, **new)
    if levels is not None:
        hist_mass = torch.zeros(count, levels.shape[1] + 1, **new)
        hist_count = torch.zeros(count, levels.shape[1] + 1, dtype=torch.long, device=hidden.device)
    if nth_tied is not None:
        tie_value, tie_keep = nth_tied
        ties_seen = torch.zeros_like(tie_keep)
        s.tied_index = torch.full_like(tie_keep, problem.vocab - 1)

    # A pass that only keeps candidates divides just them by the temperature: division by T > 0
    # keeps the order, and gives the values dividing the whole block would.
    tempered = winner or lse or moments
    tempered |= any(o is not None for o in (floor, ceiling, levels, nth_tied))
    divisor = 1.0 if tempered else problem.temperature
    for r0, r1, v0, x, y in _blocks(problem, tempered):
        if checked:  # torch.maximum and amax propagate NaN
            s.row_max[r0:r1] = torch.maximum(s.row_max[r0:r1], y.amax(1))
        if raw_lse:
            _fold_log_sum(raw_state, x, r0, r1)
        if levels is not None:
            # Bin b holds the tokens with exactly b levels <= y: y >= levels[:, i] iff b > i.
            bins = torch.searchsorted(levels[r0:r1], y, right=True)
            hist_mass[r0:r1].scatter_add_(1, bins, (y - ref[r0:r1, None]).exp_())
            hist_count[r0:r1].scatter_add_(1, bins, torch.ones_like(bins))
        if nth_tied is not None:
            tied = y == tie_value[r0:r1, None]
            hit = tied & (tied.cumsum(1) + ties_seen[r0:r1, None] == tie_keep[r0:r1, None])
            s.tied_index[r0:r1] = torch.where(
                hit.any(1), hit.int().argmax(1) + v0, s.tied_index[r0:r1]
            )
            ties_seen[r0:r1] += tied.sum(1)
        if floor is not None:
            below = y < floor[r0:r1, None]
            if floor_index is not None:
                vocab = torch.arange(v0, v0 + y.shape[1], device=y.device)
                below |= (y == floor[r0:r1, None]) & (vocab[None, :] > floor_index[r0:r1, None])
            y = y.masked_fill(below, -math.inf)
        if ceiling is not None:
            y = y.masked_fill(y >= ceiling[r0:r1, None], -math.inf)
        if lse:
            _fold_log_sum(lse_state, y, r0, r1)
        if moments:
            shifted = y - ref[r0:r1, None]
            mass = shifted.exp()
            s.moment_mass[r0:r1] += mass.sum(1)
            # exp(-inf) * -inf is NaN: the excluded tokens weigh 0.
            s.moment_sum[r0:r1] += torch.where(mass > 0, mass * shifted, 0.0).sum(1)
        if candidates:
            _merge_candidates(s, r0, r1, v0, x, y, raw, divisor)
        if winner:
            key = y
            if noisy:
                vocab = torch.arange(v0, v0 + y.shape[1], device=y.device)
                key = _gumbel(problem.key, row_ids[r0:r1, None], vocab[None, :]).add_(y)
            col = key.argmax(1, keepdim=True)
            better = key.gather(1, col).squeeze(1) > win_key[r0:r1]
            win_key[r0:r1] = torch.where(better, key.gather(1, col).squeeze(1), win_key[r0:r1])
            s.win_idx[r0:r1] = torch.where(better, col.squeeze(1) + v0, s.win_idx[r0:r1])
            s.win_val[r0:r1] = torch.where(better, y.gather(1, col).squeeze(1), s.win_val[r0:r1])
            if raw:
                s.win_raw[r0:r1] = torch.where(
                    better, x.gather(1, col).squeeze(1), s.win_raw[r0:r1]
                )
    if lse:
        s.lse = _log_sum_stats(lse_state)
    if raw_lse:
        s.raw_lse = _log_sum_stats(raw_state)
    if levels is not None:
        s.level_mass = hist_mass[:, 1:].flip(1).cumsum(1).flip(1)
        s.level_count = hist_count[:, 1:].flip(1).cumsum(1).flip(1)
    if nth_tied is not None:
        s.tied_count = ties_seen
    if checked and divisor != 1.0:
        s.row_max.div_(divisor)
    if problem.vocab_slice is not None:
        _merge_ranks(problem.vocab_slice, s, win_key if winner else None)
    if checked:
        _check_rows(s.row_max)
    return s


def _log_sum_state(count: int, new: dict) -> _FoldState:
    """The engine's running (max, sum of exp(z - max)) of ``count`` rows, nothing folded."""
    return _FoldState(
        torch.full((count,), -math.inf, **new), torch.zeros(count, **new), *[None] * 3
    )


def _fold_log_sum(state: _FoldState, z: Tensor, r0: int, r1: int) -> None:
    """Fold the block ``z`` of rows ``[r0, r1)`` (left intact) into ``state`` in place, by the
    engine's online merge (``_fold_block``)."""
    rows = _FoldState(state.max[r0:r1], state.sum_exp[r0:r1], *[None] * 3)
    folded = _fold_block(z, rows, None, None, _Fresh(z.device), keep=True)
    rows.max.copy_(folded.max)
    rows.sum_exp.copy_(folded.sum_exp)


def _log_sum_stats(state: _FoldState) -> RowStats:
    """``RowStats`` holding the row maximum and centred log-sum of a folded ``state``."""
    return RowStats(state.sum_exp.log(), None, None, None, max=state.max)


def _exact_log_sum(values: Tensor) -> RowStats:
    """``RowStats`` holding the maximum and centred log-sum of the rows of ``values``
    ``[n, C]``, each with a finite maximum."""
    row_max = values.amax(1)
    return RowStats((values - row_max[:, None]).logsumexp(1), None, None, None, max=row_max)


def _check_rows(row_max: Tensor) -> None:
    """Refuse rows without a finite largest processed logit, where ``generate()``'s
    ``multinomial`` raises and a draw would return an arbitrary token: NaN or inf among the
    logits (from the hidden states or the head), every token masked by a -inf bias, or logits
    that overflow fp32 once divided by the temperature. One host synchronisation."""
    broken = ~row_max.isfinite()
    if not bool(broken.any()):
        return
    rows = broken.nonzero().squeeze(1).tolist()
    first = row_max[rows[0]].item()
    cause = {
        math.isnan(first): "a NaN logit (NaN in hidden_last, weight or bias)",
        first == math.inf: "a logit of +inf (inf in the inputs, or logits that overflow fp32 "
        "once divided by the temperature)",
        first == -math.inf: "every logit -inf (a -inf bias masking the whole vocabulary)",
    }[True]
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    raise ValueError(
        f"hidden_last: expected rows whose processed logits have a finite maximum, got "
        f"{len(rows)} without one (rows {shown}); row {rows[0]} has {cause}"
    )


def _merge_ranks(vocab_slice: VocabSlice, s: _Scan, win_key: Tensor | None) -> None:
    """Turn the results of a pass over this rank's slice into the whole vocabulary's, in place,
    the same on every rank (one ``all_gather``): the top-C of all ranks' candidates, the winner
    of largest key (the lowest rank, hence the lowest index, among ties: the single-process rule),
    log-sum-exps and level statistics combined. ``tied_*`` stay per rank (see ``_nth_tied``)."""
    parts = {name: getattr(s, name) for name in _MERGED if getattr(s, name) is not None}
    for name in ("lse", "raw_lse"):
        stats = parts.pop(name, None)
        if stats is not None:
            parts[name + "_max"], parts[name + "_log_sum"] = stats.max, stats.log_sum
    if win_key is not None:
        parts["win_key"] = win_key
    if not parts:  # a pass of _nth_tied
        return
    every = dict(zip(parts, vocab_slice.gather(list(parts.values())), strict=True))
    if s.cand_vals is not None:
        # [world, n, C] -> [n, world * C]: every rank's candidates side by side.
        names = [name for name in _CANDIDATE_FIELDS if name in every]
        joined = [every[name].transpose(0, 1).flatten(1) for name in names]
        merged = _merge_top(s.cand_vals.shape[1], [joined], by_index=_CANDIDATES_BY_INDEX)
        for name, value in zip(names, merged, strict=True):
            setattr(s, name, value)
    if win_key is not None:
        best = every["win_key"].argmax(0, keepdim=True)  # the first of equal keys
        for name in ("win_idx", "win_val", "win_raw"):
            if name in every:
                setattr(s, name, every[name].gather(0, best).squeeze(0))
    for name in ("lse", "raw_lse"):
        if name + "_max" in every:
            # [world, n]: centred on the largest maximum (0 where every rank's is -inf).
            row_max = every[name + "_max"].amax(0)
            centre = row_max.masked_fill(row_max == -math.inf, 0.0)
            shares = (every[name + "_max"] - centre) + every[name + "_log_sum"]
            setattr(s, name, RowStats(shares.logsumexp(0), None, None, None, max=row_max))
    for name in ("level_mass", "level_count", "moment_mass", "moment_sum"):
        if name in every:
            setattr(s, name, every[name].sum(0))
    if "row_max" in every:
        s.row_max = every["row_max"].amax(0)


# A pass's candidates (values, indices, payload), in ``_merge_top``'s order.
_CANDIDATE_FIELDS = ("cand_vals", "cand_idx", "cand_raw")
# The fields of a pass that ``_merge_ranks`` combines.
_MERGED = (
    *_CANDIDATE_FIELDS,
    "win_idx",
    "win_val",
    "win_raw",
    "lse",
    "raw_lse",
    "level_mass",
    "level_count",
    "row_max",
    "moment_mass",
    "moment_sum",
)


def _merge_candidates(s: _Scan, r0, r1, v0, x: Tensor, y: Tensor, raw: bool, divisor: float):
    """Fold the block's top-C of ``y / divisor`` into the running top-C of rows ``[r0, r1)``."""
    size = s.cand_vals.shape[1]
    block_vals, block_cols = y.topk(min(size, y.shape[1]), dim=1)
    if divisor != 1.0:
        block_vals.div_(divisor)
    running = [s.cand_vals[r0:r1], s.cand_idx[r0:r1]]
    block = [block_vals, block_cols + v0]
    if raw:
        running.append(s.cand_raw[r0:r1])
        block.append(x.gather(1, block_cols))
    merged = _merge_top(size, [running, block], by_index=_CANDIDATES_BY_INDEX)
    for kept, new in zip(running, merged, strict=True):
        kept.copy_(new)


def _sample_filtered(
    problem: _Problem, top_k: int, top_p: float, min_p: float | None, cutoffs: dict
) -> _Scan:
    """Draw with at least one of top-k, top-p, min-p, the cut-offs on: thresholds, then a
    Gumbel-max draw."""
    return _draw(problem, *_thresholds(problem, top_k, top_p, min_p, cutoffs))


def _thresholds(
    problem: _Problem, top_k: int, top_p: float, min_p: float | None, cutoffs: dict
) -> tuple[_Scan, Tensor, Tensor]:
    """The first pass (candidates) and each row's kept set with at least one of top-k, top-p,
    min-p, the cut-offs (``{"epsilon_cutoff": e, "eta_cutoff": eta}``, either or none) on:
    ``(first, tau, tau_index)``: keep ``y > tau``, and ``y == tau`` up to index ``tau_index``."""
    vocab = problem.vocab
    size = min(vocab, top_k + _TOPK_MARGIN if top_k else _CANDIDATES)
    first = _scan(
        problem,
        candidates=size,
        lse=top_p < 1.0 and not top_k,
        raw_lse=problem.want_raw,
        checked=True,
    )
    vals = first.cand_vals
    row_max = vals[:, 0]
    every_tie = torch.full_like(first.cand_idx[:, 0], vocab - 1)
    tau, tau_index = torch.full_like(row_max, -math.inf), every_tie
    if top_k:
        tau = vals[:, min(top_k, vocab) - 1]
    if top_p < 1.0:
        # The crossing token lies in top-k's set, so top-p's threshold is never below top-k's.
        tau, tau_index = _nucleus_threshold(problem, first, tau, top_p, bool(top_k))
    if min_p is not None:
        min_p_tau = row_max + (math.log(min_p) if min_p > 0 else -math.inf)
        tau_index = torch.where(min_p_tau > tau, every_tie, tau_index)
        tau = torch.maximum(tau, min_p_tau)
    for name, cutoff in cutoffs.items():  # epsilon before eta, as generate() orders them
        # The kept tokens' log-sum-exp and entropy: a pass, offset by the row maximum.
        s = _scan(problem, floor=tau, floor_index=tau_index, moments=True, ref=row_max)
        log_mass = s.moment_mass.log()
        level = torch.full_like(row_max, math.log(cutoff))
        if name == "eta_cutoff":
            entropy = log_mass - s.moment_sum / s.moment_mass
            level = torch.minimum(level, 0.5 * math.log(cutoff) - entropy)
        # Keep p = exp(y - lse) >= cutoff, and the most probable token whatever its p.
        level = torch.minimum(row_max + log_mass + level, row_max)
        tau_index = torch.where(level > tau, every_tie, tau_index)
        tau = torch.maximum(tau, level)
    return first, tau, tau_index


def _nucleus_threshold(
    problem: _Problem, first: _Scan, base: Tensor, top_p: float, top_k: bool
) -> tuple[Tensor, Tensor]:
    """Per row, top-p's threshold ``(value, index)`` among the tokens ``y >= base`` (top-k's
    set; all tokens when ``base`` is -inf): keep ``y > value``, and ``y == value`` up to ``index``.
    """
    vals, idx = first.cand_vals, first.cand_idx
    every = vals.shape[1] == problem.vocab
    in_set = vals >= base[:, None]
    # The candidates hold a threshold's tokens when the smallest of them lies below it.
    complete = torch.ones_like(in_set[:, 0]) if every else vals[:, -1] < base
    log_total = vals.masked_fill(~in_set, -math.inf).logsumexp(1) if top_k else first.lse.lse
    probs = (vals - log_total[:, None]).exp().masked_fill(~in_set, 0.0)
    inclusive = probs.cumsum(1)
    # HF drops a token when the mass of the tokens above it already reaches top_p.
    count = (((inclusive - probs) < top_p) & in_set).sum(1).clamp(min=1)
    value = vals.gather(1, (count - 1)[:, None]).squeeze(1)
    above = (probs * (vals > value[:, None])).sum(1)
    keep = _tied_kept(above, (value - log_total).exp(), top_p, problem.vocab)
    held = complete | (vals[:, -1] < value)
    # Without top-k the normaliser is exact, so reaching top_p within the candidates suffices.
    resolved = complete if top_k else complete | (inclusive[:, -1] >= top_p)
    if bool(resolved.all()):
        return value, _tie_index(problem, vals, idx, value, keep, held)
    found = _search_crossing(problem, base, vals[:, 0], top_p, searching=~resolved)
    # Rows of the other group count as held: no pass over the vocabulary for them.
    index = _tie_index(problem, vals, idx, value, keep, held | ~resolved)
    found_index = _tie_index(
        problem, found.vals, found.idx, found.value, found.keep, found.held | resolved
    )
    return torch.where(resolved, value, found.value), torch.where(resolved, index, found_index)


def _tied_kept(above: Tensor, tie_prob: Tensor, target, vocab: int) -> Tensor:
    """How many tokens tied at the crossing value HF keeps: the j-th of them (j = 0, 1, ...) while
    the mass before it, ``above + j * tie_prob``, is below ``target``. A ratio within a few
    roundings of an integer ``n`` is ``n``: the n-th tied token's mass before it equals ``target``
    exactly (a uniform row, ``top_p * V`` an integer), which drops it, as HF does; fp32 rounding
    (0.3 / exp(-log 10) = 3.0000002) would keep it."""
    ratio = (target - above) / tie_prob
    slack = 4 * torch.finfo(ratio.dtype).eps * ratio.abs()
    count = torch.ceil(ratio - slack).nan_to_num_(nan=vocab)
    return count.clamp_(1, vocab).long()


def _tie_index(problem, vals, idx, value, keep, held) -> Tensor:
    """The index threshold for the tokens tied at ``value``: HF keeps ``keep`` of them, which
    ones depends on ``torch.sort``'s unstable order; we keep those of smallest vocabulary index.
    Found among the candidates ``vals``/``idx`` where they hold every tied token (``held``), by a
    pass over the vocabulary for the other rows."""
    vocab = problem.vocab
    tied = vals == value[:, None]
    ordered = idx.masked_fill(~tied, vocab).sort(1).values
    n_tied = tied.sum(1)
    index = ordered.gather(1, (torch.minimum(keep, n_tied) - 1).clamp(min=0)[:, None]).squeeze(1)
    index = torch.where(keep >= n_tied, vocab - 1, index)
    if not bool(held.all()):
        index = torch.where(held, index, _nth_tied(problem, value, keep))
    return index


def _nth_tied(problem: _Problem, value: Tensor, keep: Tensor) -> Tensor:
    """Per row, the index of the ``keep``-th token (in index order) with ``y == value``,
    ``V - 1`` if there are fewer. Over a process group, a first pass counts each rank's tied
    tokens; a second finds on each rank its share of the count (the ``keep``-th token lies on
    the rank where the ranks' running count reaches ``keep``)."""
    s = _scan(problem, nth_tied=(value, keep))
    vocab_slice = problem.vocab_slice
    if vocab_slice is None:
        return s.tied_index
    (counts,) = vocab_slice.gather([s.tied_count])  # [world, n]
    before = counts.cumsum(0) - counts
    local = _scan(problem, nth_tied=(value, keep - before[vocab_slice.rank])).tied_index
    (found,) = vocab_slice.gather([local])
    holder = (before < keep) & (keep <= before + counts)  # at most one rank per row
    return torch.where(holder.any(0), (found * holder).sum(0), problem.vocab - 1)


def _levels(lo: Tensor, hi: Tensor) -> Tensor:
    """``[n, _LEVELS]`` increasing thresholds spread over ``[lo, hi)``, the first ``lo``."""
    step = (hi - lo) / _LEVELS
    up = torch.full_like(lo, math.inf)
    levels = [lo]
    for i in range(1, _LEVELS):
        levels.append(torch.maximum(lo + step * i, torch.nextafter(levels[-1], up)))
    return torch.stack(levels, 1)


class _Crossing(NamedTuple):
    """top-p's crossing value per row, how many tokens tied at it HF keeps, and candidates that
    hold every token tied at it where ``held``."""

    value: Tensor
    keep: Tensor
    held: Tensor
    vals: Tensor
    idx: Tensor


def _search_crossing(
    problem: _Problem, base: Tensor, row_max: Tensor, top_p: float, searching: Tensor
) -> _Crossing:
    """top-p's crossing for the rows ``searching`` whose candidates do not hold the nucleus (the
    passes compute every row; the others' results are meaningless).

    With ``G(t)`` the probability mass of the tokens ``y >= max(t, base)``, the crossing value is
    the largest token value ``t`` with ``G(t) >= top_p * G(base)``. Bisection keeps an interval
    ``[lo, hi)`` holding it (``G(lo)`` reaches the target, ``G(hi)`` does not); each pass measures
    ``G`` at ``_LEVELS`` levels and narrows the interval to one step, until the interval holds at
    most ``_CANDIDATES`` tokens (a last pass collects and sorts them) or a single value.
    """
    up = torch.full_like(row_max, math.inf)
    lo = torch.maximum(base, row_max - _NEGLIGIBLE)
    hi = torch.nextafter(row_max, up)
    mass_hi = torch.zeros_like(row_max)  # G(hi), relative to exp(row_max)
    count_hi = torch.zeros_like(row_max, dtype=torch.long)
    target = None
    searching = searching.clone()
    while bool(searching.any()):
        levels = _levels(lo, hi)
        s = _scan(problem, levels=levels, ref=row_max)
        mass, count = s.level_mass, s.level_count
        if target is None:  # G(lo) is the set's total mass
            target = top_p * mass[:, 0]
        i = ((mass >= target[:, None]).sum(1) - 1).clamp(min=0)[:, None]
        above = (i + 1).clamp(max=_LEVELS - 1)
        narrowed = searching[:, None] & (i < _LEVELS - 1)
        new_lo = levels.gather(1, i).squeeze(1)
        count_lo = count.gather(1, i).squeeze(1)
        hi = torch.where(narrowed, levels.gather(1, above), hi[:, None]).squeeze(1)
        mass_hi = torch.where(narrowed, mass.gather(1, above), mass_hi[:, None]).squeeze(1)
        count_hi = torch.where(narrowed, count.gather(1, above), count_hi[:, None]).squeeze(1)
        lo = torch.where(searching, new_lo, lo)
        single = torch.nextafter(lo, up) >= hi
        searching &= ~single & (count_lo - count_hi > _CANDIDATES)
    # The last interval either holds few tokens, collected and sorted here, or a single value,
    # the crossing value, with G(hi) the mass above it.
    size = min(_CANDIDATES, problem.vocab)
    s = _scan(problem, candidates=size, floor=lo, ceiling=hi)
    probs = (s.cand_vals - row_max[:, None]).exp()
    inclusive = mass_hi[:, None] + probs.cumsum(1)
    collected = (s.cand_vals > -math.inf).sum(1)
    j = torch.minimum((inclusive < target[:, None]).sum(1), collected - 1).clamp(min=0)
    single = torch.nextafter(lo, up) >= hi
    value = torch.where(single, lo, s.cand_vals.gather(1, j[:, None]).squeeze(1))
    above = mass_hi + (probs * (s.cand_vals > value[:, None])).sum(1)
    keep = _tied_kept(above, (value - row_max).exp(), target, problem.vocab)
    return _Crossing(value, keep, ~single, s.cand_vals, s.cand_idx)


def _draw(problem: _Problem, first: _Scan, tau: Tensor, tau_index: Tensor) -> _Scan:
    """Gumbel-max draw among the kept tokens (``y > tau``, or ``y == tau`` with index up to
    ``tau_index``): from the candidates where they hold every such token, by a masked pass over
    the vocabulary where they may not."""
    vals, idx = first.cand_vals, first.cand_idx
    kept = (vals > tau[:, None]) | ((vals == tau[:, None]) & (idx <= tau_index[:, None]))
    rows = torch.arange(vals.shape[0], device=vals.device)
    keys = _gumbel(problem.key, rows[:, None], idx).add_(vals).masked_fill_(~kept, -math.inf)
    # The largest key, the lowest vocabulary index among equal keys (as a pass would pick).
    best = keys.amax(1, keepdim=True)
    col = idx.masked_fill(keys != best, problem.vocab).argmin(1, keepdim=True)
    pick = _Scan(
        win_idx=idx.gather(1, col).squeeze(1),
        win_val=vals.gather(1, col).squeeze(1),
        win_raw=first.cand_raw.gather(1, col).squeeze(1) if problem.want_raw else None,
        lse=_exact_log_sum(vals.masked_fill(~kept, -math.inf)),
        raw_lse=first.raw_lse,
    )
    if vals.shape[1] == problem.vocab:
        return pick
    spill = vals[:, -1] >= tau
    if bool(spill.any()):
        s = _scan(problem, winner=True, noisy=True, floor=tau, floor_index=tau_index, lse=True)
        pick.win_idx = torch.where(spill, s.win_idx, pick.win_idx)
        pick.win_val = torch.where(spill, s.win_val, pick.win_val)
        pick.lse = RowStats(
            torch.where(spill, s.lse.log_sum, pick.lse.log_sum), None, None, None,
            max=torch.where(spill, s.lse.max, pick.lse.max),
        )  # fmt: skip
        if problem.want_raw:
            pick.win_raw = torch.where(spill, s.win_raw, pick.win_raw)
    return pick


@torch.no_grad()
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
    process_group: ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Per row, the ``count`` largest log-probs of the model's next-token distribution and their
    tokens: what one step of beam search needs of each beam, from one pass over the vocabulary.
    With ``logit_bias``, the largest biased log-probs, as ``generate()``'s processors bias them.

    Naive equivalent (``reference.beam_candidates``; what ``generate(num_beams=...)`` computes
    per beam before ranking the beams' continuations)::

        logits = reference.model_logits(hidden_last, weight, bias=bias, softcap=softcap,
                                        logit_scale=logit_scale).float()
        scores = logits.log_softmax(-1) + dense(logit_bias)  # or dense(logit_bias) only
        scores.topk(count)

    Tokens tied in value are ordered by vocabulary index (``torch.topk`` leaves their order
    unspecified), also at the ``count``-th place: of tokens tied there, those of smallest index
    are returned.

    Args:
        hidden_last: ``[B, D]`` last hidden state of each sequence (model dtype).
        weight: ``[V, D]`` output embedding; bias: ``[V]`` or None.
        count: how many tokens per row, ``1 <= count <= V``.
        softcap, logit_scale, shards, logit_bias, logit_bias_only, process_group: as in
            ``sample_next`` (the bias is added to the log-probs, after ``log_softmax``, as beam
            search applies ``generate()``'s processors).

    Returns:
        ``(logprobs, tokens)``, ``[B, count]`` fp32 in descending order and int64.
    """
    with checked_on_every_rank(process_group) as ranks:
        check_head(hidden_last, weight, bias)
        if hidden_last.dim() != 2 or hidden_last.shape[0] == 0:
            raise ValueError(
                f"hidden_last: expected shape [B, D] with B >= 1, got {tuple(hidden_last.shape)}"
            )
        transform = make_transform(softcap, logit_scale)
        plan_blocks(1, weight.shape[0], weight.dtype, weight.device, shards=shards)
        vocab_slice = ranks.agree(hidden_last.detach(), weight, bias, transform)
        vocab = ranks.vocab
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= vocab:
            raise ValueError(f"count: expected an int in [1, {vocab}], got {count!r}")
        token_bias = _token_bias(logit_bias, logit_bias_only, hidden_last)
    problem = _Problem(
        hidden=hidden_last,
        weight=weight,
        bias=bias,
        transform=transform,
        penalty=1.0,
        temperature=1.0,
        prev_tokens=None,
        key=None,
        shards=shards,
        chunk_size=None,
        want_raw=token_bias is not None,
        vocab_slice=vocab_slice,
        logit_bias=token_bias,
        logit_bias_only=logit_bias_only,
    )
    # Candidates beyond ``count`` hold the tokens tied at the count-th value; more are collected
    # in the rare case that they do not (the smallest candidate still equals that value), unless
    # that value is -inf (tokens a bias masks: generate() returns any of them).
    size = min(vocab, count + _TOPK_MARGIN)
    while True:
        s = _scan(problem, candidates=size, raw_lse=True, checked=True)
        last = s.cand_vals[:, count - 1]
        if size == vocab or bool(((s.cand_vals[:, -1] < last) | (last == -math.inf)).all()):
            break
        size = min(vocab, 4 * size)
    # Ranked on the logits (a shift by the log-sum-exp keeps their order); with a bias, on
    # generate()'s rounding: log_softmax, then the bias.
    scores = s.cand_vals
    if token_bias is not None:
        scores = _listed_bias(token_bias, s.cand_idx, logit_bias_only)
        if not logit_bias_only:
            scores = s.raw_lse.log_softmax_at(s.cand_raw) + scores
    top, tokens = _merge_top(count, [(scores, s.cand_idx)])
    return top if token_bias is not None else s.raw_lse.log_softmax_at(top), tokens


def _listed_bias(bias: tuple[Tensor, Tensor], tokens: Tensor, only: bool) -> Tensor:
    """``[n, C]``: the (summed) bias of each of ``tokens`` ``[n, C]``; 0 for the tokens not
    listed, -inf when ``only`` (``_bias_block``'s rule)."""
    listed, values = bias
    match = tokens[:, :, None] == listed[:, None, :]  # [n, C, K]
    summed = torch.where(match, values[:, None, :], 0.0).sum(2)
    return summed.masked_fill(~match.any(2), -math.inf) if only else summed
