"""sample_next against HF's own processors (reference.next_token_scores) and naive log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from chunklogits import reference
from chunklogits.sampling import sample_next
from tests.helpers import assert_as_accurate, chi_square_pvalue, seeded

SAMPLES = 4000
# A fixed seed makes each test deterministic; a correct sampler fails it with probability 1e-3.
MIN_PVALUE = 1e-3


def _head(vocab: int, dim: int, scale: float, seed: int = 0):
    """One hidden row and a head whose logits have both signs (the penalty treats them apart)."""
    g = seeded(seed)
    return torch.randn(1, dim, generator=g) * scale, torch.randn(vocab, dim, generator=g)


def _hf_probs(hidden, weight, bias=None, prev=None, **options) -> torch.Tensor:
    raw = reference.logits(hidden, weight, bias=bias)
    return reference.next_token_scores(raw, prev_tokens=prev, **options).softmax(-1)[0]


def _assert_same_distribution(tokens, probs):
    counts = torch.bincount(tokens, minlength=probs.numel())
    outside = counts[probs == 0].sum().item()
    assert outside == 0, f"{outside} draws of tokens HF's processors filter out"
    pvalue = chi_square_pvalue(counts, probs)
    assert pvalue > MIN_PVALUE, f"chi-square p-value {pvalue:.2e}"


CASES = {
    "plain": dict(top_k=0),
    "temperature": dict(top_k=0, temperature=0.6),
    "top_k": dict(top_k=10),
    "top_p": dict(top_k=0, top_p=0.7),
    "min_p": dict(top_k=0, min_p=0.05),
    "repetition_penalty": dict(top_k=0, repetition_penalty=1.8),
    "top_k_then_top_p": dict(top_k=20, top_p=0.6, temperature=1.5),
    "all": dict(top_k=30, top_p=0.9, min_p=0.02, temperature=0.8, repetition_penalty=1.3),
    "epsilon_cutoff": dict(top_k=0, epsilon_cutoff=0.01),
    "eta_cutoff": dict(top_k=0, eta_cutoff=0.2, temperature=1.5),
    "filters_then_cutoffs": dict(
        top_k=40, top_p=0.95, temperature=0.7, epsilon_cutoff=0.01, eta_cutoff=0.1
    ),
}
PREV = torch.tensor([[3, 7, 7, 11, 19, 42, 57, 60, -1]])  # -1: padding, not penalised


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_distribution_matches_hf_processors(options):
    hidden, weight = _head(vocab=96, dim=16, scale=0.6)
    tokens = sample_next(
        hidden.expand(SAMPLES, -1), weight, prev_tokens=PREV.expand(SAMPLES, -1), seed=0, **options
    )
    _assert_same_distribution(tokens, _hf_probs(hidden, weight, prev=PREV, **options))


# Nearly flat logits over 2048 tokens: the nucleus (~1700 tokens) and min-p's set (~1100) are far
# larger than the 256 candidates, so the bisection search and the masked pass decide.
FLAT_CASES = {
    "nucleus_beyond_candidates": dict(top_k=0, top_p=0.9),
    "min_p_beyond_candidates": dict(top_k=0, min_p=0.3),
    "both": dict(top_k=0, top_p=0.8, min_p=0.4, temperature=0.9),
    "epsilon_beyond_candidates": dict(top_k=0, epsilon_cutoff=4e-4),
    "eta_beyond_candidates": dict(top_k=0, eta_cutoff=0.3),
}


@pytest.mark.parametrize("options", FLAT_CASES.values(), ids=FLAT_CASES.keys())
def test_distribution_beyond_the_candidates(options):
    hidden, weight = _head(vocab=2048, dim=16, scale=0.1)
    probs = _hf_probs(hidden, weight, **options)
    assert (probs > 0).sum() > 300
    tokens = sample_next(hidden.expand(SAMPLES, -1), weight, seed=1, **options)
    _assert_same_distribution(tokens, probs)


def test_cutoffs_filter_what_hf_filters():
    # The cutoff cases above remove tokens (otherwise their comparison would be plain sampling).
    hidden, weight = _head(vocab=96, dim=16, scale=0.6)
    for name in ("epsilon_cutoff", "eta_cutoff", "filters_then_cutoffs"):
        before = dict(CASES[name], epsilon_cutoff=None, eta_cutoff=None)
        kept = (_hf_probs(hidden, weight, **CASES[name]) > 0).sum()
        assert 1 < kept < (_hf_probs(hidden, weight, **before) > 0).sum(), name


# Biases of a few tokens per row (as generate()'s sequence_bias, bad_words_ids, ... give them):
# raised, lowered, masked, one token listed twice (the biases add up), one entry outside.
BIAS_TOKENS = torch.tensor([[5, 9, 9, 30, 44, 60, 7, -1]])
BIAS_VALUES = torch.tensor([[3.0, 1.0, 1.5, -2.0, -float("inf"), 2.0, -float("inf"), 9.0]])


@pytest.mark.parametrize(
    "options",
    [dict(top_k=0, repetition_penalty=1.8), dict(top_k=20, epsilon_cutoff=0.02)],
    ids=["penalty", "top_k_epsilon"],
)
def test_logit_bias_distribution_matches_hf(options):
    # Added before the repetition penalty: PREV holds 7, 60 (penalised after their bias).
    hidden, weight = _head(vocab=96, dim=16, scale=0.6)
    bias = (BIAS_TOKENS, BIAS_VALUES)
    probs = _hf_probs(hidden, weight, prev=PREV, logit_bias=bias, **options)
    assert probs[44] == 0 and probs[7] == 0
    rows = [t.expand(SAMPLES, -1) for t in (hidden, PREV, *bias)]
    tokens = sample_next(
        rows[0], weight, prev_tokens=rows[1], logit_bias=tuple(rows[2:]), seed=2, **options
    )
    _assert_same_distribution(tokens, probs)


def test_logit_bias_only_draws_among_the_listed_tokens():
    # forced_eos_token_id with several eos ids: those tokens at 0, every other -inf.
    hidden, weight = _head(vocab=96, dim=16, scale=0.6)
    bias = (torch.tensor([[3, 50, 71, 71]]), torch.tensor([[0.0, 0.0, 0.0, -float("inf")]]))
    probs = _hf_probs(hidden, weight, logit_bias=bias, logit_bias_only=True, top_p=0.9)
    assert torch.equal(probs.nonzero().squeeze(1), torch.tensor([3, 50]))
    tokens = sample_next(
        hidden.expand(SAMPLES, -1),
        weight,
        logit_bias=tuple(t.expand(SAMPLES, -1) for t in bias),
        logit_bias_only=True,
        top_p=0.9,
        seed=4,
    )
    _assert_same_distribution(tokens, probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_with_logit_bias_is_hf_argmax(cpu_gemm, dtype):
    hidden, weight, bias, prev = _batch(vocab=300)
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    g = seeded(9)
    tokens = torch.randint(-1, 300, (hidden.shape[0], 10), generator=g)
    values = torch.randn(tokens.shape, generator=g) * 2
    values[:, ::3] = -float("inf")
    raw = reference.model_logits(hidden, weight, bias=bias).float()
    tokens[:, 0] = raw.argmax(-1)  # each row's own argmax is masked
    for only in (False, True):
        options = dict(
            bias=bias,
            prev_tokens=prev,
            do_sample=False,
            repetition_penalty=1.3,
            logit_bias=(tokens, values),
            logit_bias_only=only,
        )
        expected = reference.sample_next(hidden, weight, **options)
        assert torch.equal(sample_next(hidden, weight, shards=7, **options), expected)
    assert not torch.equal(expected, raw.argmax(-1))


def _tied_head(vocab: int, tied: int, above: int):
    """Logits are exactly the bias (zero weight): ``above`` distinct values in [3, 4), then
    ``tied`` tokens at 2.5, the rest in [0, 2); the tied tokens are spread over the vocabulary.
    Returns hidden, weight, bias and the tied tokens' indices."""
    g = seeded(3)
    bias = torch.rand(vocab, generator=g) * 2.0
    order = torch.randperm(vocab, generator=g)
    bias[order[:above]] = 3.0 + torch.rand(above, generator=g)
    tied_ids = order[above : above + tied].sort().values
    bias[tied_ids] = 2.5
    return torch.zeros(1, 4), torch.zeros(vocab, 4), bias, tied_ids


@pytest.mark.parametrize("tied", [8, 100], ids=["within_candidates", "beyond_candidates"])
def test_top_k_keeps_ties_with_the_kth_value(tied):
    above = 5
    hidden, weight, bias, _ = _tied_head(vocab=512, tied=tied, above=above)
    options = dict(top_k=above + 2, temperature=0.5)
    probs = _hf_probs(hidden, weight, bias=bias, **options)
    assert (probs > 0).sum() == above + tied  # HF keeps every tie with the k-th value
    tokens = sample_next(hidden.expand(SAMPLES, -1), weight, bias=bias, seed=2, **options)
    _assert_same_distribution(tokens, probs)


@pytest.mark.parametrize("top_k", [0, 15])
@pytest.mark.parametrize("tied", [40, 400], ids=["within_candidates", "beyond_candidates"])
def test_top_p_keeps_as_many_ties_at_the_crossing_as_hf(tied, top_k):
    # HF keeps some of the tokens tied at top-p's crossing value, which ones depending on
    # torch.sort's unstable order; we keep as many, those of smallest index.
    above = 5
    hidden, weight, bias, tied_ids = _tied_head(vocab=1024, tied=tied, above=above)
    full = _hf_probs(hidden, weight, bias=bias, top_k=top_k)
    before_ties = full[full > full[tied_ids[0]]].sum()
    top_p = (before_ties + full[tied_ids[0]] * (tied // 2 + 0.3)).item()
    probs = _hf_probs(hidden, weight, bias=bias, top_k=top_k, top_p=top_p)
    kept_ties = int((probs[tied_ids] > 0).sum())
    assert kept_ties == tied // 2 + 1
    tokens = sample_next(
        hidden.expand(SAMPLES, -1), weight, bias=bias, top_k=top_k, top_p=top_p, seed=4
    )
    drawn_ties = tokens[torch.isin(tokens, tied_ids)].unique()
    assert torch.equal(drawn_ties, tied_ids[:kept_ties])
    # Same distribution once the tied tokens are pooled: one category for all of them.
    pooled = torch.where(torch.isin(tokens, tied_ids), tied_ids[0], tokens)
    pooled_probs = probs.clone()
    pooled_probs[tied_ids] = 0.0
    pooled_probs[tied_ids[0]] = probs[tied_ids].sum()
    _assert_same_distribution(pooled, pooled_probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("vocab", "top_p"), [(86, 0.3), (10, 0.3), (100, 0.3), (20, 0.5)])
def test_top_p_on_a_uniform_row_keeps_hfs_count_of_smallest_ids(vocab, top_p, dtype):
    # Every token tied: HF keeps as many as its cumulative rule admits (torch.sort's order says
    # which), we keep as many of smallest id. With top_p * vocab an integer n the n-th token's mass
    # before it equals top_p exactly, so it goes (as in HF); fp32's 0.3 / exp(-log 10) rounds
    # above 3 and once kept a fourth token.
    hidden, weight = torch.zeros(1, 1, dtype=dtype), torch.randn(vocab, 1, dtype=dtype)
    hf = _hf_probs(hidden.float(), weight.float(), top_k=0, top_p=top_p)  # generate()'s fp32
    kept = int((hf > 0).sum())
    assert kept == math.ceil(top_p * vocab - 1e-9)  # the exact count, HF's in these cases
    tokens = sample_next(hidden.expand(SAMPLES, -1), weight, top_k=0, top_p=top_p, seed=3)
    probs = torch.zeros(vocab).index_fill_(0, torch.arange(kept), 1 / kept)
    _assert_same_distribution(tokens, probs)


def test_top_p_keeps_the_crossing_token():
    # Probabilities 0.45, 0.3, 0.15, 0.1: with top_p = 0.6 the mass reaches 0.6 only with the
    # second token, which HF keeps; the third and fourth go.
    bias = torch.tensor([0.45, 0.3, 0.15, 0.1]).log()
    hidden, weight = torch.zeros(1, 4), torch.zeros(4, 4)
    probs = _hf_probs(hidden, weight, bias=bias, top_k=0, top_p=0.6)
    assert probs.nonzero().squeeze(1).tolist() == [0, 1]
    tokens = sample_next(hidden.expand(SAMPLES, -1), weight, bias=bias, top_k=0, top_p=0.6, seed=0)
    assert set(tokens.tolist()) == {0, 1}
    _assert_same_distribution(tokens, probs)


def _batch(vocab: int, rows: int = 12, dim: int = 24, scale: float = 0.5, seed: int = 5):
    g = seeded(seed)
    hidden = torch.randn(rows, dim, generator=g) * scale
    weight = torch.randn(vocab, dim, generator=g)
    bias = torch.randn(vocab, generator=g) * 0.1
    prev = torch.randint(-1, vocab, (rows, 6), generator=g)
    return hidden, weight, bias, prev


INVARIANCE_CASES = {
    "greedy": dict(do_sample=False, repetition_penalty=1.4),
    "plain": dict(top_k=0, temperature=0.7),
    "top_k_top_p_min_p": dict(top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    "nucleus_search": dict(top_k=0, top_p=0.95, temperature=3.0),
    "min_p_masked_pass": dict(top_k=0, min_p=0.2, temperature=3.0),
    "cutoffs_masked_pass": dict(top_k=0, epsilon_cutoff=5e-4, eta_cutoff=0.05, temperature=3.0),
}


@pytest.mark.parametrize("options", INVARIANCE_CASES.values(), ids=INVARIANCE_CASES.keys())
def test_same_seed_same_tokens_whatever_the_blocks(options):
    hidden, weight, bias, prev = _batch(vocab=1000)
    outs = [
        sample_next(
            hidden,
            weight,
            bias=bias,
            prev_tokens=prev,
            seed=11,
            shards=shards,
            chunk_size=chunk,
            **options,
        )
        for shards in (1, 4, 16)
        for chunk in (None, 5)
    ]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_seed_and_generator_reproduce_draws():
    hidden, weight, _, _ = _batch(vocab=1000, rows=64, scale=0.05)
    options = dict(top_k=0, temperature=1.0)
    first = sample_next(hidden, weight, seed=1, **options)
    assert torch.equal(first, sample_next(hidden, weight, seed=1, **options))
    assert not torch.equal(first, sample_next(hidden, weight, seed=2, **options))
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    steps_a = [sample_next(hidden, weight, generator=a, **options) for _ in range(2)]
    steps_b = [sample_next(hidden, weight, generator=b, **options) for _ in range(2)]
    assert torch.equal(steps_a[0], steps_b[0]) and torch.equal(steps_a[1], steps_b[1])
    assert not torch.equal(steps_a[0], steps_a[1])
    torch.manual_seed(4)
    default = sample_next(hidden, weight, **options)
    torch.manual_seed(4)
    assert torch.equal(default, sample_next(hidden, weight, **options))


def test_greedy_is_hf_argmax_with_its_tie_rule():
    hidden, weight, bias, prev = _batch(vocab=300)
    bias[[17, 40, 250]] = 50.0  # three tokens tie for the maximum: argmax takes the first
    for penalty in (1.0, 1.5):
        expected = reference.sample_next(
            hidden, weight, bias=bias, prev_tokens=prev, do_sample=False, repetition_penalty=penalty
        )
        ours = sample_next(
            hidden,
            weight,
            bias=bias,
            prev_tokens=prev,
            do_sample=False,
            repetition_penalty=penalty,
            shards=7,
        )
        assert torch.equal(ours, expected)
    assert (expected == 17).any()


LOGPROB_CASES = {
    "greedy": dict(do_sample=False, repetition_penalty=1.3),
    "plain": dict(top_k=0, temperature=0.7),
    "filtered": dict(top_k=20, top_p=0.9, min_p=0.01, temperature=0.7, repetition_penalty=1.2),
    "nucleus_search": dict(top_k=0, top_p=0.95, temperature=2.0),
    "cutoffs": dict(top_k=0, epsilon_cutoff=0.002, eta_cutoff=0.01, temperature=2.0),
    "filters_then_cutoffs": dict(top_k=100, top_p=0.9, epsilon_cutoff=0.003, eta_cutoff=0.02),
    "logit_bias": dict(
        top_k=50,
        repetition_penalty=1.2,
        logit_bias=(
            torch.tensor([[3, 7, 7, -1]]).expand(12, -1),
            torch.tensor([[4.0, -1.0, -1.0, 2.0]]).expand(12, -1),
        ),
    ),
}


@pytest.mark.parametrize("options", LOGPROB_CASES.values(), ids=LOGPROB_CASES.keys())
def test_logprobs_match_naive(options):
    hidden, weight, bias, prev = _batch(vocab=700)
    ours = sample_next(
        hidden,
        weight,
        bias=bias,
        prev_tokens=prev,
        seed=3,
        shards=5,
        return_logprobs=True,
        **options,
    )

    def naive(h, w, b):
        raw = reference.logits(h, w, bias=b)
        scores = reference.next_token_scores(raw, prev_tokens=prev, **options)
        picked = ours.tokens[:, None]
        return (
            scores.log_softmax(-1).gather(1, picked).squeeze(1),
            raw.log_softmax(-1).gather(1, picked).squeeze(1),
        )

    naive_logprobs, naive_raw = naive(hidden, weight, bias)
    exact_logprobs, exact_raw = naive(hidden.double(), weight.double(), bias.double())
    assert torch.isfinite(naive_logprobs).all()  # every drawn token is kept by HF's processors
    assert_as_accurate(ours.logprobs, naive_logprobs, exact_logprobs, torch.float32, "logprobs")
    assert_as_accurate(ours.raw_logprobs, naive_raw, exact_raw, torch.float32, "raw_logprobs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_raw_logprobs_in_half_precision(dtype):
    hidden, weight, bias, _ = _batch(vocab=700)
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    ours = sample_next(
        hidden, weight, bias=bias, softcap=4.0, top_k=0, seed=0, shards=3, return_logprobs=True
    )
    picked = ours.tokens[:, None]

    def raw(h, w, b):
        z = reference.logits(h, w, bias=b, softcap=4.0)
        return z.log_softmax(-1).gather(1, picked).squeeze(1)

    exact = raw(hidden.double(), weight.double(), bias.double())
    assert_as_accurate(ours.raw_logprobs, raw(hidden, weight, bias), exact, dtype, "raw_logprobs")
    assert_as_accurate(ours.logprobs, raw(hidden, weight, bias), exact, dtype, "logprobs")


BAD = [
    (dict(top_p=0.0), ValueError, "top_p: expected a float in \\(0.0, 1.0\\], got 0.0"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k: expected an int >= 0"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(temperature=0.0), ValueError, "temperature: expected a finite float > 0"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(min_p=1.5), ValueError, "min_p: expected a float in \\[0.0, 1.0\\]"),
    (dict(min_p=-0.1), ValueError, "min_p"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=1.2), ValueError, "prev_tokens: repetition_penalty=1.2 needs"),
    (dict(prev_tokens=torch.zeros(3, 2, dtype=torch.long)), ValueError, "prev_tokens: expected"),
    (dict(prev_tokens=torch.zeros(2, 2)), TypeError, "prev_tokens: expected an integer tensor"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed, generator"),
    (dict(seed=-3), ValueError, r"seed: expected an int in \[0, 2\*\*64\)"),
    (dict(seed=2**70), ValueError, r"seed: expected an int in \[0, 2\*\*64\)"),
    (dict(generator=5), TypeError, "generator: expected a torch.Generator"),
    (dict(do_sample=1), TypeError, "do_sample: expected a bool"),
    (dict(epsilon_cutoff=1.0), ValueError, "epsilon_cutoff: expected a float in \\(0.0, 1.0\\)"),
    (dict(eta_cutoff=0.0), ValueError, "eta_cutoff: expected a float in \\(0.0, 1.0\\)"),
    (dict(logit_bias_only=True), ValueError, "logit_bias: logit_bias_only=True needs the tokens"),
    (dict(logit_bias=torch.zeros(2, 3)), TypeError, "logit_bias: expected a \\(tokens, values\\)"),
    (
        dict(logit_bias=(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))),
        ValueError,
        "logit_bias: expected tokens and values of one shape \\[B, K\\]",
    ),
    (
        dict(logit_bias=(torch.zeros(2, 3), torch.zeros(2, 3))),
        TypeError,
        "logit_bias: expected an integer tensor",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_input_is_refused_with_a_clear_error(kwargs, error, match):
    hidden, weight, _, _ = _batch(vocab=50, rows=2)
    with pytest.raises(error, match=match):
        sample_next(hidden, weight, **kwargs)


def test_greedy_allows_any_temperature_and_bad_shapes_are_refused():
    hidden, weight, _, _ = _batch(vocab=50, rows=2)
    expected = reference.sample_next(hidden, weight, do_sample=False)
    assert torch.equal(sample_next(hidden, weight, do_sample=False, temperature=0.0), expected)
    with pytest.raises(ValueError, match="hidden_last: expected shape \\[B, D\\]"):
        sample_next(hidden[None], weight)
    with pytest.raises(ValueError, match="hidden_last: expected shape \\[B, D\\] with B >= 1"):
        sample_next(hidden[:0], weight)


def test_greedy_logprob_of_a_confident_token():
    """The winner's log-probs are formed as (x - max) - log_sum from the engine's running
    statistics, not x - lse: lse ~ 109 rounded in fp32 would put its 4e-6 error on a log-prob
    of -8.6e-6 (the property suite's head, a bias of 100 lifting lse)."""
    hidden = torch.tensor([[14.0294, 5.6623]])
    weight = torch.tensor([[0.0617, 0.6213], [-0.4519, -0.1661]])
    bias = torch.tensor([100.0, 100.0])
    f64 = [t.double() for t in (hidden, weight, bias)]
    for scale in (None, -1.5):
        out = sample_next(
            hidden, weight, bias=bias, do_sample=False, return_logprobs=True, logit_scale=scale
        )
        naive, exact = (
            reference.model_logits(h, w, bias=b, logit_scale=scale).log_softmax(-1)[0, out.tokens]
            for h, w, b in ((hidden, weight, bias), f64)
        )
        assert_as_accurate(out.raw_logprobs, naive, exact, torch.float32, f"scale {scale}")
        assert_as_accurate(out.logprobs, naive, exact, torch.float32, f"scale {scale}")
