"""Encoder-decoder models (T5, mT5, BART, M2M100/NLLB, Marian, Pegasus, Whisper) through
``ChunkedLMHead.wrap`` and ``cl.sample``, against the unwrapped model (HF's own code):

* wrap: the training loss and every parameter's gradient (accuracy rule against the fp64 model),
  the decoder input built from the labels as the forward builds it, ``final_logits_bias`` and
  T5's ``d_model ** -0.5`` rescale of the decoder output; ``generate`` greedy and beams unchanged;
* ``cl.sample``: greedy and beams give ``generate``'s tokens; sampling is seeded and
  shard-invariant;
* the sweep: every class of ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES``, built from a tiny
  config (``tests/test_architectures.py``'s machinery), passes or is refused by name
  (``REFUSED``); a subset by default, all with ``CHUNKLOGITS_ALL_ARCHITECTURES=1``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

import chunklogits as cl
from tests import test_architectures as architectures
from tests.helpers import assert_as_accurate, assert_as_accurate_in_norm, one_thread
from tests.test_architectures import VOCAB, build, tiny_config

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

SEQ2SEQ = {
    **MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "whisper": "WhisperForConditionalGeneration",
}
# The models of the detailed tests: T5 tied (its decoder output rescaled by d_model ** -0.5),
# mT5 untied as its checkpoints, the BART family with final_logits_bias (BART, Marian, Pegasus),
# M2M100 (NLLB's class), Whisper (audio features in).
FAMILIES = ["t5", "mt5", "bart", "m2m_100", "marian", "pegasus", "whisper"]
_FRAMES = 8  # Whisper's encoder positions in the tiny config (16 feature frames)


def seq2seq_model(model_type: str, dtype: torch.dtype = torch.float32):
    """The tiny model of ``model_type``'s class in ``SEQ2SEQ``, in eval mode. Its decoder starts
    from the pad token 0 where the config names none (T5's checkpoints do so), mT5 is
    untied as its checkpoints, Whisper takes 16 frames; an untied output embedding is drawn with
    unit variance and ``final_logits_bias`` (zeros at initialisation) with 0.1, so that a
    missing bias fails the comparisons."""
    config = tiny_config(model_type)
    for name in ("pad_token_id", "decoder_start_token_id"):
        if config.is_encoder_decoder and getattr(config, name, None) is None:
            setattr(config, name, 0)
    if model_type == "mt5":
        config.tie_word_embeddings = False
    if model_type == "whisper":  # its special tokens lie beyond the tiny vocabulary
        config.max_source_positions, config.num_mel_bins = _FRAMES, 8
        config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    model = build(model_type, SEQ2SEQ, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        # Untied: logits of a few units that depend on the input (random initialisation's are
        # ~0.1), so that generated tokens vary. (A tied embedding that large would make each
        # token predict itself.)
        output = model.get_output_embeddings().weight
        if output is not model.get_input_embeddings().weight:
            output.normal_(generator=generator)
        bias = getattr(model, "final_logits_bias", None)
        if bias is not None:
            bias.normal_(std=0.1, generator=generator)
    return model.to(dtype).eval()


def _encoder_input(model, seed: int = 1) -> dict:
    """The encoder's input for a batch of 2: token ids with a padded row, or Whisper's features."""
    generator = torch.Generator().manual_seed(seed)
    if model.main_input_name == "input_features":
        config = model.config
        shape = (2, config.num_mel_bins, 2 * config.max_source_positions)
        return {"input_features": torch.randn(shape, generator=generator).to(model.dtype)}
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _labels(seed: int = 2) -> torch.Tensor:
    labels = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(seed))
    labels[0, 3] = -100
    return labels


def _loss_and_gradients(model) -> dict[str, torch.Tensor]:
    """The training loss of the decoder given the labels (the decoder input built from them by
    the forward) and every parameter's gradient."""
    model.train()
    loss = model(**_encoder_input(model), labels=_labels()).loss
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_gradient_match_the_unwrapped_model(family):
    exact = seq2seq_model(family, torch.float64)
    naive = copy.deepcopy(exact).float()
    ours = cl.ChunkedLMHead.wrap(copy.deepcopy(naive), shards=3)
    results = [_loss_and_gradients(model) for model in (ours, naive, exact)]
    assert ours(**_encoder_input(ours), labels=_labels()).logits is None  # no [B, T, V] made
    for key, truth in results[2].items():
        if truth is None:  # a parameter the loss does not reach
            assert all(r[key] is None for r in results), key
            continue
        # The gradient of an attention key's bias is 0 (the softmax ignores a shift of all
        # scores): a cancellation of terms the size of the key weight's gradient.
        scale = None
        if key.endswith("k_proj.bias"):
            scale = results[2][key.replace("bias", "weight")].abs().max().item()
        assert_as_accurate(*(r[key] for r in results), torch.float32, f"{family} {key}", scale)


@pytest.mark.parametrize("family", ["t5", "mt5", "m2m_100", "bart", "whisper"])
def test_bf16_loss_and_gradients(family):
    """In bf16 the loss and the output layer's gradient by the accuracy rule elementwise, the
    gradients upstream (through the model's own bf16 backward in both runs) in norm."""
    exact = seq2seq_model(family, torch.float64)
    naive = copy.deepcopy(exact).bfloat16()
    ours = cl.ChunkedLMHead.wrap(copy.deepcopy(naive), shards=3)
    results = [_loss_and_gradients(model) for model in (ours, naive, exact)]
    # An untied output layer's gradient is the head's alone; a tied one's also the model's.
    head = [k for k in results[2] if k.endswith("lm_head.weight")]
    for key in ["loss", *head]:
        assert_as_accurate(*(r[key] for r in results), torch.bfloat16, f"{family} {key}")
    upstream = [k for k, v in results[2].items() if k not in ("loss", *head) and v is not None]
    vectors = (torch.cat([r[key].flatten().double() for key in upstream]) for r in results)
    assert_as_accurate_in_norm(*vectors, torch.bfloat16, f"{family} upstream gradients")


def test_outputs_without_labels_and_the_given_decoder_input_are_the_original():
    model = seq2seq_model("bart")
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    inputs, labels = _encoder_input(model), _labels()
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    with torch.no_grad():
        theirs = model(**inputs, decoder_input_ids=decoder_input_ids)
        ours = wrapped(**inputs, decoder_input_ids=decoder_input_ids)
        assert torch.equal(ours.logits, theirs.logits)
        # Labels with another decoder input: the loss of that input, evaluated with the logits.
        shifted = decoder_input_ids.roll(1, dims=1)
        theirs = model(**inputs, decoder_input_ids=shifted, labels=labels)
        ours = wrapped(**inputs, decoder_input_ids=shifted, labels=labels)
    torch.testing.assert_close(ours.loss, theirs.loss)
    assert torch.equal(ours.logits, theirs.logits)


_GENERATE = {"max_new_tokens": 6, "do_sample": False}


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_through_wrap_and_cl_sample_give_generate_tokens(family, beams):
    _check_generate(seq2seq_model(family), beams)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("family", ["t5", "bart", "whisper"])
def test_bf16_generate_and_cl_sample(family, beams, cpu_gemm):
    """In bf16, with the head's block GEMMs in bf16 and in fp32 (``cpu_gemm``): the decisions
    are taken on the logits rounded to the model dtype, as generate() takes them."""
    _check_generate(seq2seq_model(family, torch.bfloat16), beams)


def _check_generate(model, beams: int) -> None:
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    inputs = _encoder_input(model)
    options = {**_GENERATE, "num_beams": beams}
    with torch.no_grad():
        expected = model.generate(**inputs, **options)
        main = inputs.pop(model.main_input_name)
        assert torch.equal(wrapped.generate(main, **inputs, **options), expected)
        for each in (model, wrapped):
            assert torch.equal(cl.sample(each, main, **inputs, shards=3, **options), expected)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("size", [1, 2])
def test_encoder_no_repeat_ngram_size_is_generates(size, beams):
    """encoder_no_repeat_ngram_size bans, per row, the tokens that would repeat an n-gram of the
    row's encoder input: a few tokens, masked inside the block scan as generate() masks them."""
    model = seq2seq_model("bart")
    inputs = _encoder_input(model)
    main = inputs.pop("input_ids")
    options = {**_GENERATE, "max_new_tokens": 10, "num_beams": beams, **inputs}
    with torch.no_grad():
        # An encoder input that holds the start of its own free continuation: the ban acts.
        main[:, :4] = model.generate(main, **options)[:, 1:5]
        free = model.generate(main, **options)
        expected = model.generate(main, encoder_no_repeat_ngram_size=size, **options)
        ours = cl.sample(model, main, encoder_no_repeat_ngram_size=size, shards=3, **options)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, free)
    if size == 1:  # no token of the row's input (but the last, BART's forced_eos_token_id)
        for out, row in zip(ours[:, 1:-1], main, strict=True):
            assert not set(out.tolist()) & set(row.tolist())


@pytest.mark.parametrize("family", ["t5", "bart", "whisper"])
def test_sampling_is_seeded_and_shard_invariant(family):
    model = seq2seq_model(family)
    inputs = _encoder_input(model)
    main = inputs.pop(model.main_input_name)
    # Whisper's generate() samples only given a temperature (its fallback schedule).
    options = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "seed": 5, **inputs}
    with torch.no_grad():
        one = cl.sample(model, main, shards=1, **options)
        assert torch.equal(cl.sample(model, main, shards=7, **options), one)
        other = cl.sample(model, main, shards=1, **{**options, "seed": 6})
    assert not torch.equal(other, one)


def test_masked_lm_loss_and_its_arguments_follow_the_unwrapped_model():
    """T5Gemma's loss is transformers' ForMaskedLMLoss (unshifted, ``num_items_in_batch``), its
    logits softcapped by the decoder config's final_logit_softcapping."""
    model = seq2seq_model("t5gemma").train()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    assert wrapped.get_output_embeddings().softcap == model.config.decoder.final_logit_softcapping
    inputs, labels = _encoder_input(model), _labels()
    for options in ({}, {"num_items_in_batch": torch.tensor(7)}):
        ours = wrapped(**inputs, labels=labels, **options).loss
        theirs = model(**inputs, labels=labels, **options).loss
        torch.testing.assert_close(ours, theirs)


def test_refusals_name_the_encoder_decoder_model():
    model = seq2seq_model("t5")
    input_ids = _encoder_input(model)["input_ids"]
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        cl.sequence_logprobs(model, input_ids)
    with pytest.raises(ValueError, match="encoder-decoder T5ForConditionalGeneration"):
        cl.sample(model, input_ids, prompt_lookup_num_tokens=2, max_new_tokens=2)


# The sweep. Entries of the mapping that are decoder-only (audio-text LMs: their text decoder is a
# causal LM) are checked as tests/test_architectures.py checks causal LMs.
def _check_wrap(model):
    """Training loss and the output and input embeddings' gradients against the unwrapped model
    (accuracy rule against the fp64 model where it runs in fp64, else within fp32 rounding of
    the unwrapped model's), generate greedy unchanged."""
    ours = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    runs = {"ours": ours, "naive": model, "exact": copy.deepcopy(model).double()}

    def loss_of(each):
        each.train()
        return each(**_encoder_input(each), labels=_labels()).loss

    results = architectures.losses_and_embedding_grads(runs, loss_of)
    for key in results["naive"]:
        if results["naive"][key] is None:  # mT5's untied shared embedding: used by neither
            assert all(r[key] is None for r in results.values()), key
        elif "exact" in results:
            assert_as_accurate(*(r[key] for r in results.values()), torch.float32, key)
        else:
            torch.testing.assert_close(results["ours"][key], results["naive"][key], msg=key)
    model.eval(), ours.eval()
    inputs = _encoder_input(model)
    with torch.no_grad():
        expected = model.generate(**inputs, **_GENERATE)
        assert torch.equal(ours.generate(**inputs, **_GENERATE), expected)


def _check_sample(model):
    inputs = _encoder_input(model)
    main = inputs.pop(model.main_input_name)
    with torch.no_grad():
        expected = model.generate(main, **inputs, **_GENERATE)
        assert torch.equal(cl.sample(model, main, **inputs, **_GENERATE), expected)


def sweep_outcome(model_type: str) -> dict[str, str]:
    """{"wrap" / "sample": refusal message} of ``model_type``'s tiny model; empty if it passes.
    A decoder-only entry takes the causal LMs' checks."""
    checks = None
    if seq2seq_model(model_type).config.is_encoder_decoder:
        checks = {"wrap": _check_wrap, "sample": _check_sample}
    return architectures.outcome(
        model_type, make=lambda: seq2seq_model(model_type).train(), checks=checks
    )


CANNOT_BUILD: dict[str, str] = {}
# What each refused entry is refused by: {model_type: {"wrap" / "sample": fragment of the reason}}.
REFUSED: dict[str, dict[str, str]] = {
    # Given labels, its forward also masks the decoder's pad positions (decoder_attention_mask),
    # which the decoder input built from the labels alone does not: the probe's loss differs.
    "encoder-decoder": {"wrap": "refusing EncoderDecoderModel (in_features=32"},
    # Its output layer is an nn.Embedding used as a linear map.
    "fsmt": {
        "wrap": "FSMTForConditionalGeneration's output layer is a torch.nn.modules.sparse",
        "sample": "expected a plain nn.Linear output head, got Embedding",
    },
    # Its forward needs audio input (input_features) with the tokens: the probe's forward and
    # generate() (transformers' own error) fail on token ids alone.
    "voxtral_realtime": {
        "wrap": "refusing VoxtralRealtimeForConditionalGeneration, whose forward fails on token",
        "sample": "You must specify exactly one of input_features or encoder_inputs_embeds",
    },
    # Its logits are computed from the output layer's over n-gram streams.
    "prophetnet": {
        "wrap": "its logits have shape (2, 99), not its output layer's (2, 6, 99)",
        "sample": "refuses ProphetNetForConditionalGeneration, whose head it does not reproduce",
    },
}

ALL = sorted(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
# The default subset: T5 (tied, rescaled), BART (final_logits_bias), T5Gemma (ForMaskedLMLoss,
# softcap), a decoder-only audio LM (Qwen2-Audio) and each kind of refusal.
FAST = [
    "bart",
    "blenderbot",
    "encoder-decoder",
    "fsmt",
    "prophetnet",
    "qwen2_audio",
    "t5",
    "t5gemma",
]
ENTRIES = architectures.sweep_entries(ALL, FAST)


@pytest.mark.parametrize("model_type", ENTRIES)
def test_every_seq2seq_class_passes_or_is_refused_by_name(model_type):
    architectures.assert_passes_or_is_refused_by_name(
        model_type, refused=REFUSED, cannot_build=CANNOT_BUILD, outcome_of=sweep_outcome
    )
