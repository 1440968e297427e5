"""ChunkedLMHead as a module: it shares the Parameters it is given, calling it is nn.Linear, and its
loss / token_logprobs are the reference ops with the head's transform, values and gradients."""

import pytest
import torch
from torch import nn

import chunklogits as cl
from chunklogits import reference
from tests.helpers import assert_as_accurate, seeded

V, D = 507, 48  # odd sizes, so shards are uneven

TRANSFORMS = {
    "plain": {},
    "softcap": {"softcap": 0.7},
    "scaled": {"logit_scale": 3.0},
    "both": {"softcap": 1.5, "logit_scale": 0.5},
}


def _inputs(dtype, bias: bool, seed: int = 0):
    g = seeded(seed)
    hidden = torch.randn(3, 7, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None
    return hidden, weight, b


def _leaves(tensors, dtype):
    return [None if t is None else nn.Parameter(t.to(dtype, copy=True)) for t in tensors]


def test_shares_parameters_and_state_dict_keys():
    linear = nn.Linear(D, V, bias=True)
    head = cl.ChunkedLMHead(linear.weight, linear.bias, shards=5)
    assert head.weight is linear.weight and head.bias is linear.bias
    assert list(head.state_dict()) == list(linear.state_dict())
    no_bias = cl.ChunkedLMHead(torch.randn(V, D))
    assert isinstance(no_bias.weight, nn.Parameter) and no_bias.bias is None
    assert list(no_bias.state_dict()) == ["weight"]


@pytest.mark.parametrize("bias", [False, True])
def test_call_is_the_linear_layer(bias):
    linear = nn.Linear(D, V, bias=bias).to(torch.bfloat16)
    head = cl.ChunkedLMHead(linear.weight, linear.bias, softcap=2.0, logit_scale=3.0)
    hidden = torch.randn(2, 5, D, dtype=torch.bfloat16)
    logits = head(hidden)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, linear(hidden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("bias", [False, True])
def test_loss_values_and_gradients(dtype, transform, bias):
    options = TRANSFORMS[transform]
    hidden, weight, b = _inputs(dtype, bias)
    labels = torch.randint(V, hidden.shape[:-1], generator=seeded(1))
    labels[0, :3] = -100
    num_items = torch.tensor(17)

    results = {}
    for name, precision in (("ours", dtype), ("naive", dtype), ("exact", torch.float64)):
        h, w, bb = _leaves((hidden, weight, b), precision)
        if name == "ours":
            head = cl.ChunkedLMHead(w, bb, shards=3, **options)
            loss = head.loss(h, labels, shift=True, num_items_in_batch=num_items)
        else:
            loss = reference.linear_cross_entropy(
                h, w, labels, bias=bb, shift=True, num_items_in_batch=num_items, **options
            )
        loss.backward()
        results[name] = [loss, h.grad, w.grad] + ([bb.grad] if bias else [])
    for what, ours, naive, exact in zip(
        ("loss", "hidden", "weight", "bias"), *results.values(), strict=False
    ):
        assert_as_accurate(ours, naive, exact, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", ["plain", "both"])
def test_token_logprobs_and_entropy(dtype, transform):
    options = TRANSFORMS[transform]
    hidden, weight, b = _inputs(dtype, bias=True, seed=2)
    tokens = torch.randint(V, hidden.shape[:-1], generator=seeded(3))

    results = {}
    for name, precision in (("ours", dtype), ("naive", dtype), ("exact", torch.float64)):
        h, w, bb = _leaves((hidden, weight, b), precision)
        if name == "ours":
            head = cl.ChunkedLMHead(w, bb, shards=4, **options)
            logprobs, entropy = head.token_logprobs(h, tokens, temperature=0.7, return_entropy=True)
        else:
            logprobs, entropy = reference.token_logprobs(
                h, w, tokens, bias=bb, temperature=0.7, return_entropy=True, **options
            )
        (logprobs.sum() + 0.5 * entropy.sum()).backward()
        results[name] = [logprobs, entropy, h.grad, w.grad, bb.grad]
    names = ("logprobs", "entropy", "hidden", "weight", "bias")
    for what, ours, naive, exact in zip(names, *results.values(), strict=True):
        assert_as_accurate(ours, naive, exact, dtype, what)


def test_shards_do_not_change_the_loss():
    hidden, weight, _ = _inputs(torch.float64, bias=False)
    labels = torch.randint(V, hidden.shape[:-1], generator=seeded(4))
    losses = [cl.ChunkedLMHead(weight, shards=s).loss(hidden, labels) for s in (None, 1, 7, V)]
    expected = reference.linear_cross_entropy(hidden, weight, labels)
    for loss in losses:
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weight": [[1.0]]}, TypeError, "weight: expected a torch.Tensor"),
        ({"weight": torch.randn(V)}, ValueError, "weight: expected shape"),
        ({"bias": torch.randn(V + 1)}, ValueError, "bias: expected shape"),
        ({"shards": 0}, ValueError, "shards: expected an int in"),
        ({"shards": V + 1}, ValueError, "shards: expected an int in"),
        ({"shards": 2.5}, TypeError, "shards: expected an int or None"),
        ({"softcap": -1.0}, ValueError, "softcap: expected a finite float > 0"),
        ({"logit_scale": 0.0}, ValueError, "logit_scale: expected a finite non-zero float"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    arguments = {"weight": torch.randn(V, D), "bias": None, **kwargs}
    with pytest.raises(error, match=message):
        cl.ChunkedLMHead(**arguments)


def test_labels_outside_the_vocabulary():
    head = cl.ChunkedLMHead(torch.randn(V, D))
    hidden = torch.randn(2, 4, D)
    labels = torch.full((2, 4), 3)
    labels[1, 2] = V
    with pytest.raises(ValueError, match=rf"labels: expected values in \[0, {V}\).*got {V}"):
        head.loss(hidden, labels)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_sample_next_is_the_sampler_with_the_heads_transform(transform):
    options = TRANSFORMS[transform]
    hidden, weight, b = _inputs(torch.float32, bias=True, seed=3)
    hidden_last, weight, b = hidden[:, -1].float(), weight.float(), b.float()
    # Parameters that require grad, as a model's: sampling runs without autograd.
    head = cl.ChunkedLMHead(nn.Parameter(weight), nn.Parameter(b), shards=4, **options)
    prev = torch.randint(V, (3, 5), generator=seeded(4))
    greedy = head.sample_next(
        hidden_last, do_sample=False, repetition_penalty=1.3, prev_tokens=prev
    )
    naive = reference.sample_next(
        hidden_last,
        weight,
        bias=b,
        do_sample=False,
        repetition_penalty=1.3,
        prev_tokens=prev,
        **options,
    )
    assert torch.equal(greedy, naive)
    drawn = head.sample_next(
        hidden_last, temperature=0.7, top_k=20, top_p=0.9, seed=11, return_logprobs=True
    )
    same = cl.sample_next(
        hidden_last,
        weight,
        bias=b,
        shards=4,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        seed=11,
        return_logprobs=True,
        **options,
    )
    for ours, expected in zip(drawn, same, strict=True):
        assert torch.equal(ours, expected)
    raw = reference.token_logprobs(hidden_last, weight, drawn.tokens, bias=b, **options)
    torch.testing.assert_close(drawn.raw_logprobs, raw)


def test_a_computed_weight_keeps_its_graph():
    """``ChunkedLMHead(W + B @ A)`` (a merged LoRA weight) keeps that tensor instead of making a
    new leaf Parameter of it: A and B get the gradients of the naive head."""
    g = seeded(4)
    base = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    a0 = torch.randn(4, D, generator=g, dtype=torch.float64) * 0.2
    b0 = torch.randn(V, 4, generator=g, dtype=torch.float64) * 0.2
    hidden = torch.randn(9, D, generator=g, dtype=torch.float64)
    labels = torch.randint(V, (9,), generator=g)
    results = {}
    for name, precision in (
        ("ours", torch.float32),
        ("naive", torch.float32),
        ("exact", torch.float64),
    ):
        a, b = _leaves((a0, b0), precision)
        weight = base.to(precision) + b @ a
        if name == "ours":
            head = cl.ChunkedLMHead(weight, shards=3)
            assert head.weight is weight and list(head.parameters()) == []
            loss = head.loss(hidden.to(precision), labels)
        else:
            loss = reference.linear_cross_entropy(hidden.to(precision), weight, labels)
        loss.backward()
        results[name] = [loss, a.grad, b.grad]
    for what, ours, naive, exact in zip(("loss", "A", "B"), *results.values(), strict=True):
        assert_as_accurate(ours, naive, exact, torch.float32, what)
