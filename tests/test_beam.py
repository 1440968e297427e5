"""Beam search and the rest of ``generate()``'s interface in ``cl.sample`` (streamers, stop
strings, refusals), against ``model.generate`` on random transformers models."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import Tensor
from transformers import (
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    TextIteratorStreamer,
    TextStreamer,
    TopKLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from chunklogits import reference
from chunklogits.generate import decode, sample
from chunklogits.sampling import beam_candidates
from tests.helpers import assert_as_accurate, one_thread, run_ranks, seeded, tiny_llama_config
from tests.test_generate import FAMILIES, PAD, VOCAB, _model, _prompts

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def _stable_topk(input, k, dim=-1, largest=True, sorted=True):
    """``torch.topk`` with tied values in index order (a stable sort)."""
    values, indices = input.sort(dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


@pytest.fixture
def ties_by_index(monkeypatch):
    """``generate()`` ranks continuations with ``torch.topk``, whose order among tied values is
    unspecified (on CPU neither by index nor stable across shapes); ``sample`` ranks ties by
    (beam, token) index. In bf16 tied logits are common (Gemma-2's softcapped logits have a
    resolution of 1/128), so the oracle for half precision is ``generate()`` with ties in index
    order. ``sample`` calls the same helpers of ``generate()`` after its own ranking, so both runs
    see the same ``topk``."""
    monkeypatch.setattr(torch, "topk", _stable_topk)


def _eos_in_beams(free: Tensor, prompt: int, returned: int) -> list[int]:
    """Two tokens that the best beams of rows 1 and 2 of ``free`` (decoded without an eos)
    produce mid-way: as eos ids they end those beams early."""
    new = free[::returned, prompt:]
    return [int(new[1, 2]), int(new[2, 4])]


# (num_beams, length_penalty, early_stopping, num_return_sequences, eos ids that end beams early)
BEAM_OPTIONS = [
    (4, 1.0, False, 1, True),
    (3, 0.5, True, 2, True),
    (2, 2.0, "never", 2, False),
    (3, -1.0, False, 3, True),
]


def _check_beams(model, options: dict, with_eos: bool, routed: bool = False):
    ids, mask = _prompts()
    options = dict(do_sample=False, pad_token_id=PAD, max_new_tokens=8, **options)
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, **options)
        if with_eos:
            returned = options["num_return_sequences"]
            options["eos_token_id"] = _eos_in_beams(free, ids.shape[1], returned)
        expected = model.generate(ids, attention_mask=mask, **options)
        ours = sample(model, ids, mask, shards=3, **options)
        if routed:
            via = model.generate(ids, attention_mask=mask, custom_generate=decode, **options)
            assert torch.equal(via, expected)
    assert torch.equal(ours, expected), (ours, expected)
    if with_eos:  # the eos ids changed the search
        assert ours.shape != free.shape or not torch.equal(ours, free)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("beams", "length_penalty", "early_stopping", "returned", "eos"), BEAM_OPTIONS
)
def test_beam_search_is_generate_fp32(
    one_thread, family, beams, length_penalty, early_stopping, returned, eos
):
    options = dict(
        num_beams=beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=returned,
    )
    _check_beams(_model(family), options, with_eos=eos, routed=family == "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_is_generate_bf16(ties_by_index, cpu_gemm, family):
    options = dict(num_beams=3, length_penalty=0.5, early_stopping=True, num_return_sequences=2)
    _check_beams(_model(family).to(torch.bfloat16), options, with_eos=True)


@pytest.mark.parametrize(("beams", "eos"), [(3, None), (3, [2]), (4, [2, 3])])
def test_beam_search_over_a_vocabulary_smaller_than_its_candidates(beams, eos):
    # generate() keeps max(2, 1 + #eos) * num_beams continuations of each prompt (6 to 12 here),
    # more than the 5 tokens of the vocabulary: each beam's candidates are then all of it.
    from transformers import LlamaForCausalLM

    seeded(0)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    model = LlamaForCausalLM(tiny_llama_config(5, **special)).eval()
    ids = torch.randint(0, 5, (3, 4), generator=seeded(1))
    options = dict(num_beams=beams, do_sample=False, max_new_tokens=6, num_return_sequences=2)
    if eos is not None:
        options["eos_token_id"] = eos
    with torch.no_grad():
        expected = model.generate(ids, **options)
        ours = sample(model, ids, shards=2, **options)
    assert torch.equal(ours, expected), (ours, expected)


_PARALLEL_BEAMS = dict(num_beams=3, do_sample=False, max_new_tokens=6, num_return_sequences=2)


def _parallel_prompts() -> Tensor:
    return torch.randint(3, 301, (3, 5), generator=torch.Generator().manual_seed(2))


def _beams_over_ranks(rank: int, world: int) -> Tensor:
    from tests.test_distributed import _llama

    with torch.no_grad():
        return sample(_llama(world), _parallel_prompts(), shards=2, **_PARALLEL_BEAMS)


def test_beam_search_with_a_colwise_parallel_lm_head():
    """Each rank holds half of the head's vocabulary (ColwiseParallel); every rank's beams are
    generate()'s in one process."""
    from tests.test_distributed import _llama

    with torch.no_grad():
        expected = _llama().generate(_parallel_prompts(), **_PARALLEL_BEAMS)
    for rank, got in enumerate(run_ranks(_beams_over_ranks, 2)):
        assert torch.equal(got, expected), f"rank {rank}: {got} vs {expected}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 4])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_beam_candidates_are_the_largest_log_probs(cpu_gemm, dtype, shards, softcap):
    g = seeded(3)
    rows, vocab, dim, count = 5, 507, 123, 8
    hidden = torch.randn(rows, dim, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) / 4).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype)
    # Row 0's best token repeated 81 times (more than the candidates kept beyond `count`): the
    # pass is repeated with more candidates, and the tied tokens come in index order.
    weight[100:181], bias[100:181] = weight[7], bias[7]
    hidden[0] = weight[7] * 8
    head = dict(bias=bias, softcap=softcap)
    logprobs, tokens = beam_candidates(hidden, weight, count, shards=shards, **head)
    naive, naive_tokens = reference.beam_candidates(hidden, weight, count, **head)
    assert torch.equal(tokens, naive_tokens)
    assert (logprobs[0] == logprobs[0, 0]).all() and (tokens[0].diff() > 0).all()
    if softcap is None:  # with it, more tokens reach the softcap's ceiling in bf16
        assert torch.equal(tokens[0], torch.tensor([7, *range(100, 107)]))
    model_logits = reference.model_logits(hidden, weight, **head).double()
    exact = model_logits.log_softmax(-1).gather(1, tokens)
    assert_as_accurate(logprobs, naive, exact, dtype, "beam candidate log-probs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("only", [False, True], ids=["added", "only"])
def test_beam_candidates_with_a_logit_bias(cpu_gemm, dtype, only):
    # generate()'s beam search adds its processors' biases to the log-probs; forced tokens
    # (logit_bias_only) replace them: 0 for the listed tokens, -inf for the others.
    g = seeded(4)
    rows, vocab, dim, count = 5, 507, 64, 6
    hidden = torch.randn(rows, dim, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) / 4).to(dtype)
    raw = reference.model_logits(hidden, weight).float()
    listed = torch.cat([raw.topk(3).indices, torch.randint(-1, vocab, (rows, 9), generator=g)], 1)
    values = torch.randn(listed.shape, generator=g) * 3
    values[:, 0] = -float("inf")  # each row's best token masked
    head = dict(logit_bias=(listed, values), logit_bias_only=only)
    logprobs, tokens = beam_candidates(hidden, weight, count, shards=4, **head)
    naive, naive_tokens = reference.beam_candidates(hidden, weight, count, **head)
    assert torch.equal(tokens, naive_tokens)
    assert not torch.equal(tokens[:, 0], raw.argmax(-1))
    finite = naive.isfinite()
    assert torch.equal(logprobs.isfinite(), finite)
    if only:  # the listed tokens' values themselves
        assert torch.equal(logprobs[finite], naive[finite])
    else:
        exact = reference.model_logits(hidden, weight).double().log_softmax(-1)
        exact = (exact + reference.dense_bias(head["logit_bias"], vocab)).gather(1, tokens)
        assert_as_accurate(logprobs[finite], naive[finite], exact[finite], dtype, "biased")


def test_beam_candidates_of_forced_tokens():
    # Fewer listed tokens than `count` (a forced eos with beams): the rest are -inf, any tokens.
    hidden, weight = torch.randn(3, 16, generator=seeded(5)), torch.randn(900, 16)
    forced = (torch.tensor([[40, 7, 7]]).expand(3, -1), torch.tensor([[0.0, 0.0, -0.5]]))
    logprobs, tokens = beam_candidates(
        hidden, weight, 4, logit_bias=(forced[0], forced[1].expand(3, -1)), logit_bias_only=True
    )
    assert torch.equal(tokens[:, :2], torch.tensor([[40, 7]] * 3))
    assert torch.equal(logprobs[:, :2], torch.tensor([[0.0, -0.5]] * 3))
    assert (logprobs[:, 2:] == -float("inf")).all()


class _Recorder(BaseStreamer):
    """What a streamer is given: each ``put``'s tokens, then ``end``."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


def test_streamer_gets_what_generate_gives_it():
    model = _model("llama")
    ids, mask = _prompts()
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, **options)
    options["eos_token_id"] = _eos_in_beams(free, ids.shape[1], 1)
    theirs, ours = _Recorder(), _Recorder()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, streamer=theirs, **options)
        got = sample(model, ids, mask, streamer=ours, **options)
    assert torch.equal(got, expected)
    assert ours.calls == theirs.calls
    assert ours.calls[0] == ids.tolist() and ours.calls[-1] == "end"
    assert len(ours.calls) == 2 + expected.shape[1] - ids.shape[1]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer of exactly ``VOCAB`` tokens, trained in memory: ids 0, 1, 2
    are the pad, bos and eos tokens of the test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    g = seeded(4)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "da", "ve", "zu", "qe"]
    words = [
        "".join(syllables[int(i)] for i in torch.randint(0, 12, (int(n),), generator=g))
        for n in torch.randint(1, 4, (4000,), generator=g)
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([" ".join(words[i : i + 20]) for i in range(0, 4000, 20)], trainer)
    assert bpe.get_vocab_size() == VOCAB
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def test_text_iterator_streamer_gets_every_token_then_ends(tokenizer):
    model = _model("gemma2")
    ids, _ = _prompts(rows=1)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    texts = []
    for run in (model.generate, lambda *a, **k: sample(model, *a, **k)):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=False, timeout=60)
        thread = threading.Thread(
            target=torch.no_grad()(run), args=(ids,), kwargs=dict(streamer=streamer, **options)
        )
        thread.start()
        texts.append("".join(streamer))  # ends only when the streamer's end() is called
        thread.join()
    assert texts[1] == texts[0]
    with torch.no_grad():
        sequence = model.generate(ids, **options)[0]
    assert texts[1] == tokenizer.decode(sequence)


def test_text_streamer_prints_what_it_prints_for_generate(tokenizer, capsys):
    model = _model("gpt2")
    ids, _ = _prompts(rows=1)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    printed = []
    with torch.no_grad():
        for run in (model.generate, lambda *a, **k: sample(model, *a, **k)):
            run(ids, streamer=TextStreamer(tokenizer), **options)
            printed.append(capsys.readouterr().out)
    assert printed[1] == printed[0]
    assert printed[0].endswith("\n")  # end() flushed the last words and a newline


@pytest.mark.parametrize("beams", [1, 3])
def test_stop_strings_with_a_tokenizer_stop_as_in_generate(tokenizer, beams):
    model = _model("llama")
    ids, mask = _prompts()
    options = dict(max_new_tokens=10, do_sample=False, pad_token_id=PAD, num_beams=beams)
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, **options)
        # Part of a word row 1 generates mid-way (the tail of its first token of 3+ letters).
        words = [tokenizer.decode(t).strip() for t in free[1, ids.shape[1] + 2 :]]
        stop = next(word for word in words if word.isalpha() and len(word) >= 3)[1:]
        options |= dict(stop_strings=[stop], tokenizer=tokenizer)
        expected = model.generate(ids, attention_mask=mask, **options)
        ours = sample(model, ids, mask, **options)
    assert torch.equal(ours, expected)
    assert ours.shape != free.shape or not torch.equal(ours, free)  # a row stopped early


REFUSED = [
    (dict(num_beams=2, do_sample=True), ValueError, "num_beams, do_sample: .*beam sampling"),
    (
        dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, do_sample=False),
        ValueError,
        "num_beam_groups: .*group beam search",
    ),
    (dict(penalty_alpha=0.6, top_k=4, do_sample=False), ValueError, "penalty_alpha"),
    (dict(dola_layers="low", do_sample=False), ValueError, "dola_layers"),
    (
        dict(force_words_ids=[[5]], num_beams=2, do_sample=False),
        ValueError,
        "constraints, force_words_ids",
    ),
    (dict(synced_gpus=True), ValueError, "synced_gpus"),
    (
        dict(logits_processor=LogitsProcessorList([TopKLogitsWarper(3)])),
        ValueError,
        "logits_processor: .*a user logits_processor",
    ),
    (dict(custom_generate="user/repo"), ValueError, "custom_generate"),
    (dict(token_healing=True), ValueError, "token_healing"),
    (dict(prefill_chunk_size=4), ValueError, "prefill_chunk_size"),
    (
        dict(num_beams=2, do_sample=False, return_logprobs=True),
        ValueError,
        "return_logprobs: not available with beam search",
    ),
    (dict(num_beams=2, do_sample=False, streamer=_Recorder()), ValueError, "streamer: not"),
    (
        dict(num_beams=2, do_sample=False, repetition_penalty=1.3),
        ValueError,
        "repetition_penalty: chunklogits.sample's beam search applies only the processors",
    ),
    (dict(stop_strings=["ka"]), ValueError, "tokenizer: stop_strings=\\['ka'\\] need"),
    (dict(output_logits=True, return_dict_in_generate=True), ValueError, "output_logits"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), REFUSED)
def test_what_sample_does_not_support_is_refused_by_name(kwargs, error, match):
    model = _model("llama")
    ids, mask = _prompts()
    with pytest.raises(error, match=match), torch.no_grad():
        sample(model, ids, mask, max_new_tokens=2, **kwargs)


def test_a_model_that_is_not_a_causal_lm_is_refused():
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match=r"model: expected a transformers causal LM .* got Linear"):
        sample(torch.nn.Linear(4, 4), ids)
