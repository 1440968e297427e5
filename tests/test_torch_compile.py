"""``torch.compile`` of the ops and of a wrapped model: one graph, the eager numbers.

Under ``torch.compile`` the differentiable ops are the custom ops of ``chunklogits._library``,
whose implementation and backward run the eager engine: a compiled call gives the eager call's
loss and gradients, up to the rounding of what the compiler fuses around them (the model's own
layers under inductor), and a scalar loss's compiled step runs the eager step's GEMMs. Compiles
cost seconds each (inductor's a minute on a busy CPU): tiny models, one inductor compile,
``torch._dynamo.reset()`` before each test."""

from __future__ import annotations

import copy

import pytest
import torch

import chunklogits as cl
from chunklogits import _library
from tests.helpers import (  # noqa: F401
    one_thread,
    per_position_temperature,
    seeded,
    tiny_llama_config,
)

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
    "mean-temperature-tensor": {"temperature": per_position_temperature((2, 9)), "shift": True},
    "sum-temperature-flat-recomputing": {
        "reduction": "sum",
        "temperature": per_position_temperature(18),
        "softcap": 4.0,
        "grad_in_forward": False,
    },
    "mean-temperature-float-fused": {"temperature": 0.6, "grad_in_forward": True},
    "none-temperature-tensor": {
        "reduction": "none",
        "temperature": per_position_temperature((2, 9)),
    },
    "none-temperature-float": {"reduction": "none", "temperature": 1.7, "softcap": 2.0},
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


@pytest.mark.parametrize("temperature", ["float", "tensor", "flat"])
def test_compiled_token_logprobs_are_the_eager_ones(temperature):
    hidden, weight, bias, _, labels = head()
    tokens, advantages = labels.clamp(min=0), torch.randn(2, 9, generator=seeded(4))
    temperature = {
        "float": 0.7,
        "tensor": per_position_temperature((2, 9)),
        "flat": per_position_temperature(18),
    }[temperature]

    def objective(hidden, weight, bias):
        logprobs, entropy = cl.token_logprobs(
            hidden,
            weight,
            tokens,
            bias=bias,
            temperature=temperature,
            return_entropy=True,
            softcap=4.0,
        )
        return (logprobs * advantages).sum() + 0.1 * entropy.sum()

    compiled, eager = compiled_and_eager(objective, [hidden, weight, bias])
    names = ["value", "hidden", "weight", "bias"]
    for name, ours, theirs in zip(names, compiled, eager, strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_compiled_loss_backward_may_run_twice(grad_in_forward):
    # The scalar loss's gradients come from its forward call, saved, and are scaled by the
    # incoming gradient out of place: a second backward of a retained graph finds them intact.
    hidden, weight, bias, class_weight, labels = head(grad_class_weight=True)
    leaves, temperature = [hidden, weight, bias, class_weight], per_position_temperature((2, 9))

    def loss(hidden, weight, bias, class_weight):
        return cl.linear_cross_entropy(
            hidden, weight, labels, bias=bias, class_weight=class_weight,
            temperature=temperature, grad_in_forward=grad_in_forward,
        )  # fmt: skip

    eager = torch.autograd.grad(loss(*leaves), leaves)
    value = torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves)
    first = torch.autograd.grad(2.5 * value, leaves, retain_graph=True)
    second = torch.autograd.grad(value, leaves)
    names = ["hidden", "weight", "bias", "class_weight"]
    for name, ours_first, ours_second, theirs in zip(names, first, second, eager, strict=True):
        torch.testing.assert_close(ours_first, 2.5 * theirs, msg=f"{name}, first backward")
        torch.testing.assert_close(ours_second, theirs, msg=f"{name}, second backward")
        assert torch.equal(ours_first, 2.5 * ours_second), name


GRADCHECK_CASES = {
    "mean-temperature-tensor-class-weight": {"temperature": True, "class_weight": True},
    "sum-softcap-recomputing": {"reduction": "sum", "softcap": 2.0, "grad_in_forward": False},
    "none-temperature-float-shift": {"reduction": "none", "temperature": 0.6, "shift": True},
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_compiled_loss_passes_gradcheck(case):
    # fp64 finite differences of the compiled loss against its backward (and that backward
    # run twice gives the same gradients): both custom-op paths, the scalar loss's and "none"'s.
    options = dict(GRADCHECK_CASES[case])
    g = seeded(8)
    hidden = torch.randn(2, 3, 6, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(13, 6, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(13, dtype=torch.float64, generator=g).requires_grad_()
    labels = torch.randint(0, 13, (2, 3), generator=g)
    labels[0, 1] = -100
    leaves = [hidden, weight, bias]
    if options.pop("class_weight", False):
        leaves.append(torch.rand(13, dtype=torch.float64, generator=g).requires_grad_())
    if options.get("temperature") is True:
        options["temperature"] = per_position_temperature((2, 3)).double()

    def loss(hidden, weight, bias, class_weight=None):
        return cl.linear_cross_entropy(
            hidden, weight, labels, bias=bias, class_weight=class_weight, shards=2, **options
        )

    run = torch.compile(loss, fullgraph=True, backend="aot_eager")
    assert torch.autograd.gradcheck(run, leaves)


def test_compiled_token_logprobs_pass_gradcheck():
    g = seeded(8)
    hidden = torch.randn(2, 3, 6, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(13, 6, dtype=torch.float64, generator=g).requires_grad_()
    tokens = torch.randint(0, 13, (2, 3), generator=g)
    temperature = per_position_temperature(6).double()

    def logprobs(hidden, weight):
        return cl.token_logprobs(
            hidden, weight, tokens, temperature=temperature, return_entropy=True, softcap=3.0
        )

    run = torch.compile(logprobs, fullgraph=True, backend="aot_eager")
    assert torch.autograd.gradcheck(run, (hidden, weight))


def gemm_flops(step) -> int:
    """The flops of the GEMMs ``step()`` runs (``aten::mm``, ``addmm``, ``addmm_``; those
    inside the custom ops included), from the operand shapes the profiler records."""
    operands = {"aten::mm": slice(0, 2), "aten::addmm": slice(1, 3), "aten::addmm_": slice(1, 3)}
    with torch.profiler.profile(record_shapes=True) as profile:
        step()
    flops = 0
    for event in profile.events():
        if event.name in operands:
            (m, k), (_, n) = event.input_shapes[operands[event.name]]
            flops += 2 * m * k * n
    return flops


@pytest.mark.parametrize(
    "options, eager_nvd, compiled_nvd",
    [
        ({"grad_in_forward": None}, 6, 6),  # the default picks the fused pass here (fp32, CPU)
        ({"grad_in_forward": False, "temperature": per_position_temperature((2, 9))}, 8, 8),
        ({"reduction": "none"}, 8, 10),  # the backward op runs the forward again
    ],
)
def test_compiled_step_runs_the_eager_gemms(options, eager_nvd, compiled_nvd):
    hidden, weight, bias, _, labels = head()

    def loss(hidden, weight, bias):
        return cl.linear_cross_entropy(hidden, weight, labels, bias=bias, shards=3, **options)

    def step(run):
        return lambda: run(hidden, weight, bias).sum().backward()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    step(compiled)()  # compiles, outside the count
    nvd = int((labels != -100).sum()) * VOCAB * hidden.shape[-1]
    assert gemm_flops(step(loss)) == eager_nvd * nvd
    assert gemm_flops(step(compiled)) == compiled_nvd * nvd


def test_bad_input_fails_loudly_when_compiled():
    # The range checks that read values run inside the custom op, when the graph runs.
    hidden, weight, _, _, labels = head()
    labels[1, 2] = VOCAB
    run = torch.compile(cl.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=rf"labels: expected values in \[0, {VOCAB}\)"):
        run(hidden, weight, labels)
    with pytest.raises(ValueError, match="num_items_in_batch: expected a positive count"):
        run(hidden, weight, labels.clamp(max=0), num_items_in_batch=torch.tensor(0))
    temperature = per_position_temperature((2, 9))
    temperature[0, 4] = 0.0
    with pytest.raises(ValueError, match="temperature: expected finite values >= "):
        run(hidden, weight, labels.clamp(max=0), temperature=temperature)
    logprobs = torch.compile(cl.token_logprobs, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="temperature: expected finite values >= "):
        logprobs(hidden, weight, labels.clamp(min=0), temperature=temperature.flatten())
    # A check that reads no value fails while dynamo traces: with fullgraph it reports the
    # ValueError as an "Observed exception", without it the call runs eagerly and raises it.
    with pytest.raises(ValueError, match="reduction: expected one of"):
        torch.compile(cl.linear_cross_entropy, backend="aot_eager")(
            hidden, weight, labels.clamp(max=0), reduction="avg"
        )


def opcheck_arguments():
    hidden, weight, bias, class_weight, labels = head(grad_class_weight=True)
    temperatures = 0.5 + torch.rand(2, 9, generator=seeded(6))
    # Inputs of other strides than contiguous ones: the gradients are contiguous all the same.
    strided = hidden.detach().permute(2, 1, 0).contiguous().permute(2, 1, 0).requires_grad_()
    strided_weight = weight.detach().T.contiguous().T.requires_grad_()
    loss = _library.linear_cross_entropy
    with_grads = _library.linear_cross_entropy_and_grads
    logprobs = _library.token_logprobs
    common = (None, -100)
    return [
        (loss, (strided, strided_weight, labels, bias, None, None, 3, *common, "none", 0.0,
                0.0, 5.0, None, 1.0, temperatures, True, None)),
        (loss, (hidden, weight, labels, None, class_weight, torch.tensor(9.0), None, *common,
                "mean", 0.0, 1e-3, None, 2.0, 0.8, None, False, None)),
        (with_grads, ([True, True, True, False], strided, strided_weight, labels, bias, None,
                      None, 3, *common, "sum", 0.1, 0.0, 5.0, None, 1.0, temperatures.flatten(),
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
