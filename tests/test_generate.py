"""sample(model, ...) against model.generate on random transformers models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from chunklogits import reference, sequence_logprobs
from chunklogits.generate import decode, sample
from tests.helpers import chi_square_pvalue, one_thread, seeded

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

VOCAB = 500
PAD = 0
MIN_PVALUE = 1e-3


def _model(family: str):
    seeded(0)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**small, **heads, **special))
    elif family == "gemma2":  # final_logit_softcapping and sliding-window layers
        config = Gemma2Config(
            **small, **heads, **special, head_dim=8, final_logit_softcapping=3.0, sliding_window=4
        )
        model = Gemma2ForCausalLM(config)
    elif family == "cohere":  # logits * logit_scale
        model = CohereForCausalLM(CohereConfig(**small, **heads, **special, logit_scale=0.3))
    elif family == "granite":  # logits / logits_scaling
        model = GraniteForCausalLM(GraniteConfig(**small, **heads, **special, logits_scaling=4.0))
    else:
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, **special)
        )
    return model.eval()


FAMILIES = ["llama", "gemma2", "gpt2"]
SCALED_HEADS = ["cohere", "granite"]


def _prompts(rows: int = 3, length: int = 7):
    """Left-padded prompts: row i has i padding tokens."""
    g = seeded(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(rows):
        ids[row, :row], mask[row, :row] = PAD, 0
    return ids, mask


def _eos_that_stops_early(model, ids, mask, steps: int):
    """Two tokens greedy decoding produces mid-way in rows 1 and 2: as eos ids they end those
    rows at different steps."""
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=steps)
    new = greedy[:, ids.shape[1] :]
    return [int(new[1, 2]), int(new[2, 4])]


@pytest.mark.parametrize("family", FAMILIES + SCALED_HEADS)
def test_greedy_is_token_identical_to_generate(family):
    model = _model(family)
    ids, mask = _prompts()
    eos = _eos_that_stops_early(model, ids, mask, steps=10)
    options = dict(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    with torch.no_grad():
        expected = reference.sample(model, ids, mask, return_logprobs=True, **options)
        ours = sample(model, ids, mask, return_logprobs=True, shards=3, **options)
    assert torch.equal(ours.sequences, expected.sequences)
    assert (expected.sequences[:, -1] == PAD).sum() >= 1  # a row did end early on an eos
    torch.testing.assert_close(ours.logprobs, expected.logprobs, rtol=0, atol=2e-5)
    torch.testing.assert_close(ours.raw_logprobs, expected.raw_logprobs, rtol=0, atol=2e-5)


def test_greedy_with_repetition_penalty_and_custom_generate_route():
    model = _model("llama")
    ids, mask = _prompts()
    options = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.5)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **options)
        assert torch.equal(sample(model, ids, mask, **options), expected)
        routed = model.generate(ids, attention_mask=mask, custom_generate=decode, **options)
    assert torch.equal(routed, expected)


def test_generation_config_is_honoured():
    model = _model("llama")
    ids, mask = _prompts()
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
        # top_k = 1 leaves the most probable token only: sampling reproduces greedy decoding.
        model.generation_config.do_sample = True
        model.generation_config.top_k = 1
        model.generation_config.max_new_tokens = 6
        drawn = sample(model, ids, mask, seed=0)
    assert torch.equal(drawn, greedy)


def test_do_sample_left_unset_follows_the_generation_config_as_in_generate():
    model = _model("llama")
    ids, mask = _prompts()
    options = dict(max_new_tokens=6, pad_token_id=PAD)
    assert not model.generation_config.do_sample  # generate() decodes greedily
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=mask, **options)
        assert torch.equal(sample(model, ids, mask, seed=0, **options), greedy)
        assert torch.equal(
            greedy, model.generate(ids, attention_mask=mask, do_sample=False, **options)
        )
        # num_beams alone: generate()'s beam search, not beam sampling
        beams = model.generate(ids, attention_mask=mask, num_beams=3, **options)
        assert torch.equal(sample(model, ids, mask, num_beams=3, **options), beams)
        model.generation_config.do_sample = True
        drawn = sample(model, ids, mask, seed=0, **options)
        explicit = sample(model, ids, mask, do_sample=True, seed=0, **options)
        # and do_sample=False overrides the config, as in generate()
        assert torch.equal(sample(model, ids, mask, do_sample=False, **options), greedy)
    assert torch.equal(drawn, explicit)
    assert not torch.equal(drawn, greedy)  # a random model's tokens: drawn, not the argmax


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_distribution_matches_generate(family):
    model = _model(family)
    rows = 3000
    ids = torch.randint(3, VOCAB, (1, 5), generator=seeded(2))
    options = dict(temperature=0.3, top_k=0, top_p=0.9, repetition_penalty=1.3)
    with torch.no_grad():
        raw = model(ids).logits[:, -1].float()
        drawn = sample(
            model, ids.expand(rows, -1), max_new_tokens=1, do_sample=True, seed=5, **options
        )
    probs = reference.next_token_scores(raw, prev_tokens=ids, **options).softmax(-1)[0]
    counts = torch.bincount(drawn[:, -1], minlength=VOCAB)
    assert counts[probs == 0].sum() == 0
    assert chi_square_pvalue(counts, probs) > MIN_PVALUE


def test_sampled_logprobs_match_teacher_forced_hf_scores():
    model = _model("gemma2")
    ids, mask = _prompts()
    options = dict(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2)
    with torch.no_grad():
        out = sample(
            model,
            ids,
            mask,
            max_new_tokens=6,
            do_sample=True,
            seed=3,
            return_logprobs=True,
            **options,
        )
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1] :])], 1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(out.sequences, attention_mask=full_mask, position_ids=positions).logits
    prompt = ids.masked_fill(mask == 0, -1)  # generate() does not penalise the left padding
    for step in range(6):
        at = ids.shape[1] + step
        raw = logits[:, at - 1].float()
        prev = torch.cat([prompt, out.sequences[:, ids.shape[1] : at]], 1)
        scores = reference.next_token_scores(raw, prev_tokens=prev, **options)
        token = out.sequences[:, at, None]
        expected = scores.log_softmax(-1).gather(1, token).squeeze(1)
        expected_raw = raw.log_softmax(-1).gather(1, token).squeeze(1)
        torch.testing.assert_close(out.logprobs[:, step], expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(out.raw_logprobs[:, step], expected_raw, rtol=0, atol=1e-4)


def test_seed_reproduces_whatever_the_shards():
    model = _model("llama")
    ids, mask = _prompts()
    with torch.no_grad():
        options = dict(max_new_tokens=8, do_sample=True)
        runs = [sample(model, ids, mask, seed=7, shards=s, **options) for s in (1, 4, 16)]
        other = sample(model, ids, mask, seed=8, **options)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], other)


BAD = [
    (
        dict(input_ids=torch.zeros(2, 0, dtype=torch.long)),
        ValueError,
        "input_ids: expected a non-empty",
    ),
    (
        dict(input_ids=torch.zeros(0, 3, dtype=torch.long)),
        ValueError,
        "input_ids: expected a non-empty",
    ),
    (dict(input_ids=torch.zeros(2, 3)), TypeError, "input_ids: expected an integer tensor"),
    (
        dict(attention_mask=torch.ones(3, 6)),
        ValueError,
        "attention_mask: expected input_ids' shape",
    ),
    (dict(top_p=0.0), ValueError, "top_p: expected a float in \\(0.0, 1.0\\]"),
    (dict(top_p=1.2), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k: expected an int >= 0"),
    (dict(temperature=0.0, do_sample=True), ValueError, "temperature: expected a finite float > 0"),
    (dict(do_sample=1), TypeError, "do_sample: expected a bool or None, got 1"),
    (dict(min_p=2.0), ValueError, "min_p: expected a float in \\[0.0, 1.0\\]"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed, generator"),
    (
        dict(do_sample=True, typical_p=0.9),
        ValueError,
        "typical_p: chunklogits.sample does not support it",
    ),
    (
        dict(sequence_bias={(7, VOCAB + 3): 1.0}),
        ValueError,
        "sequence_bias: expected token ids below the vocabulary size 500, got \\[503\\]",
    ),
    (
        dict(do_sample=True, epsilon_cutoff=0.1, top_h=0.5),
        ValueError,
        "top_h: chunklogits.sample does not",
    ),
    (dict(renormalize_logits=True), ValueError, "renormalize_logits: chunklogits.sample does"),
    (dict(output_scores=True, return_dict_in_generate=True), ValueError, "output_scores"),
    (dict(num_beams=0), ValueError, "num_beams: expected an int >= 1, got 0"),
    (dict(num_beams=-1, do_sample=False), ValueError, "num_beams: expected an int >= 1, got -1"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_input_is_refused_with_a_clear_error(kwargs, error, match):
    model = _model("llama")
    ids, mask = _prompts()
    arguments = dict(input_ids=ids, attention_mask=mask, max_new_tokens=2) | kwargs
    with pytest.raises(error, match=match), torch.no_grad():
        sample(model, **arguments)


def test_a_cache_holding_a_prefix_is_refused():
    model = _model("llama")
    ids, mask = _prompts()
    with torch.no_grad():
        cache = model(ids[:, :3], attention_mask=mask[:, :3], use_cache=True).cache
        with pytest.raises(ValueError, match=r"cache: chunklogits\.sample starts from an empty"):
            sample(model, ids, mask, max_new_tokens=2, cache=cache)


def _bert_decoder():
    from transformers import BertConfig, BertLMHeadModel

    seeded(0)
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    config = BertConfig(**small, num_attention_heads=4, is_decoder=True, pad_token_id=PAD)
    return BertLMHeadModel(config).eval()


def _recurrent_gemma():
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    seeded(0)
    config = RecurrentGemmaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        lru_width=32,
        attention_window_size=8,
        block_types=["recurrent", "attention"],
        pad_token_id=PAD,
    )
    return RecurrentGemmaForCausalLM(config).eval()


def test_a_model_whose_head_is_fed_a_transformed_hidden_state_is_refused():
    # BERT's prediction head runs dense -> GELU -> LayerNorm before its decoder: the base
    # model's last hidden state is not what the output layer sees, and decoding from it gives
    # other tokens than generate() on every row.
    model = _bert_decoder()
    ids, mask = _prompts()
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **options)
        message = (
            r"model: chunklogits\.sample refuses BertLMHeadModel, .* not fed BertModel's last "
            r"hidden state .* prediction head's dense layer and LayerNorm"
        )
        with pytest.raises(ValueError, match=message):
            sample(model, ids, mask, **options)
        with pytest.raises(ValueError, match=message):  # generate()'s route alike
            model.generate(ids, attention_mask=mask, custom_generate=decode, **options)
        # sequence_logprobs records what the output layer is fed: it reproduces BERT's head.
        ours = sequence_logprobs(model, ids, mask)
        naive = reference.sequence_logprobs(model, ids, mask)
    torch.testing.assert_close(ours, naive, rtol=0, atol=2e-5)
    assert model.generate(ids, attention_mask=mask, **options).equal(expected)  # left intact


def test_a_model_with_a_logit_transform_it_does_not_read_is_refused(monkeypatch):
    # RecurrentGemma caps its logits (config.logits_soft_cap). Read from the config, the cap is
    # reproduced; taken out of the table of transforms, the model is refused: greedy tokens would
    # agree (the cap is monotone), beams and sampling would not.
    from chunklogits.integrations import transformers as hf

    model = _recurrent_gemma()
    ids, mask = _prompts()
    options = dict(max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        assert sample(model, ids, mask, **options).equal(
            model.generate(ids, attention_mask=mask, **options)
        )
        torch.testing.assert_close(
            sequence_logprobs(model, ids, mask),
            reference.sequence_logprobs(model, ids, mask),
            rtol=0,
            atol=2e-5,
        )
    table = [entry for entry in hf._TRANSFORM_ATTRIBUTES if entry[0] != "logits_soft_cap"]
    monkeypatch.setattr(hf, "_TRANSFORM_ATTRIBUTES", tuple(table))
    unread = _recurrent_gemma()  # a new model: the verdict is kept per model
    transform = r"maps a raw logit .* unknown logit transform"
    with torch.no_grad():
        with pytest.raises(ValueError, match="refuses RecurrentGemmaForCausalLM, .*" + transform):
            sample(unread, ids, mask, **options)
        with pytest.raises(ValueError, match="refusing RecurrentGemmaForCausalLM .*" + transform):
            sequence_logprobs(unread, ids, mask)
        # the reason is the cap: capped as in the config, the model's logits differ from its head's
        hidden = unread.model(ids, attention_mask=mask).last_hidden_state
        raw = unread.lm_head(hidden)
        cap = unread.config.logits_soft_cap
        torch.testing.assert_close(
            unread(ids, attention_mask=mask).logits, cap * torch.tanh(raw / cap)
        )


def test_the_probe_runs_once_per_model_and_head(monkeypatch):
    from chunklogits.head import ChunkedLMHead
    from chunklogits.integrations import transformers as hf

    calls = []
    probe = hf._probe_head
    monkeypatch.setattr(hf, "_probe_head", lambda *a, **k: calls.append(1) or probe(*a, **k))
    model = _model("gemma2")
    ids, mask = _prompts()
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **options)
        runs = [sample(model, ids, mask, **options) for _ in range(3)]
        assert len(calls) == 1
        ChunkedLMHead.wrap(model)  # another output layer: probed by wrap, then by sample again
        assert len(calls) == 2
        runs.append(sample(model, ids, mask, **options))
        assert len(calls) == 3
    for run in runs:
        assert torch.equal(run, expected)


@pytest.mark.parametrize("family", ["llama4", "mllama"])
def test_causal_lms_keeping_their_decoder_as_model_dot_model(family):
    # Their base_model_prefix ("language_model") names no submodule: base_model is the model
    # itself, the decoder is model.model.
    from transformers import (
        Llama4ForCausalLM,
        Llama4TextConfig,
        MllamaForCausalLM,
        MllamaTextConfig,
    )

    seeded(0)
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, **special)
    if family == "llama4":
        config = Llama4TextConfig(
            **small, **heads, head_dim=8, intermediate_size_mlp=64, num_local_experts=2
        )
        model = Llama4ForCausalLM(config).eval()
    else:
        model = MllamaForCausalLM(MllamaTextConfig(**small, **heads, cross_attention_layers=[1]))
        model.eval()
    assert model.base_model is model
    ids, mask = _prompts()
    for options in (dict(do_sample=False), dict(num_beams=3, num_return_sequences=2)):
        options |= dict(max_new_tokens=6, pad_token_id=PAD)
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=mask, **options)
            assert torch.equal(sample(model, ids, mask, **options), expected)


def test_a_head_it_does_not_know_is_refused():
    model = _model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head, torch.nn.Tanh())
    ids, mask = _prompts()
    with pytest.raises(TypeError, match=r"model: expected a plain nn\.Linear output head, got Seq"):
        sample(model, ids, mask, max_new_tokens=2)


def test_direct_route_takes_the_settings_of_user_processors():
    # generate() hands decode its own processors and the user's (logits_processor=), in the
    # order it applies them: decode reads the settings from them, or refuses a list it does not
    # reproduce.
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    model = _model("llama")
    ids, mask = _prompts()
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
        # top_k = 1 leaves the most probable token only: sampling reproduces greedy decoding.
        only_top = LogitsProcessorList([TopKLogitsWarper(1)])
        routed = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=6,
            logits_processor=only_top,
            custom_generate=decode,
            seed=0,
        )
        assert torch.equal(routed, greedy)
        # A user temperature runs before the built top-k, as sample_next applies them.
        tempered = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            top_k=1,
            max_new_tokens=6,
            logits_processor=LogitsProcessorList([TemperatureLogitsWarper(0.5)]),
            custom_generate=decode,
            seed=0,
        )
        assert torch.equal(tempered, greedy)
        for processor, temperature, message in (
            # a user top-p runs before the built temperature: another distribution
            (TopPLogitsWarper(0.9), 0.7, "applies .* in this order"),
            (TopKLogitsWarper(9, min_tokens_to_keep=3), 1.0, "reproduces .*min_tokens_to_keep=1"),
        ):
            with pytest.raises(ValueError, match=f"logits_processor: chunklogits.sample {message}"):
                model.generate(
                    ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    max_new_tokens=2,
                    logits_processor=LogitsProcessorList([processor]),
                    custom_generate=decode,
                )


def _token_options(new, eos: list[int]) -> dict:
    """Options of generate()'s processors that mask or bias a few tokens, each chosen from the
    plain greedy continuation ``new`` ``[3, n]`` (eos ids ``eos`` end rows 1 and 2 early) so that
    it changes what greedy decoding produces."""
    first, second = int(new[0, 0]), int(new[1, 0])
    return {
        "min_new_tokens": dict(min_new_tokens=7),
        "min_length": dict(min_length=14),
        # The bias would repeat `first` at every step: the ban lets the bigram occur once.
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2, sequence_bias={(first,): 30.0}),
        "bad_words_ids": dict(bad_words_ids=[[first], [second, int(new[1, 1])], [eos[0]]]),
        "suppress_tokens": dict(suppress_tokens=[int(new[0, 1]), int(new[2, 0])]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[first, second]),
        "sequence_bias": dict(
            sequence_bias={(first,): -4.0, (second, int(new[1, 1])): -3.5, (17,): 2.5}
        ),
        "forced_eos_token_id": dict(forced_eos_token_id=eos[1], max_new_tokens=5),
        "together": dict(
            no_repeat_ngram_size=1,
            suppress_tokens=[first],
            min_new_tokens=3,
            sequence_bias={(second,): 1.5},
        ),
    }


TOKEN_CASES = list(_token_options(torch.zeros(3, 2, dtype=torch.long), [0, 0]))


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_processors_are_generate_greedy_and_beams(case, beams):
    _check_token_processors(_model("llama"), case, beams)


@pytest.mark.parametrize("case", ["sequence_bias", "together", "forced_eos_token_id"])
def test_token_processors_are_generate_greedy_bf16(cpu_gemm, case):
    _check_token_processors(_model("llama").to(torch.bfloat16), case, beams=1)


def _check_token_processors(model, case: str, beams: int):
    ids, mask = _prompts()
    base = dict(max_new_tokens=10, do_sample=False, pad_token_id=PAD, num_beams=beams)
    eos = _eos_that_stops_early(model, ids, mask, steps=10)
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, eos_token_id=eos, **base)
        options = base | dict(eos_token_id=eos) | _token_options(free[:, ids.shape[1] :], eos)[case]
        expected = model.generate(ids, attention_mask=mask, **options)
        ours = sample(model, ids, mask, shards=3, **options)
        routed = model.generate(ids, attention_mask=mask, custom_generate=decode, **options)
    assert torch.equal(ours, expected), (ours, expected)
    assert torch.equal(routed, expected)
    # The processor changed the continuation: the comparison says something.
    assert ours.shape != free.shape or not torch.equal(ours, free)


def test_forced_bos_token_on_a_one_token_prompt():
    # ForcedBOSTokenLogitsProcessor acts when the sequence holds one token.
    model = _model("llama")
    ids = torch.tensor([[5], [9]])
    options = dict(max_new_tokens=4, do_sample=False, forced_bos_token_id=77, pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(ids, **options)
        assert (expected[:, 1] == 77).all()
        assert torch.equal(sample(model, ids, shards=2, **options), expected)
        beams = model.generate(ids, num_beams=2, **options)
        assert torch.equal(sample(model, ids, num_beams=2, **options), beams)
        drawn = sample(model, ids, max_new_tokens=4, do_sample=True, forced_bos_token_id=77, seed=0)
    assert (drawn[:, 1] == 77).all()


def test_token_processors_and_cutoffs_sampled_as_their_hf_processors():
    """Several steps of sampling with every supported processor: each drawn token is kept by
    HF's own processors applied to the step's full logits, with the log-prob they give it."""
    from transformers.generation.logits_process import (
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoBadWordsLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    model = _model("llama")
    ids, mask = _prompts(rows=4)
    eos, steps, prompt = [2, 40], 6, ids.shape[1]
    bias = {(11,): 3.0, (12, 13): -2.0, (40,): 1.0}
    options = dict(
        temperature=0.8,
        top_k=60,
        epsilon_cutoff=0.004,
        eta_cutoff=0.02,
        repetition_penalty=1.2,
        no_repeat_ngram_size=2,
        bad_words_ids=[[14], [15, 16]],
        min_new_tokens=3,
        suppress_tokens=[17, 18],
        sequence_bias=bias,
    )
    with torch.no_grad():
        out = sample(
            model,
            ids,
            mask,
            max_new_tokens=steps,
            do_sample=True,
            seed=3,
            return_logprobs=True,
            eos_token_id=eos,
            pad_token_id=PAD,
            **options,
        )
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, prompt:])], 1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(out.sequences, attention_mask=full_mask, position_ids=positions).logits
    processors = LogitsProcessorList(
        [
            SequenceBiasLogitsProcessor(bias),
            RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=(mask == 0).sum(1)),
            NoRepeatNGramLogitsProcessor(2),
            NoBadWordsLogitsProcessor([[14], [15, 16]], eos),
            MinNewTokensLengthLogitsProcessor(prompt, 3, eos),
            SuppressTokensLogitsProcessor([17, 18]),
            TemperatureLogitsWarper(0.8),
            TopKLogitsWarper(60),
            EpsilonLogitsWarper(0.004),
            EtaLogitsWarper(0.02),
        ]
    )
    live = torch.ones(4, dtype=torch.bool)
    for step in range(steps):
        at = prompt + step
        scores = processors(out.sequences[:, :at], logits[:, at - 1].float())
        token = out.sequences[:, at, None]
        expected = scores.log_softmax(-1).gather(1, token).squeeze(1)
        assert torch.isfinite(expected[live]).all()  # HF's processors keep every drawn token
        torch.testing.assert_close(out.logprobs[live, step], expected[live], rtol=0, atol=1e-4)
        live &= ~torch.isin(token.squeeze(1), torch.tensor(eos))
