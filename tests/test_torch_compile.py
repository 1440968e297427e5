"""``torch.compile`` of the ops and of a wrapped model: one graph, the eager numbers.

Under ``torch.compile`` the differentiable ops are the custom ops of ``chunklogits._library``,
whose implementation and backward run the eager engine: a compiled call gives the eager call's
loss and gradients, up to the rounding of what the compiler fuses around them (the model's own
layers under inductor). Compiles cost seconds each (inductor's a minute on a busy CPU): tiny
models, one inductor compile, ``torch._dynamo.reset()`` before each test."""

from __future__ import annotations

import copy

import pytest
import torch

import chunklogits as cl
from chunklogits import _library
from tests.helpers import one_thread, seeded, tiny_llama_config  # noqa: F401

VOCAB = 211


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def head(grad_class_weight: bool = False):
    """hidden ``[2, 9, 24]``, weight ``[211, 24]``, bias, class weights and labels (some
    ignored), leaves that require grad."""
    g = seeded(3)
    hidden = torch.randn(2, 9, 24, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, 24, generator=g) / 24**0.5).requires_grad_()
    bias = (torch.randn(VOCAB, generator=g) * 0.1).requires_grad_()
    class_weight = torch.rand(VOCAB, generator=g).requires_grad_(grad_class_weight)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[0, :3] = -100
    return hidden, weight, bias, class_weight, labels


def compiled_and_eager(fn, leaves, backend="aot_eager"):
    """``[value, *gradients of leaves]`` of ``fn(*leaves)`` (a scalar), compiled whole
    (``fullgraph``) and eager."""
    results = []
    for run in (torch.compile(fn, fullgraph=True, backend=backend), fn):
        value = run(*leaves)
        results.append([value.detach(), *torch.autograd.grad(value, leaves)])
    return results


LOSS_CASES = {
    "mean-shift-softcap": {"shift": True, "softcap": 5.0, "logit_scale": 1.5},
    "sum-smoothing-zloss": {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3},
    "none-class-weight": {"reduction": "none", "class_weight": True},
    "num-items-tensor": {"num_items_in_batch": torch.tensor(11), "shift": True},
    "num-items-int-fused": {"num_items_in_batch": 7, "grad_in_forward": True},
}


@pytest.mark.parametrize(
    "case, backend",
    [(case, "aot_eager") for case in LOSS_CASES] + [(next(iter(LOSS_CASES)), "inductor")],
)
def test_compiled_loss_is_the_eager_loss(case, backend):
    options = dict(LOSS_CASES[case])
    hidden, weight, bias, class_weight, labels = head(grad_class_weight=True)
    leaves = [hidden, weight, bias]
    if options.pop("class_weight", False):
        options["class_weight"] = class_weight
        leaves.append(class_weight)
    advantages = torch.randn(2, 9, generator=seeded(4))

    def loss(hidden, weight, bias, *rest):
        value = cl.linear_cross_entropy(hidden, weight, labels, bias=bias, shards=3, **options)
        return value if value.dim() == 0 else (value * advantages).sum()

    compiled, eager = compiled_and_eager(loss, leaves, backend)
    names = ["loss", "hidden", "weight", "bias", "class_weight"][: len(eager)]
    for name, ours, theirs in zip(names, compiled, eager, strict=True):
        torch.testing.assert_close(ours, theirs, msg=f"{case}: {name}")


def test_compiled_token_logprobs_are_the_eager_ones():
    hidden, weight, bias, _, labels = head()
    tokens, advantages = labels.clamp(min=0), torch.randn(2, 9, generator=seeded(4))

    def objective(hidden, weight, bias):
        logprobs, entropy = cl.token_logprobs(
            hidden, weight, tokens, bias=bias, temperature=0.7, return_entropy=True, softcap=4.0
        )
        return (logprobs * advantages).sum() + 0.1 * entropy.sum()

    compiled, eager = compiled_and_eager(objective, [hidden, weight, bias])
    names = ["value", "hidden", "weight", "bias"]
    for name, ours, theirs in zip(names, compiled, eager, strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_bad_input_fails_loudly_when_compiled():
    # The range checks that read values run inside the custom op, when the graph runs.
    hidden, weight, _, _, labels = head()
    labels[1, 2] = VOCAB
    run = torch.compile(cl.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=rf"labels: expected values in \[0, {VOCAB}\)"):
        run(hidden, weight, labels)
    with pytest.raises(ValueError, match="num_items_in_batch: expected a positive count"):
        run(hidden, weight, labels.clamp(max=0), num_items_in_batch=torch.tensor(0))
    # A check that reads no value fails while dynamo traces: with fullgraph it reports the
    # ValueError as an "Observed exception", without it the call runs eagerly and raises it.
    with pytest.raises(ValueError, match="reduction: expected one of"):
        torch.compile(cl.linear_cross_entropy, backend="aot_eager")(
            hidden, weight, labels.clamp(max=0), reduction="avg"
        )


def opcheck_arguments():
    hidden, weight, bias, class_weight, labels = head(grad_class_weight=True)
    temperatures = 0.5 + torch.rand(2, 9, generator=seeded(6))
    loss = _library.linear_cross_entropy
    with_grads = _library.linear_cross_entropy_and_grads
    logprobs = _library.token_logprobs
    common = (None, -100)
    return [
        (loss, (hidden, weight, labels, bias, None, None, 3, *common, "none", 0.0, 0.0, 5.0,
                None, 1.0, temperatures, True, None)),
        (loss, (hidden, weight, labels, None, class_weight, torch.tensor(9.0), None, *common,
                "mean", 0.0, 1e-3, None, 2.0, 0.8, None, False, None)),
        (with_grads, ([True, True, True, False], hidden, weight, labels, bias, None, None, 3, *common, "sum", 0.1, 0.0, 5.0, None, 1.0, temperatures.flatten(),
                      True, False)),
        (with_grads, ([False, True, False, True], hidden, weight, labels, None, class_weight,
                      torch.tensor(9.0), None, *common, "mean", 0.0, 1e-3, None, 2.0, 0.8, None,
                      False, None)),
        (logprobs, (hidden, weight, labels.clamp(min=0), bias, 0.7, None, True, 3.0, None, 2,
                    None)),
        (logprobs, (hidden, weight, labels.clamp(min=0), None, 1.0, temperatures, False, None,
                    None, None, 4)),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(6))
def test_custom_ops_pass_opcheck(index):
    op, arguments = opcheck_arguments()[index]
    results = torch.library.opcheck(op, arguments)
    assert set(results.values()) == {"SUCCESS"}, results


def tiny_model(kind: str, layers: int = 2):
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    if kind == "llama":
        config = tiny_llama_config(VOCAB, layers, hidden=64)
    else:
        config = Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=0.5,  # small: the softcap changes the loss a lot
        )
    return cl.ChunkedLMHead.wrap(AutoModelForCausalLM.from_config(config).train(), shards=4)


def batch():
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=seeded(5))
    labels = input_ids.clone()
    labels[0, :4] = -100
    return {"input_ids": input_ids, "labels": labels}


def test_wrapped_model_is_one_graph(one_thread):  # noqa: F811
    model = tiny_model("llama")
    explained = torch._dynamo.explain(model)(**batch())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained


@pytest.mark.parametrize(
    "kind, backend", [("llama", "aot_eager"), ("gemma2", "aot_eager"), ("llama", "inductor")]
)
def test_compiled_training_steps_are_the_eager_ones(one_thread, kind, backend):  # noqa: F811
    # Three SGD steps of the wrapped model compiled whole (fullgraph) and eager: the same loss
    # and gradient of every parameter at each step, and the same parameters after. Inductor
    # compiles a layer's kernels for a minute on a busy CPU: one layer there.
    eager = tiny_model(kind, layers=1 if backend == "inductor" else 2)
    model = copy.deepcopy(eager)
    step = torch.compile(model, fullgraph=True, backend=backend)
    # SGD: an update proportional to the gradient. Adam's g / sqrt(v) turns the last-bit
    # differences of inductor's fused kernels in a near-zero gradient entry into lr-sized ones.
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, eager)]
    inputs = batch()
    for index in range(3):
        losses = []
        for run, optimizer in zip((step, eager), optimizers, strict=True):
            optimizer.zero_grad()
            loss = run(**inputs).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], msg=f"loss, step {index}")
        for (name, ours), theirs in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(ours.grad, theirs.grad, msg=f"{name}.grad, step {index}")
        for optimizer in optimizers:
            optimizer.step()
    for (name, ours), theirs in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)
