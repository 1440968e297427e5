"""Hostile and degenerate inputs: each gives the naive answer or a named error, and
no answer depends on which GEMM dtype the CPU picks (every test that involves half precision
runs with the block GEMMs forced to the inputs' dtype and to fp32: the ``cpu_gemm`` fixture)."""

from __future__ import annotations

import pytest
import torch

import chunklogits as cl
from chunklogits import reference
from tests.helpers import assert_as_accurate, one_thread, run_ranks, seeded


def _bf16_head(rows: int = 24, dim: int = 16, vocab: int = 700, seed: int = 0):
    """bf16 hidden states and head whose bf16 logits (spacing 1/16 at |z| ~ 4) tie often."""
    g = seeded(seed)
    hidden = torch.randn(rows, dim, generator=g).bfloat16()
    weight = torch.randn(vocab, dim, generator=g).bfloat16()
    bias = (torch.randn(vocab, generator=g) * 0.5).bfloat16()
    return hidden, weight, bias


def test_chunked_ops_leave_torch_rng_alone(cpu_gemm):
    hidden, weight, bias = _bf16_head()
    tokens = torch.randint(0, 700, (24,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    expected = torch.randn(4)
    torch.manual_seed(123)
    cl.linear_cross_entropy(hidden, weight, tokens, bias=bias)
    cl.token_logprobs(hidden, weight, tokens, bias=bias, return_entropy=True)
    cl.logsumexp(hidden, weight, bias=bias)
    cl.sample_next(hidden, weight, bias=bias, do_sample=False)
    cl.sample_next(hidden, weight, bias=bias, top_p=0.8, seed=5)
    assert torch.equal(torch.randn(4), expected)


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
def test_half_precision_greedy_takes_the_model_logits_ties(cpu_gemm, softcap):
    hidden, weight, bias = _bf16_head()
    raw = reference.model_logits(hidden, weight, bias=bias, softcap=softcap).float()
    top = raw.amax(1, keepdim=True)
    assert ((raw == top).sum(1) > 1).any(), "the check needs rows with tied maxima"
    ours = cl.sample_next(hidden, weight, bias=bias, softcap=softcap, do_sample=False, shards=7)
    expected = reference.sample_next(hidden, weight, bias=bias, softcap=softcap, do_sample=False)
    assert torch.equal(ours, expected)


FILTERS = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_k=0, top_p=0.6),
    "min_p": dict(top_k=0, min_p=0.3),
    "all": dict(top_k=12, top_p=0.8, min_p=0.05, temperature=0.7),
}


@pytest.mark.parametrize("options", FILTERS.values(), ids=FILTERS.keys())
def test_half_precision_filters_keep_hf_sets(cpu_gemm, options):
    # The log-prob of the drawn token under the filtered distribution is its score minus the
    # log-sum-exp of the kept scores: a kept set that differs from HF's by one tied token moves
    # it by that token's probability (> 1e-3 here), far beyond fp32 rounding. Which of several
    # tokens tied at top-p's crossing value are kept HF leaves to torch.sort's unstable order
    # (see sampling's doc), so the drawn token is checked against the kept values, not ids.
    hidden, weight, bias = _bf16_head(seed=2)
    ours = cl.sample_next(
        hidden, weight, bias=bias, softcap=3.0, seed=4, shards=5, return_logprobs=True, **options
    )
    raw = reference.model_logits(hidden, weight, bias=bias, softcap=3.0).float()
    scores = reference.next_token_scores(raw, **options)
    temperature = options.get("temperature", 1.0)
    unfiltered = reference.next_token_scores(raw, top_k=0, temperature=temperature)
    value = unfiltered.gather(1, ours.tokens[:, None]).squeeze(1)
    lowest_kept = scores.masked_fill(scores == -torch.inf, torch.inf).amin(1)
    assert (value >= lowest_kept).all(), "a drawn token is below what HF's processors keep"
    torch.testing.assert_close(ours.logprobs, value - scores.logsumexp(-1), rtol=0, atol=2e-5)
    expected_raw = raw.log_softmax(-1).gather(1, ours.tokens[:, None]).squeeze(1)
    torch.testing.assert_close(ours.raw_logprobs, expected_raw, rtol=0, atol=2e-5)


@pytest.mark.usefixtures(one_thread.__name__)
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_bf16_greedy_sample_is_generate_on_both_gemm_paths(cpu_gemm, family):
    from tests.test_generate import PAD, _model, _prompts

    model = _model(family).bfloat16()
    ids, mask = _prompts(rows=6, length=7)
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **options)
        ours = cl.sample(model, ids, mask, shards=3, **options)
    assert torch.equal(ours, expected)


def test_second_order_gradients_are_refused_by_name():
    g = seeded(0)
    hidden = torch.randn(5, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (5,), generator=g)
    for loss in (
        cl.linear_cross_entropy(hidden, weight, labels),
        cl.token_logprobs(hidden, weight, labels, return_entropy=True)[1].sum(),
    ):
        with pytest.raises(RuntimeError, match="create_graph: chunklogits ops have no second"):
            torch.autograd.grad(loss, hidden, create_graph=True)
    # First-order gradients are unaffected.
    (grad,) = torch.autograd.grad(cl.linear_cross_entropy(hidden, weight, labels), hidden)
    (naive,) = torch.autograd.grad(reference.linear_cross_entropy(hidden, weight, labels), hidden)
    torch.testing.assert_close(grad, naive)


@pytest.mark.usefixtures(one_thread.__name__)
def test_second_order_gradients_through_a_wrapped_model_are_refused():
    from transformers import LlamaForCausalLM

    from tests.helpers import tiny_llama_config

    seeded(0)
    model = cl.ChunkedLMHead.wrap(LlamaForCausalLM(tiny_llama_config(vocab=64)))
    ids = torch.randint(0, 64, (2, 6), generator=seeded(1))
    loss = model(ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="create_graph: chunklogits ops have no second"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


BROKEN = {
    "nan_hidden": ("nan", "a NaN logit"),
    "inf_hidden": ("inf", "a logit of \\+inf"),
    "masked_vocabulary": ("mask", "every logit -inf"),
    "temperature_overflow": ("cold", "a logit of \\+inf"),
}
MODES = {
    "greedy": dict(do_sample=False),
    "plain": dict(top_k=0),
    "top_k": dict(top_k=10),
    "top_p": dict(top_k=0, top_p=0.9),
}
# Greedy decoding ignores the temperature (as generate() does): no overflow to refuse there.
BROKEN_CASES = [
    pytest.param(case, options, id=f"{name}-{mode}")
    for name, case in BROKEN.items()
    for mode, options in MODES.items()
    if not (case[0] == "cold" and mode == "greedy")
]


@pytest.mark.parametrize(("case", "options"), BROKEN_CASES)
def test_sampling_refuses_rows_without_a_finite_maximum(case, options):
    breakage, message = case
    g = seeded(3)
    hidden, weight = torch.randn(4, 8, generator=g), torch.randn(300, 8, generator=g)
    bias = torch.zeros(300)
    temperature = 1.0
    if breakage == "nan":
        hidden[2, 3] = torch.nan
    elif breakage == "inf":
        hidden[2, 3] = torch.inf
    elif breakage == "mask":
        bias = torch.full((300,), -torch.inf)
    else:  # logits ~ 10 over 1e-38 overflow fp32
        temperature = 1e-38
    with pytest.raises(ValueError, match=f"hidden_last: .* row [0-9]+ has {message}"):
        cl.sample_next(
            hidden, weight, bias=bias, temperature=temperature, seed=0, shards=3, **options
        )


def test_fully_masked_vocabulary_gives_nan_as_the_naive_path():
    # A -inf bias on every token: no distribution, so NaN log-probs and entropy, lse -inf.
    g = seeded(4)
    hidden, weight = torch.randn(3, 8, generator=g), torch.randn(50, 8, generator=g)
    tokens = torch.tensor([1, 2, 3])
    masked = torch.full((50,), -torch.inf)
    ours = cl.token_logprobs(hidden, weight, tokens, bias=masked, return_entropy=True, shards=4)
    naive = reference.token_logprobs(hidden, weight, tokens, bias=masked, return_entropy=True)
    assert naive[0].isnan().all() and naive[1].isnan().all()
    for o, n in zip(ours, naive, strict=True):
        torch.testing.assert_close(o, n, equal_nan=True)
    lse = cl.logsumexp(hidden, weight, bias=masked, shards=4)
    assert torch.equal(lse, reference.logsumexp(hidden, weight, bias=masked))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_label_dtype_is_accepted(dtype):
    g = seeded(5)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(100, 8, generator=g)
    labels = torch.randint(0, 100, (2, 6), generator=g)
    expected = cl.linear_cross_entropy(hidden, weight, labels, shift=True)
    got = cl.linear_cross_entropy(hidden, weight, labels.to(dtype), shift=True)
    assert torch.equal(got, expected)
    naive = reference.linear_cross_entropy(hidden, weight, labels, shift=True)
    assert_as_accurate(got, naive, naive.double(), torch.float32, "loss")
    logprobs = cl.token_logprobs(hidden, weight, labels.to(dtype))
    assert torch.equal(logprobs, cl.token_logprobs(hidden, weight, labels))


def test_empty_hidden_size_gives_the_naive_answer():
    hidden = torch.zeros(3, 0, requires_grad=True)
    weight = torch.zeros(7, 0, requires_grad=True)
    bias = torch.randn(7, generator=seeded(6), requires_grad=True)
    labels = torch.tensor([0, 3, 6])
    ours = cl.linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none")
    naive = reference.linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none")
    torch.testing.assert_close(ours, naive)
    ours.sum().backward()
    grad_bias = bias.grad.clone()
    bias.grad = None
    naive.sum().backward()
    torch.testing.assert_close(grad_bias, bias.grad)
    lse = cl.logsumexp(hidden, weight)
    torch.testing.assert_close(lse, torch.full((3,), torch.log(torch.tensor(7.0)).item()))


def test_meta_tensors_give_shapes_and_sampling_refuses_them():
    meta = dict(device="meta")
    hidden = torch.empty(2, 5, 8, **meta, requires_grad=True)
    weight = torch.empty(40, 8, **meta, requires_grad=True)
    labels = torch.empty(2, 5, dtype=torch.long, **meta)
    loss = cl.linear_cross_entropy(hidden, weight, labels, shift=True)
    assert loss.shape == () and loss.is_meta
    per_label = cl.linear_cross_entropy(hidden, weight, labels, shift=True, reduction="none")
    assert per_label.shape == (2, 4)
    loss.backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    logprobs, entropy = cl.token_logprobs(hidden, weight, labels, return_entropy=True)
    assert logprobs.shape == entropy.shape == (2, 5)
    with pytest.raises(ValueError, match="hidden_last: expected a tensor with values"):
        cl.sample_next(hidden[0].detach(), weight.detach())


def _dtensor_worker(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = seeded(7)
    hidden, weight = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)
    sharded = distribute_tensor(weight, mesh, [Shard(0)])
    messages = []
    for call in (
        lambda: cl.linear_cross_entropy(hidden, sharded, torch.tensor([1, 2, 3])),
        lambda: cl.logsumexp(hidden, sharded),
    ):
        try:
            call()
        except TypeError as error:
            messages.append(str(error))
    local, _, group = cl.distributed.local_head(sharded, None)
    lse = cl.logsumexp(hidden, local, process_group=group)
    return messages, lse, torch.logsumexp(hidden @ weight.T, -1)


def test_a_dtensor_weight_without_its_group_points_to_local_head():
    for messages, lse, expected in run_ranks(_dtensor_worker, 2):
        assert len(messages) == 2
        assert all("weight: got a DTensor" in m and "local_head" in m for m in messages)
        torch.testing.assert_close(lse, expected)
