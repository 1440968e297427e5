"""ChunkedLMHead.wrap / unwrap and sequence_logprobs on tiny random transformers models, against the
unwrapped model itself: loss and gradients (accuracy rule), outputs, generate(), files, Trainer."""

import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

import chunklogits as cl
from chunklogits import reference
from tests.helpers import (
    assert_as_accurate,
    assert_as_accurate_in_norm,
    one_thread,
    per_position_temperature,
    seeded,
    training_arguments,
)

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

VOCAB = 311
_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# Config class and arguments per family (classes looked up by name, so that this file runs on
# transformers versions that lack some). Random-init logits are O(0.1): the transforms are set so
# that they change the result visibly.
FAMILIES = {
    "llama": ("LlamaConfig", _SIZES),  # untied input and output embeddings, as Llama 3
    "llama-tied": ("LlamaConfig", {**_SIZES, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", _SIZES),
    "qwen2": ("Qwen2Config", {**_SIZES, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {**_SIZES, "head_dim": 8, "final_logit_softcapping": 0.2}),
    "gemma3": ("Gemma3TextConfig", {**_SIZES, "head_dim": 8, "final_logit_softcapping": 0.2}),
    "cohere": ("CohereConfig", {**_SIZES, "logit_scale": 5.0}),
    "granite": ("GraniteConfig", {**_SIZES, "logits_scaling": 0.2}),
    "phi-biased": ("PhiConfig", {**_SIZES, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "gpt2": (
        "GPT2Config",
        {
            "vocab_size": VOCAB,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 64,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "mixtral-router-loss": (
        "MixtralConfig",
        {**_SIZES, "num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True},
    ),
}
ACCURACY_FAMILIES = [f for f in FAMILIES if f != "mixtral-router-loss"]


def _config(family: str):
    name, arguments = FAMILIES[family]
    config_class = getattr(transformers, name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return config_class(**arguments)


def _model(family: str, dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager")
    return model.to(dtype)


def _batch(seed: int = 0, shape=(3, 13)):
    g = seeded(seed)
    input_ids = torch.randint(3, VOCAB, shape, generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[-1, -5:] = -100  # padding
    return input_ids, labels


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient; those the loss does not reach (a vision tower's layers after
    the one whose features a vision-language model takes) have none."""
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _keep_input(kept: list, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: keep a module's input, with its gradient."""
    args[0].retain_grad()
    kept.append(args[0])


def _compare_with_unwrapped(
    family, dtype, run, *, autocast: bool = False, exact: nn.Module | None = None, **wrap_options
):
    """Results and gradients of the wrapped model in ``dtype`` against the unwrapped one in the
    same dtype and the fp64 model (``exact``, by default ``family``'s). ``run(name, model)``
    returns the results to compare (a dict) and the scalar to differentiate; ``name`` is "ours"
    for the wrapped model. ``autocast``: fp32 weights under bf16 autocast, as
    ``Trainer(bf16=True)`` runs them.

    Elementwise accuracy rule: the results and the gradient of the hidden states that enter the
    output layer (what the wrapped head computes and hands back to the model), the output layer's
    weight gradient when it is not tied, and in fp32 every parameter's gradient. In half
    precision the gradients upstream of the head also go through the model's own half-precision
    backward in both runs, whose roundings then differ element by element (and per tensor by up
    to 1.5x either way); they are held to the rule as one vector, in norm
    (``assert_as_accurate_in_norm``)."""
    if exact is None:
        exact = _model(family, torch.float64)
    naive = copy.deepcopy(exact).to(torch.float32 if autocast else dtype)
    ours = cl.ChunkedLMHead.wrap(copy.deepcopy(naive), **wrap_options)
    results = {}
    for name, model in (("ours", ours), ("naive", naive), ("exact", exact)):
        head_inputs = []
        hook = model.get_output_embeddings().register_forward_pre_hook(
            functools.partial(_keep_input, head_inputs)
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and name != "exact"):
            outputs, objective = run(name, model)
        hook.remove()
        objective.backward()
        (head_input,) = head_inputs
        results[name] = {**outputs, "head input": head_input.grad, **_grads(model)}
    elementwise = [*outputs, "head input"]
    if ours.lm_head.weight is not ours.get_input_embeddings().weight:
        elementwise += [k for k in results["exact"] if k.endswith("lm_head.weight")]
    precision = torch.bfloat16 if autocast else dtype
    if precision == torch.float32:
        elementwise = list(results["exact"])
    # A gradient that vanishes in exact arithmetic (a key projection's bias: the softmax ignores
    # a shift shared by all keys) cancels terms of the model's gradients: it is held to the slack
    # of their magnitude, the largest gradient's, not of its own fp64 rounding.
    largest = max(g.abs().max().item() for k, g in results["exact"].items() if k not in outputs)
    for key in elementwise:
        vanishing = results["exact"][key].abs().max().item() <= 1e-12 * largest
        assert_as_accurate(
            *(r[key] for r in results.values()),
            precision,
            f"{family} {key}",
            scale=largest if vanishing else None,
        )
    upstream = [key for key in results["exact"] if key not in elementwise]
    if upstream:
        vectors = (
            torch.cat([r[key].flatten().double() for key in upstream]) for r in results.values()
        )
        assert_as_accurate_in_norm(*vectors, precision, f"{family} upstream gradients")


def _training_loss(name, model):
    input_ids, labels = _batch()
    loss = model(input_ids=input_ids, labels=labels).loss
    if name == "ours":
        assert loss.dtype == torch.float32
    return {"loss": loss}, loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ACCURACY_FAMILIES)
def test_loss_and_every_gradient_match_the_unwrapped_model(family, dtype):
    _compare_with_unwrapped(family, dtype, _training_loss, shards=3)


def test_mixed_precision_autocast():
    _compare_with_unwrapped("gemma2", torch.float32, _training_loss, autocast=True)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_outputs_without_labels_are_the_original(family):
    model = _model(family).eval()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    input_ids, _ = _batch()
    mask = torch.ones_like(input_ids)
    mask[2, -5:] = 0
    cases = [{}, {"attention_mask": mask}]
    if (
        "logits_to_keep" in inspect.signature(type(model).forward).parameters
    ):  # transformers >= 4.49
        cases.append({"logits_to_keep": 1})
    for kwargs in cases:
        theirs, ours = model(input_ids, **kwargs), wrapped(input_ids, **kwargs)
        assert ours.logits.dtype == theirs.logits.dtype
        assert torch.equal(ours.logits, theirs.logits)
    theirs, ours = model(input_ids, return_dict=False), wrapped(input_ids, return_dict=False)
    assert isinstance(ours, tuple) and torch.equal(ours[0], theirs[0])


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "phi-biased"])
def test_greedy_generate_unchanged(family):
    model = _model(family).eval()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    input_ids, _ = _batch(shape=(2, 5))
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    expected = model.generate(input_ids, **options)
    assert expected.shape == (2, 13)
    assert torch.equal(wrapped.generate(input_ids, **options), expected)


def test_logits_with_labels_in_evaluation_only_unless_asked():
    """With labels: the original's logits in an evaluation, eval mode with autograd off (what
    Trainer.evaluate hands to compute_metrics); none in training mode, nor with autograd on in
    eval mode (from_pretrained's mode: a loss to backpropagate); return_logits=True / False:
    always / never."""
    model = _model("gemma2").eval()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    input_ids, labels = _batch()
    theirs = model(input_ids, labels=labels)
    cases = [("train", False, False), ("train", True, False), ("eval", True, False)]
    for mode, grad, expect_logits in [*cases, ("eval", False, True)]:
        getattr(wrapped, mode)()
        with torch.set_grad_enabled(grad):
            ours = wrapped(input_ids, labels=labels)
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=0)
        assert ours.loss.requires_grad == grad
        if expect_logits:
            assert torch.equal(ours.logits, theirs.logits)
        else:
            assert ours.logits is None and "logits" not in ours
    wrapped.train()
    wrapped.lm_head.return_logits = True
    assert torch.equal(wrapped(input_ids, labels=labels).logits, theirs.logits)
    wrapped.eval()
    wrapped.lm_head.return_logits = False
    assert wrapped(input_ids, labels=labels).logits is None
    also = cl.ChunkedLMHead.wrap(copy.deepcopy(model).train(), return_logits=True)
    assert torch.equal(also(input_ids, labels=labels).logits, theirs.logits)


def test_tuple_outputs_keep_the_positions_of_the_original():
    """return_dict=False with labels: (loss, logits, cache, ...) as the original's tuple, with
    None at index 1 where the logits are not computed (never the cache in their place)."""
    model = _model("llama").eval()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    input_ids, labels = _batch()
    theirs = model(input_ids, labels=labels, return_dict=False)
    for mode, logits in (("eval", theirs[1]), ("train", None)):
        getattr(wrapped, mode)()
        with torch.no_grad():
            ours = wrapped(input_ids, labels=labels, return_dict=False)
        assert isinstance(ours, tuple) and len(ours) == len(theirs) == 3
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=0)
        assert ours[1] is None if logits is None else torch.equal(ours[1], logits)
        assert type(ours[2]) is type(theirs[2])  # the cache, where the original has it


def test_loss_arguments_follow_for_causal_lm_loss():
    """num_items_in_batch, shift_labels, positional labels and labels on a float batch."""
    model = _model("llama").eval()
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    input_ids, labels = _batch()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    cases = [
        {"labels": labels, "num_items_in_batch": torch.tensor(50)},
        {"labels": labels, "num_items_in_batch": 7},
        {"labels": labels, "shift_labels": shifted},
    ]
    for kwargs in cases:
        torch.testing.assert_close(
            wrapped(input_ids, **kwargs).loss, model(input_ids, **kwargs).loss, rtol=1e-5, atol=0
        )
    # labels is LlamaForCausalLM.forward's 6th positional parameter.
    positional = wrapped(input_ids, None, None, None, None, labels)
    torch.testing.assert_close(
        positional.loss, model(input_ids, labels=labels).loss, rtol=1e-5, atol=0
    )


def test_no_grad_evaluation():
    model = _model("cohere")
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model))
    input_ids, labels = _batch()
    with torch.no_grad():
        theirs, ours = model(input_ids, labels=labels), wrapped(input_ids, labels=labels)
    assert not ours.loss.requires_grad
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", ["llama", "llama-tied", "gpt2"])
def test_parameters_tying_and_saved_files_unchanged(family, tmp_path):
    model = _model(family)
    keys = list(model.state_dict())
    parameters = list(model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = model.lm_head.weight is embedding
    assert tied == (family != "llama")
    cl.ChunkedLMHead.wrap(model)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert (model.lm_head.weight is embedding) == tied

    model.save_pretrained(tmp_path / "wrapped")
    cl.ChunkedLMHead.unwrap(model)
    model.save_pretrained(tmp_path / "plain")
    wrapped_files = sorted(p.name for p in (tmp_path / "wrapped").iterdir())
    assert wrapped_files == sorted(p.name for p in (tmp_path / "plain").iterdir())
    for name in wrapped_files:
        if name.endswith(".safetensors"):
            assert (tmp_path / "wrapped" / name).read_bytes() == (
                tmp_path / "plain" / name
            ).read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "wrapped")
    assert type(loaded.lm_head) is nn.Linear
    expected = model.state_dict()
    assert list(loaded.state_dict()) == keys
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_unwrap_restores_module_and_forward():
    model = _model("gemma2").eval()
    original_head = model.lm_head
    untouched = copy.deepcopy(model)
    cl.ChunkedLMHead.wrap(model)
    assert "forward" in vars(model) and model.lm_head is not original_head
    cl.ChunkedLMHead.unwrap(model)
    assert model.lm_head is original_head and "forward" not in vars(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    input_ids, labels = _batch()
    theirs, ours = untouched(input_ids, labels=labels), model(input_ids, labels=labels)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    cl.ChunkedLMHead.wrap(model)  # can be wrapped again
    torch.testing.assert_close(model(input_ids, labels=labels).loss, theirs.loss, rtol=1e-5, atol=0)


def test_wrap_keeps_training_mode_and_deepcopy_is_independent():
    model = _model("llama-tied")
    model.model.layers[0].eval()  # a frozen block in an otherwise training model
    cl.ChunkedLMHead.wrap(model)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    twin = copy.deepcopy(model)
    assert (
        twin.lm_head is not model.lm_head and twin.lm_head.weight is twin.model.embed_tokens.weight
    )
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    input_ids, labels = _batch()
    unwrapped = cl.ChunkedLMHead.unwrap(copy.deepcopy(twin))
    torch.testing.assert_close(
        twin(input_ids, labels=labels).loss, unwrapped(input_ids, labels=labels).loss
    )
    assert not torch.equal(
        twin(input_ids, labels=labels).loss, model(input_ids, labels=labels).loss
    )


def _train_losses(model, tmp_path) -> tuple[list[float], nn.Module]:
    input_ids, labels = _batch(seed=5, shape=(8, 12))
    labels[1, :9] = -100  # uneven numbers of labels per micro-batch: num_items_in_batch matters
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels, strict=True)]
    arguments = training_arguments(tmp_path, max_steps=2)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=rows)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model


def test_trainer_with_gradient_accumulation(tmp_path):
    model = _model("llama")
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model), shards=2)
    theirs, trained = _train_losses(model, tmp_path / "plain")
    ours, ours_trained = _train_losses(wrapped, tmp_path / "wrapped")
    assert len(ours) == len(theirs) == 2
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=0)
    for (name, p), q in zip(trained.named_parameters(), ours_trained.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- sequence_logprobs


def _padded_batch():
    input_ids, _ = _batch(seed=7, shape=(3, 10))
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    return input_ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "phi-biased"])
def test_sequence_logprobs_values_and_gradients(family, dtype):
    input_ids, mask = _padded_batch()
    weights = torch.randn(input_ids.shape[0], input_ids.shape[1] - 1, generator=seeded(8))

    def run(name, model):
        compute = cl.sequence_logprobs if name == "ours" else reference.sequence_logprobs
        logprobs, entropy = compute(model, input_ids, mask, temperature=0.7, return_entropy=True)
        if name == "ours":
            assert logprobs.shape == entropy.shape == (3, 9) and logprobs.dtype == torch.float32
            padded = mask[:, 1:] == 0
            assert (logprobs[padded] == 0).all() and (entropy[padded] == 0).all()
        objective = (logprobs * weights).sum() + (entropy * weights.flip(1)).sum()
        return {"logprobs": logprobs, "entropy": entropy}, objective

    _compare_with_unwrapped(family, dtype, run, shards=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sequence_logprobs_per_position_temperature(family, dtype):
    # temperature[b, t] divides the logits at position t, those predicting input_ids[b, t + 1];
    # padded positions are left out whatever their temperature.
    input_ids, mask = _padded_batch()
    temperature = per_position_temperature(input_ids.shape)
    weights = torch.randn(input_ids.shape[0], input_ids.shape[1] - 1, generator=seeded(8))

    def run(name, model):
        compute = cl.sequence_logprobs if name == "ours" else reference.sequence_logprobs
        logprobs, entropy = compute(
            model, input_ids, mask, temperature=temperature, return_entropy=True
        )
        objective = (logprobs * weights).sum() + (entropy * weights.flip(1)).sum()
        return {"logprobs": logprobs, "entropy": entropy}, objective

    _compare_with_unwrapped(family, dtype, run, shards=2)


def test_sequence_logprobs_on_an_unwrapped_model_leaves_it_unwrapped():
    model = _model("gpt2")  # training mode, dropout 0
    head = model.lm_head
    input_ids, mask = _padded_batch()
    for attention_mask in (mask, None):
        expected = reference.sequence_logprobs(model, input_ids, attention_mask)
        ours = cl.sequence_logprobs(model, input_ids, attention_mask)
        assert model.lm_head is head and "forward" not in vars(model) and model.training
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- refusals and bad input


def test_refuses_a_model_without_output_embedding():
    base = _model("llama").model
    with pytest.raises((TypeError, ValueError), match="LlamaModel"):
        cl.ChunkedLMHead.wrap(base)
    with pytest.raises(TypeError, match="model: expected a transformers"):
        cl.ChunkedLMHead.wrap(nn.Linear(3, 4))


def test_refuses_wrapping_twice_and_unwrapping_a_plain_model():
    model = cl.ChunkedLMHead.wrap(_model("llama"))
    with pytest.raises(ValueError, match="already wrapped"):
        cl.ChunkedLMHead.wrap(model)
    with pytest.raises(ValueError, match=r"expected a model wrapped by ChunkedLMHead\.wrap"):
        cl.ChunkedLMHead.unwrap(_model("llama"))


@pytest.mark.parametrize(
    ("shards", "error", "message"),
    [
        (0, ValueError, "shards: expected an int in"),
        (VOCAB + 1, ValueError, "shards: expected an int in"),
        (2.0, TypeError, "shards: expected an int or None"),
        ("8", TypeError, "shards: expected an int or None"),
    ],
)
def test_refuses_invalid_shards(shards, error, message):
    model = _model("llama")
    with pytest.raises(error, match=message):
        cl.ChunkedLMHead.wrap(model, shards=shards)
    assert type(model.lm_head) is nn.Linear and "forward" not in vars(model)
    with pytest.raises(TypeError, match="return_logits: expected a bool"):
        cl.ChunkedLMHead.wrap(model, return_logits="yes")


def test_refuses_a_transform_the_model_does_not_apply():
    """The config claims a softcap that LlamaForCausalLM's forward never applies: the probe sees."""
    model = _model("llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(
        ValueError, match=r"refusing LlamaForCausalLM.*softcap=30.0.*unknown logit transform"
    ):
        cl.ChunkedLMHead.wrap(model)
    assert type(model.lm_head) is nn.Linear and "forward" not in vars(model)


def test_refuses_a_transform_missing_from_the_config():
    """Cohere's forward scales by the value it copied at init; a config that disagrees is caught."""
    model = _model("cohere")
    model.config.logit_scale = None
    with pytest.raises(
        ValueError, match=r"refusing CohereForCausalLM.*maps a raw logit .* unknown logit"
    ):
        cl.ChunkedLMHead.wrap(model)


def test_refuses_unsupported_heads_and_losses():
    model = _model("llama")
    model.lm_head = type("QuantLinear", (nn.Linear,), {})(32, VOCAB, bias=False)
    with pytest.raises(
        ValueError, match=r"LlamaForCausalLM's output layer is a .*QuantLinear, expected a plain"
    ):
        cl.ChunkedLMHead.wrap(model)

    model = _model("llama")
    # transformers 5 reads the model's loss_type, 4.x the config's: select another loss in both.
    model.loss_type = model.config.loss_type = "ForTokenClassification"
    with pytest.raises(
        ValueError,
        match="loss_function is ForTokenClassification, expected transformers' ForCausalLMLoss",
    ):
        cl.ChunkedLMHead.wrap(model)

    model = _model("llama")
    model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(ValueError, match="output layer has forward hooks"):
        cl.ChunkedLMHead.wrap(model)


def test_refuses_meta_weights_and_contradictory_configs():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config("llama"))
    with pytest.raises(ValueError, match="LlamaForCausalLM's output layer is on the meta device"):
        cl.ChunkedLMHead.wrap(model)
    model = _model("llama")
    model.config.logit_scale, model.config.logits_scaling = 2.0, 4.0
    with pytest.raises(ValueError, match="config sets both logit_scale and logits_scaling"):
        cl.ChunkedLMHead.wrap(model)


def test_refuses_a_router_auxiliary_loss():
    model = _model("mixtral-router-loss")
    with pytest.raises(ValueError, match=r"refusing MixtralForCausalLM.*auxiliary \(router\) loss"):
        cl.ChunkedLMHead.wrap(model)
    model.config.output_router_logits = False
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(model).eval())
    input_ids, labels = _batch()
    torch.testing.assert_close(
        wrapped(input_ids, labels=labels).loss,
        model.eval()(input_ids, labels=labels).loss,
        rtol=1e-5,
        atol=0,
    )
    with pytest.raises(ValueError, match="auxiliary \\(router\\) loss"):
        wrapped(input_ids, labels=labels, output_router_logits=True)


def test_bad_labels_and_sequences():
    model = cl.ChunkedLMHead.wrap(_model("llama"))
    input_ids, labels = _batch()
    labels[1, 5] = VOCAB
    with pytest.raises(
        ValueError,
        match=rf"labels: expected values in \[0, {VOCAB}\) other than ignore_index=-100, "
        rf"got {VOCAB}",
    ):
        model(input_ids, labels=labels)
    with pytest.raises(ValueError, match="labels: expected shape"):
        model(input_ids, labels=labels[:, :-1])
    with pytest.raises(TypeError, match=r"labels: expected a torch\.Tensor"):
        model(input_ids, labels=labels.tolist())
    with pytest.raises(TypeError, match="got multiple values for argument 'input_ids'"):
        model(input_ids, input_ids=input_ids)
    with pytest.raises(TypeError, match="too many positional arguments"):
        model(input_ids, *([None] * 40))
    with pytest.raises(TypeError, match=r"shift_labels: expected a torch\.Tensor"):
        model(input_ids, labels=labels, shift_labels=[1, 2])
    with pytest.raises(TypeError, match="input_ids: expected an integer tensor"):
        cl.sequence_logprobs(model, input_ids.float())
    with pytest.raises(ValueError, match=r"input_ids: expected shape \[B, T\] with T >= 2"):
        cl.sequence_logprobs(model, input_ids[:, :1])
    with pytest.raises(ValueError, match="attention_mask: expected input_ids' shape"):
        cl.sequence_logprobs(model, input_ids, torch.ones(3, 4))
    with pytest.raises(ValueError, match="temperature: expected a finite float > 0"):
        cl.sequence_logprobs(model, input_ids, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature: .* input_ids\.shape = \(3, 13\)"):
        cl.sequence_logprobs(model, input_ids, temperature=torch.ones(3, 12))


# ---------------------------------------------------------------- mixed precision (autocast)


@pytest.fixture
def bf16_accelerator():
    """An accelerate ``Accelerator(mixed_precision="bf16")`` on CPU, its process-wide state reset
    after the test (other tests build their own, e.g. through Trainer)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(mixed_precision="bf16", cpu=True)
    AcceleratorState._reset_state(True)


def _autocast_losses(family: str, wrapped: nn.Module, naive: nn.Module, under_autocast: bool):
    """The loss of the wrapped and the unwrapped fp32 model (each under bf16 autocast when
    ``under_autocast``, else as called: a prepared model autocasts itself) and of the fp64 model;
    the wrapped one held to the accuracy rule of bf16, the unwrapped autocast loss's precision."""
    exact = _model(family, torch.float64)
    input_ids, labels = _batch()
    losses = []
    for model in (wrapped, naive):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=under_autocast):
            losses.append(model(input_ids=input_ids, labels=labels).loss)
    exact_loss = exact(input_ids=input_ids, labels=labels).loss
    assert losses[0].dtype == torch.float32
    assert_as_accurate(*losses, exact_loss, torch.bfloat16, f"{family} autocast loss")
    return losses


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_wrap_under_autocast(family, cpu_gemm):
    """Wrapping inside torch.autocast (the probe tells autocast's bf16 rounding of the original
    logits from a real mismatch), then the loss under autocast, as accurate as the unwrapped
    model's autocast loss."""
    naive = _model(family)
    wrapped = copy.deepcopy(naive)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cl.ChunkedLMHead.wrap(wrapped)
    _autocast_losses(family, wrapped, naive, under_autocast=True)


@pytest.mark.parametrize("order", ["wrap-then-prepare", "prepare-then-wrap"])
def test_wrap_and_accelerate_bf16_in_either_order(order, bf16_accelerator):
    naive = bf16_accelerator.prepare(_model("llama"))
    wrapped = _model("llama")
    if order == "wrap-then-prepare":
        wrapped = bf16_accelerator.prepare(cl.ChunkedLMHead.wrap(wrapped))
    else:
        wrapped = cl.ChunkedLMHead.wrap(bf16_accelerator.prepare(wrapped))
    assert isinstance(wrapped.lm_head, cl.ChunkedLMHead)
    _autocast_losses("llama", wrapped, naive, under_autocast=False)
    # Unwrapping a model wrapped after prepare gives the prepared (autocasting) forward back.
    if order == "prepare-then-wrap":
        cl.ChunkedLMHead.unwrap(wrapped)
        input_ids, _ = _batch()
        assert torch.equal(wrapped(input_ids).logits, naive(input_ids).logits)


def test_head_operands_under_autocast_are_in_the_autocast_dtype(monkeypatch, cpu_gemm):
    """What the docstrings state: under autocast the chunked ops receive hidden, weight and
    bias in the autocast dtype (as F.linear does), so the block GEMMs run in bf16 (or in fp32
    from bf16 operands on the fp32 CPU path); outside autocast in the Parameters' dtype."""
    import chunklogits.head as head_module

    seen, chunked = [], head_module.linear_cross_entropy

    def spy(hidden, weight, labels, **kwargs):
        seen.append((hidden.dtype, weight.dtype, kwargs["bias"].dtype))
        return chunked(hidden, weight, labels, **kwargs)

    monkeypatch.setattr(head_module, "linear_cross_entropy", spy)
    g = seeded(3)
    linear = nn.Linear(24, 50)
    head = cl.ChunkedLMHead(linear.weight, linear.bias)
    hidden = torch.randn(4, 24, generator=g, requires_grad=True)
    labels = torch.randint(50, (4,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(hidden, labels)
        naive = F.cross_entropy(linear(hidden).float(), labels)
    assert seen == [(torch.bfloat16,) * 3]
    loss.backward()
    assert hidden.grad.dtype == linear.weight.grad.dtype == torch.float32
    exact = F.cross_entropy(
        F.linear(hidden.double(), *(p.double() for p in (linear.weight, linear.bias))), labels
    )
    assert_as_accurate(loss, naive, exact, torch.bfloat16, "autocast head loss")
    head.loss(hidden, labels)
    assert seen[-1] == (torch.float32,) * 3


def test_sequence_logprobs_of_an_unwrapped_model_under_autocast():
    model = _model("gemma2")
    exact = _model("gemma2", torch.float64)
    input_ids, mask = _padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cl.sequence_logprobs(model, input_ids, mask, temperature=0.7)
        naive = reference.sequence_logprobs(model, input_ids, mask, temperature=0.7)
    assert type(model.lm_head) is nn.Linear  # wrapped for the call only
    expected = reference.sequence_logprobs(exact, input_ids, mask, temperature=0.7)
    assert_as_accurate(ours, naive, expected, torch.bfloat16, "autocast logprobs")


# ---------------------------------------------------------------- resize_token_embeddings


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_resize_token_embeddings_of_a_wrapped_model(family):
    """The head follows the resized output embedding: sizes agree, the loss over the new tokens
    is the unwrapped resized model's, and unwrap gives a plain layer of the new size."""
    naive = _model(family)
    wrapped = cl.ChunkedLMHead.wrap(copy.deepcopy(naive), shards=3)
    new_vocab = VOCAB + 9
    for model in (naive, wrapped):
        torch.manual_seed(4)  # the new rows are drawn at random
        model.resize_token_embeddings(new_vocab)
    head = wrapped.lm_head
    assert isinstance(head, cl.ChunkedLMHead) and head.shards == 3
    assert head.weight.shape[0] == wrapped.config.vocab_size == new_vocab
    assert (head.weight is wrapped.get_input_embeddings().weight) == (family == "llama-tied")
    input_ids, labels = _batch()
    input_ids[:, -3:] = labels[:, -3:] = torch.arange(VOCAB, VOCAB + 3)
    naive.train(), wrapped.train()
    torch.testing.assert_close(
        wrapped(input_ids, labels=labels).loss,
        naive(input_ids, labels=labels).loss,
        rtol=1e-5,
        atol=0,
    )
    cl.ChunkedLMHead.unwrap(wrapped)
    assert type(wrapped.lm_head) is nn.Linear and wrapped.lm_head.out_features == new_vocab
    assert "resize_token_embeddings" not in vars(wrapped)


def test_warns_only_when_training_on_full_logits():
    """The warning that full logits were made fires for a training-mode call without labels
    with autograd on (what Trainer's label smoothing and compute_loss_func do), and for no
    other call: labels, eval mode, no_grad (generate) and one position (logits_to_keep=1)."""
    import warnings

    model = cl.ChunkedLMHead.wrap(_model("llama"))
    input_ids, labels = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train()(input_ids, labels=labels)
        model(input_ids, logits_to_keep=1)
        with torch.no_grad():
            model(input_ids)
        model.eval()(input_ids)
    with pytest.warns(UserWarning, match=r"computed the full \(3, 13, 311\) logits"):
        logits = model.train()(input_ids).logits
    assert logits.shape == (3, 13, VOCAB)
