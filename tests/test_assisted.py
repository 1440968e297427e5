"""Assisted decoding (assistant_model=, prompt_lookup_num_tokens=) against model.generate, and
speculative sampling against the target's exact distribution from its full logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

import chunklogits as cl
from chunklogits import assisted, reference
from tests.helpers import chi_square_pvalue, one_thread, seeded, tiny_llama_config
from tests.test_generate import PAD, VOCAB, _model

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

MIN_PVALUE = 1e-3
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)


def _draft(target, kind: str):
    """``"perturbed"``: the target with noise on every weight (it agrees with the target on
    most tokens, not all); ``"smaller"``: a one-layer Llama of another hidden size."""
    seeded(3)
    if kind == "smaller":
        config = tiny_llama_config(VOCAB, layers=1, hidden=16, **SPECIAL)
        return LlamaForCausalLM(config).eval()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * parameter.std().nan_to_num(0) * 0.3)
    return draft


def _prompt(length: int = 7, repeats: int = 1):
    """``[1, length * repeats]``: a random segment, repeated (prompt lookup finds it again)."""
    return torch.randint(3, VOCAB, (1, length), generator=seeded(1)).repeat(1, repeats)


class _Rounds:
    """Records each round's (tokens kept, drafts) of a drafter class while alive."""

    def __init__(self, monkeypatch, drafter):
        self.seen = []
        update = drafter.update

        def spy(this, kept, count):
            self.seen.append((kept, count))
            return update(this, kept, count)

        monkeypatch.setattr(drafter, "update", spy)

    def assert_drafts_were_kept_and_rejected(self):
        assert any(kept > 0 for kept, _ in self.seen), self.seen
        assert any(kept < count for kept, count in self.seen), self.seen


def _greedy_eos(model, ids, steps: int, **options) -> int:
    """The first token greedy decoding produces at step ``steps`` or later and not before: as
    eos it ends decoding there."""
    new = model.generate(ids, do_sample=False, max_new_tokens=steps + 8, **options)
    new = new[0, ids.shape[1] :].tolist()
    return next(token for i, token in enumerate(new) if i >= steps and token not in new[:i])


# (family, draft, repetition_penalty): the tiny GPT-2 repeats one token without a penalty.
GREEDY = [
    ("llama", "smaller", 1.0),
    ("llama", "perturbed", 1.5),
    ("gemma2", "perturbed", 1.0),
    ("gpt2", "perturbed", 1.5),
    ("llama-bf16", "perturbed", 1.0),
]


@pytest.mark.parametrize(("family", "kind", "penalty"), GREEDY)
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_greedy_assisted_decoding_is_token_identical_to_generate(
    family, kind, penalty, wrapped, monkeypatch
):
    target = _model(family.removesuffix("-bf16"))
    if family.endswith("-bf16"):
        target = target.to(torch.bfloat16)
    draft = _draft(target, kind)
    ids = _prompt()
    rounds = _Rounds(monkeypatch, assisted._AssistantDrafts)
    options = dict(max_new_tokens=20, do_sample=False, repetition_penalty=penalty)
    with torch.no_grad():
        eos = _greedy_eos(target, ids, steps=14, repetition_penalty=penalty)
        options |= dict(eos_token_id=eos, pad_token_id=PAD)
        expected = target.generate(ids, assistant_model=copy.deepcopy(draft), **options)
        if wrapped:
            target, draft = cl.ChunkedLMHead.wrap(target), cl.ChunkedLMHead.wrap(draft)
        ours = cl.sample(target, ids, assistant_model=draft, shards=3, **options)
    assert torch.equal(ours, expected)
    assert ours[0, -1] == eos and ours.shape[1] < ids.shape[1] + 20  # it ended on the eos
    if kind == "perturbed":
        rounds.assert_drafts_were_kept_and_rejected()


@pytest.mark.parametrize(
    ("family", "penalty"), [("llama", 1.0), ("llama", 1.3), ("gemma2", 1.0), ("gpt2", 1.3)]
)
def test_greedy_prompt_lookup_is_token_identical_to_generate(family, penalty, monkeypatch):
    target = _model(family)
    ids = _prompt(repeats=3)
    rounds = _Rounds(monkeypatch, assisted._PromptLookupDrafts)
    options = dict(max_new_tokens=24, do_sample=False, repetition_penalty=penalty)
    with torch.no_grad():
        eos = _greedy_eos(target, ids, steps=12, repetition_penalty=penalty)
        options |= dict(eos_token_id=eos, pad_token_id=PAD)
        expected = target.generate(ids, prompt_lookup_num_tokens=4, **options)
        ours = cl.sample(target, ids, prompt_lookup_num_tokens=4, **options)
    assert torch.equal(ours, expected)
    assert ours[0, -1] == eos
    assert any(count > 0 for _, count in rounds.seen)  # the lookup did propose drafts


def _masking_options(new: list[int], eos: int) -> dict:
    """Options of generate()'s processors that mask or bias a few tokens, each chosen from the
    plain greedy continuation ``new`` (which greedy decoding ends with ``eos``) so that it
    changes what greedy decoding produces."""
    return {
        "min_new_tokens": dict(min_new_tokens=len(new) + 3),
        # The bias would repeat new[0] at every step: the ban lets the bigram occur once.
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2, sequence_bias={(new[0],): 30.0}),
        "bad_words_ids": dict(bad_words_ids=[[new[0]], [new[2], new[3]], [eos]]),
        "suppress_tokens": dict(suppress_tokens=[new[1], new[4]]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[new[0]]),
        "sequence_bias": dict(sequence_bias={(new[0],): -4.0, (new[1], new[2]): -3.5, (17,): 2.5}),
        "together": dict(
            no_repeat_ngram_size=1,
            suppress_tokens=[new[1]],
            min_new_tokens=3,
            sequence_bias={(new[2],): 1.5},
        ),
    }


MASKING_CASES = list(_masking_options([0] * 5, 0))


@pytest.mark.parametrize("drafts", ["assistant", "prompt_lookup"])
@pytest.mark.parametrize("case", MASKING_CASES)
def test_greedy_assisted_decoding_with_token_processors_is_generate(case, drafts):
    """Each draft position is processed given the tokens before it (a draft may complete a
    banned n-gram, reach min_new_tokens, ...), as generate() processes the candidates."""
    target = _model("llama")
    ids = _prompt(repeats=3)
    if drafts == "assistant":
        arguments = dict(assistant_model=_draft(target, "perturbed"))
    else:
        arguments = dict(prompt_lookup_num_tokens=4)
    options = dict(max_new_tokens=16, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        eos = _greedy_eos(target, ids, steps=8)
        free = target.generate(ids, eos_token_id=eos, **options)
        new = free[0, ids.shape[1] :].tolist()
        options |= dict(eos_token_id=eos) | _masking_options(new, eos)[case]
        expected = target.generate(ids, **copy.deepcopy(arguments), **options)
        ours = cl.sample(target, ids, shards=3, **arguments, **options)
    assert torch.equal(ours, expected), (ours, expected)
    # The processor changed the continuation: the comparison says something.
    assert ours.shape != free.shape or not torch.equal(ours, free)


def test_prompt_lookup_sampling_with_top_k_1_is_greedy_decoding():
    target = _model("llama")
    ids = _prompt(repeats=3)
    with torch.no_grad():
        greedy = target.generate(ids, do_sample=False, max_new_tokens=12)
        drawn = cl.sample(target, ids, prompt_lookup_num_tokens=3, top_k=1, max_new_tokens=12)
    assert torch.equal(drawn, greedy)


@pytest.mark.parametrize("schedule", ["heuristic", "constant"])
def test_the_number_of_drafts_follows_the_assistants_generation_config(schedule):
    # The count left on the assistant's generation_config after a "heuristic" call is the
    # outcome of every round's (kept, drafted): it matches generate()'s only if each round
    # drafted and kept what generate()'s did (count, eos, confidence threshold stops).
    target = _model("llama")
    draft = _draft(target, "perturbed")
    draft.generation_config.num_assistant_tokens = 3
    draft.generation_config.num_assistant_tokens_schedule = schedule
    theirs = copy.deepcopy(draft)
    ids = _prompt()
    with torch.no_grad():
        expected = target.generate(ids, assistant_model=theirs, do_sample=False, max_new_tokens=30)
        ours = cl.sample(target, ids, assistant_model=draft, do_sample=False, max_new_tokens=30)
    assert torch.equal(ours, expected)
    counts = (draft.generation_config.num_assistant_tokens, 3 if schedule == "constant" else None)
    assert counts[0] == theirs.generation_config.num_assistant_tokens
    assert counts[1] in (None, counts[0])
    if schedule == "heuristic":
        assert counts[0] != 3  # it did adapt


def _speculative_pair(dtype: torch.dtype):
    """A target and a smaller draft over 64 tokens, heads scaled so that both distributions are
    peaked and differ: drafts are often kept and often rejected."""
    seeded(0)
    vocab = 64
    target = LlamaForCausalLM(tiny_llama_config(vocab, layers=2, hidden=32, **SPECIAL))
    draft = LlamaForCausalLM(tiny_llama_config(vocab, layers=1, hidden=16, **SPECIAL))
    with torch.no_grad():
        target.lm_head.weight.mul_(15)
        draft.lm_head.weight.mul_(15)
    draft.generation_config.assistant_confidence_threshold = 0  # draft up to the budget
    target.generation_config.eos_token_id = None  # every run draws both tokens
    return target.to(dtype).eval(), draft.to(dtype).eval()


def _exact_first_two(target, ids, process) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's processed distribution of the first generated token ``[V]`` and the joint
    distribution of the first two ``[V * V]`` (pair ``(a, b)`` at ``a * V + b``), from its full
    logits: ``process(sequences, logits)`` gives the scores."""
    vocab = target.config.vocab_size
    raw = target(ids).logits[:, -1].float()
    first = process(ids, raw).softmax(-1)[0]
    after = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
    raw = target(after).logits[:, -1].float()
    second = process(after, raw).softmax(-1)
    return first, (first[:, None] * second).flatten()


def _warpers(options: dict):
    """``reference.next_token_scores`` with ``options``, as ``_exact_first_two``'s ``process``."""
    return lambda sequences, raw: reference.next_token_scores(raw, prev_tokens=sequences, **options)


# (dtype, warpers, CPU block GEMM dtype: the model's or fp32, both paths set_cpu_gemm_dtype picks)
SPECULATIVE = [
    (torch.float32, dict(temperature=0.9, top_k=0, top_p=0.95, repetition_penalty=1.2), "model"),
    (torch.bfloat16, dict(temperature=1.3, top_k=12, min_p=0.02), "model"),
    (torch.bfloat16, dict(temperature=1.3, top_k=12, min_p=0.02), "fp32"),
]


@pytest.mark.parametrize(
    ("dtype", "options", "cpu_gemm"),
    SPECULATIVE,
    ids=["fp32-top_p", "bf16-top_k-min_p-model-gemm", "bf16-top_k-min_p-fp32-gemm"],
    indirect=["cpu_gemm"],
)
def test_speculative_sampling_draws_the_targets_distribution(dtype, options, cpu_gemm, monkeypatch):
    target, draft = _speculative_pair(dtype)
    ids = torch.randint(3, 64, (1, 5), generator=seeded(1))
    with torch.no_grad():
        exact = _exact_first_two(target, ids, _warpers(options))
    _check_first_two_drawn(monkeypatch, target, draft, ids, options, exact)


def _check_first_two_drawn(monkeypatch, target, draft, ids, options: dict, exact) -> None:
    """1000 speculative draws of two tokens follow the ``exact`` distributions of the first token
    and of the pair (chi-square; no draw of probability 0), and both ways of ending a round (a
    draw from the residual, from ``p`` after every draft) ran often."""
    races = []
    race = assisted._race

    def spy(key, problem, p, row, draft_problem=None, q=None):
        races.append(draft_problem is not None)
        return race(key, problem, p, row, draft_problem, q)

    monkeypatch.setattr(assisted, "_race", spy)
    runs = 1000
    with torch.no_grad():
        drawn = torch.cat(
            [
                cl.sample(
                    target,
                    ids,
                    assistant_model=draft,
                    max_new_tokens=2,
                    do_sample=True,
                    seed=s,
                    **options,
                )
                for s in range(runs)
            ]
        )[:, ids.shape[1] :]
    # Both ways of ending a round ran: a draw from the residual and from p after all drafts.
    assert 0.1 * runs < sum(races) < len(races) - 0.1 * runs
    vocab = exact[0].shape[0]
    pairs = drawn[:, 0] * vocab + drawn[:, 1]
    for drawn_as, probs in zip((drawn[:, 0], pairs), exact, strict=True):
        counts = torch.bincount(drawn_as, minlength=probs.shape[0])
        assert counts[probs == 0].sum() == 0
        assert chi_square_pvalue(counts, probs) > MIN_PVALUE, probs.shape


# (dtype, warpers and cut-off, CPU block GEMM dtype), with the token masks and biases below.
MASKED = [
    (torch.float32, dict(temperature=1.2, top_k=0, epsilon_cutoff=0.02), "model"),
    (torch.bfloat16, dict(temperature=1.3, top_k=20, eta_cutoff=0.05), "model"),
    (torch.bfloat16, dict(temperature=1.3, top_k=20, eta_cutoff=0.05), "fp32"),
]


@pytest.mark.parametrize(
    ("dtype", "options", "cpu_gemm"),
    MASKED,
    ids=["fp32-epsilon-model-gemm", "bf16-eta-model-gemm", "bf16-eta-fp32-gemm"],
    indirect=["cpu_gemm"],
)
def test_speculative_sampling_with_token_processors_draws_the_targets_distribution(
    dtype, options, cpu_gemm, monkeypatch
):
    """Token masks and biases whose effect on the second token depends on the first (a banned
    bigram, no repeated token), eos masked by min_new_tokens, and a cut-off: both draws follow
    the distribution of HF's processors in generate()'s order."""
    from transformers.generation.logits_process import (
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoBadWordsLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        SequenceBiasLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    target, draft = _speculative_pair(dtype)
    ids = torch.randint(4, 64, (1, 5), generator=seeded(1))
    with torch.no_grad():
        likely = target(ids).logits[0, -1].float().topk(3).indices.tolist()
        # The draft's most probable first token and the target's most probable token after it:
        # their bigram is banned, on the row after an accepted draft as in the next round.
        drafted = int(draft(ids).logits[0, -1].argmax())
        after = torch.cat([ids, torch.tensor([[drafted]])], 1)
        follower = int(target(after).logits[0, -1].argmax())
    eos = 3
    masks = dict(
        no_repeat_ngram_size=1,
        bad_words_ids=[[likely[2]], [drafted, follower]],
        sequence_bias={(likely[1],): 1.5},
        min_new_tokens=2,
        eos_token_id=eos,
    )
    warpers = [TemperatureLogitsWarper(options["temperature"])]
    if options["top_k"]:
        warpers.append(TopKLogitsWarper(options["top_k"]))
    if "epsilon_cutoff" in options:
        warpers.append(EpsilonLogitsWarper(options["epsilon_cutoff"]))
    else:
        warpers.append(EtaLogitsWarper(options["eta_cutoff"]))
    processors = LogitsProcessorList(
        [
            SequenceBiasLogitsProcessor(masks["sequence_bias"]),
            NoRepeatNGramLogitsProcessor(1),
            NoBadWordsLogitsProcessor(masks["bad_words_ids"], eos),
            MinNewTokensLengthLogitsProcessor(ids.shape[1], 2, eos),
            *warpers,
        ]
    )
    with torch.no_grad():
        exact = _exact_first_two(target, ids, processors)
    _check_first_two_drawn(monkeypatch, target, draft, ids, options | masks, exact)


def test_seed_reproduces_speculative_sampling_whatever_the_shards():
    target, draft = _speculative_pair(torch.float32)
    ids = torch.randint(3, 64, (1, 5), generator=seeded(1))
    options = dict(assistant_model=draft, max_new_tokens=12, top_k=20, do_sample=True)
    with torch.no_grad():
        runs = [cl.sample(target, ids, seed=7, shards=s, **options) for s in (1, 3, 7)]
        generator = torch.Generator().manual_seed(7)
        from_generator = cl.sample(target, ids, generator=generator, **options)
        other = cl.sample(target, ids, seed=8, **options)
    assert all(torch.equal(run, runs[0]) for run in [*runs[1:], from_generator])
    assert not torch.equal(runs[0], other)


def test_the_streamer_receives_the_tokens_as_they_are_kept():
    class Recorder(BaseStreamer):
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.reshape(-1))

        def end(self):
            self.ended = True

    target = _model("llama")
    recorder = Recorder()
    with torch.no_grad():
        out = cl.sample(
            target,
            _prompt(),
            assistant_model=_draft(target, "perturbed"),
            do_sample=False,
            max_new_tokens=10,
            streamer=recorder,
        )
    assert recorder.ended and torch.equal(torch.cat(recorder.parts), out[0])


BAD = [
    (dict(input_ids=_prompt().repeat(2, 1)), "input_ids: assisted decoding .* batch size 1, got 2"),
    (dict(num_return_sequences=2, do_sample=True), "num_return_sequences: assisted decoding"),
    (dict(return_logprobs=True), "return_logprobs: not available with assisted decoding"),
    (dict(assistant_tokenizer=object()), "assistant_tokenizer: .*universal assisted decoding"),
    (dict(forced_eos_token_id=5), "forced_eos_token_id: .*replaces a whole row"),
    (dict(forced_bos_token_id=5, do_sample=True), "forced_bos_token_id: .*replaces a whole row"),
    (dict(typical_p=0.9, do_sample=True), "typical_p: .*needs each step's whole row"),
    (dict(assistant_early_exit=1), "assistant_early_exit: .* early layer"),
    (dict(assistant_ensemble_weight=0.5), "assistant_ensemble_weight: .*ensemble verification"),
    (dict(use_cache=False), "use_cache: assisted decoding needs the model's KV cache"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD)
def test_what_is_not_reproduced_is_refused_by_name(kwargs, match):
    target = _model("llama")
    draft = _draft(target, "smaller")
    arguments = dict(input_ids=_prompt(), max_new_tokens=4, assistant_model=draft)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        cl.sample(target, **(arguments | kwargs))


def test_an_assistant_it_cannot_follow_is_refused_by_name(monkeypatch):
    target = _model("llama")
    ids = _prompt()
    other_vocabulary = LlamaForCausalLM(tiny_llama_config(VOCAB + 1, **SPECIAL)).eval()
    schedule = _draft(target, "smaller")
    schedule.generation_config.num_assistant_tokens_schedule = "sometimes"
    adaptive = _draft(target, "smaller")  # default assistant_confidence_threshold: 0.4
    monkeypatch.setattr(
        "transformers.generation.candidate_generator.is_sklearn_available", lambda: True
    )
    for draft, match in (
        (other_vocabulary, "assistant_model: expected a head over the target's 500 tokens"),
        (schedule, "num_assistant_tokens_schedule: expected one of"),
        (adaptive, "assistant_confidence_threshold: with scikit-learn installed"),
    ):
        with pytest.raises(ValueError, match=match), torch.no_grad():
            cl.sample(target, ids, assistant_model=draft, max_new_tokens=4)
