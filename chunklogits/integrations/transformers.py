"""transformers: chunked loss and log-probs for any ``*ForCausalLM`` without copying its forward.

A transformers causal LM's forward runs the base model, slices the last hidden states to
``logits_to_keep``, calls its output layer, applies a family-specific transform to the logits
(Gemma's softcap, Cohere's scale, ...) and, given labels, calls ``ForCausalLMLoss`` (a few take
the unshifted cross-entropy instead, ``_Wrapping.shifted``). Rather than
re-implementing that forward once per family, the wrapped forward runs the *original* one without
the labels while the ``ChunkedLMHead`` records the hidden states it is called with and hands back
an empty ``[..., 0]`` stand-in for the logits. The loss is then the chunked cross-entropy of those
hidden states under the transform read from the config (``_TRANSFORM_ATTRIBUTES``). Whatever the
original forward does up to its output layer (inputs, caches, ``logits_to_keep``, scaling of the
hidden states) is reproduced by construction; what it does after it is reproduced only for the
transforms in the table and ``ForCausalLMLoss``, and ``wrap`` checks that claim on the model
itself with a probe before it returns.

An encoder-decoder model (``config.is_encoder_decoder``: T5, BART, Marian, Whisper, ...) is
wrapped the same way: its output layer is fed the decoder's output (T5's rescaled by
``d_model ** -0.5`` in its forward), its loss is the unshifted cross-entropy, and the bias its
forward adds after the output layer (``final_logits_bias``, ``_OUTPUT_BIAS_ATTRIBUTES``) joins
the head's bias. Given labels and no decoder input, its forward builds the decoder input from the
labels: the wrapped forward, which withholds the labels, builds it with the model's own function
(``_decoder_input_ids``), and the probe checks the result.

The output module may also be a PEFT layer around the linear one (LoRA's ``Linear``, a
``ModulesToSaveWrapper``): the ``ChunkedLMHead`` then takes the inner layer's place, the PEFT layer
is the one that records, and the loss uses the linear layer the PEFT layer's forward amounts to
(``_effective_head``). The output module's call is recorded under the autocast state it runs in,
and the loss runs under the same state.

Nothing here imports transformers at module level: ``import chunklogits`` stays light.
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import (
    check_attention_mask,
    check_integer_tensor,
    check_temperature,
    check_tensor,
    make_transform,
)
from ..distributed import local_head

# Config attributes of logit transforms applied after the output layer: (attribute, the
# ChunkedLMHead argument it sets, how its value maps to that argument). Read from the text config.
_TRANSFORM_ATTRIBUTES = (
    ("final_logit_softcapping", "softcap", float),  # Gemma-2, Gemma-3: c * tanh(x / c)
    ("logits_soft_cap", "softcap", float),  # RecurrentGemma
    ("output_logit_soft_cap", "softcap", float),  # xLSTM
    ("logit_scale", "logit_scale", float),  # Cohere, Cohere2: x * logit_scale
    ("lm_head_multiplier", "logit_scale", float),  # Falcon-H1: x * lm_head_multiplier
    ("logits_scaling", "logit_scale", lambda value: 1.0 / value),  # Granite: x / logits_scaling
)

# Model types whose config attribute of the table means another thing there: {(model type,
# attribute): how its value maps to the table's argument, or None where it is no transform of
# the output layer's logits}.
_TRANSFORM_EXCEPTIONS = {
    ("hyperclovax", "logits_scaling"): float,  # x * logits_scaling (muP), not Granite's division
    # MiniCPM3 divides the hidden states *before* the output layer by logits_scaling: the layer's
    # input, which the wrapped forward records, already holds it.
    ("minicpm3", "logits_scaling"): None,
}

# Attributes of biases that a forward adds to its output layer's logits ([1, V] buffers): BART,
# mBART, Marian, Pegasus, PLBart, Blenderbot, LED, MVP and BigBird-Pegasus's final_logits_bias.
_OUTPUT_BIAS_ATTRIBUTES = ("final_logits_bias",)

# The probe: 2 sequences of 6 random tokens, one label ignored; raw logits up to ~4 x this
# magnitude exercise the transform where it is far from the identity (Gemma-2 caps at 30).
_PROBE_SHAPE = (2, 6)
_PROBE_LOGIT_STD = 40.0


@dataclass
class _Wrapping:
    """What ``unwrap`` restores, kept on each head ``wrap`` installs (so it follows
    ``copy.deepcopy`` of the model): the layer the head replaced and, for the model, the
    attributes ``wrap`` set on the instance."""

    original_layer: nn.Module
    # "forward" and "resize_token_embeddings" as they were in the instance's __dict__ (None: not
    # there, the class's method serves).
    instance_methods: dict[str, Callable | None]
    parameter_names: tuple[str, ...]  # the original forward's positional parameters, without self
    # The original's loss: transformers' ForCausalLMLoss (True: labels shifted left by one), or
    # (False) a cross-entropy of each position's logits against its own label, ``CrossEntropyLoss()
    # (logits.view(-1, V), labels.view(-1))``, as the causal LMs made of BART-family, TrOCR and
    # Whisper decoders, XLM, XLNet and CPM-Ant compute it. ``wrap``'s probe tells which.
    shifted: bool = True

    def original_forward(self, model: nn.Module) -> Callable:
        if self.instance_methods["forward"] is not None:
            return self.instance_methods["forward"]
        return functools.partial(type(model).forward, model)  # torch.compile traces a partial


def logit_transform(config) -> dict[str, float | None]:
    """``{"softcap": ..., "logit_scale": ...}`` of a transformers config (its text config for
    multimodal ones), from ``_TRANSFORM_ATTRIBUTES``; None where the family has none."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    transform: dict[str, float | None] = {"softcap": None, "logit_scale": None}
    found = {}
    model_type = getattr(text_config, "model_type", None)
    for attribute, argument, convert in _TRANSFORM_ATTRIBUTES:
        value = getattr(text_config, attribute, None)
        convert = _TRANSFORM_EXCEPTIONS.get((model_type, attribute), convert)
        if value is None or convert is None:
            continue
        if argument in found:
            raise ValueError(
                f"model: its config sets both {found[argument]} and {attribute}; "
                "chunklogits does not know how they combine"
            )
        found[argument] = attribute
        transform[argument] = convert(value)
    if transform["logit_scale"] == 1.0:
        transform["logit_scale"] = None
    return transform


def forward_transform(model: nn.Module, weight: Tensor) -> dict[str, float | None]:
    """The logit transform that ``model``'s forward applies to its output layer's (``weight``)
    logits: ``logit_transform(model.config)``, but none for a model of a composite config (a
    vision-language model's) whose forward ignores the transform its text config sets, as the
    probe shows (``_probe_head`` on token ids; in transformers 5.x
    ``Gemma3ForConditionalGeneration`` and ``Cohere2VisionForConditionalGeneration`` apply
    neither the ``final_logit_softcapping`` nor the ``logit_scale`` that their text models
    apply). A transform that neither matches is left for the caller's probe to refuse. The
    probe's answer is kept per model and ``weight`` (``cl.sample`` asks at every call)."""
    transform = logit_transform(model.config)
    identity = dict.fromkeys(transform)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is config or transform == identity:
        return transform
    kept = _FORWARD_TRANSFORMS.get(model)
    if kept is not None and kept[0]() is weight and kept[1] == transform:
        return kept[2]
    found = transform
    with _evaluating(model):
        inputs = _unlabelled(model, *_probe_inputs(model, weight))
        for candidate in (transform, identity):
            try:
                _probe_head(model, weight, candidate["softcap"], candidate["logit_scale"], inputs)
            except ValueError:
                continue
            found = candidate
            break
    _FORWARD_TRANSFORMS[model] = (weakref.ref(weight), transform, found)
    return found


# forward_transform's answers: per model, (its output layer's weight, the config's transform,
# the transform the forward applies).
_FORWARD_TRANSFORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def with_output_bias(model: nn.Module, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The output layer's ``bias`` ``[V]`` (or None) plus the bias the model's forward adds to
    the layer's logits (``_OUTPUT_BIAS_ATTRIBUTES``, cast to ``dtype``), if it has one."""
    for attribute in _OUTPUT_BIAS_ATTRIBUTES:
        added = getattr(model, attribute, None)
        if isinstance(added, Tensor):
            added = added.reshape(-1).to(dtype)
            bias = added if bias is None else bias + added
    return bias


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder model (T5, BART, Whisper, ...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def wrap(
    head_class: type, model: nn.Module, *, shards: int | None, return_logits: bool | None
) -> nn.Module:
    """``ChunkedLMHead.wrap`` (documented there)."""
    if return_logits is not None and not isinstance(return_logits, bool):
        raise TypeError(f"return_logits: expected a bool or None, got {return_logits!r}")
    causal_lm = _causal_lm(model)
    name = type(causal_lm).__name__
    outer = _output_module(causal_lm)
    slots = _linear_slots(outer)
    layers = [_checked_linear(causal_lm, _slot_get(causal_lm, slot)) for slot in slots]
    with _evaluating(causal_lm):
        try:
            inputs, labels = _probe_inputs(causal_lm, layers[0].weight)
            expected = causal_lm(**inputs, labels=labels)
            transform = forward_transform(causal_lm, layers[0].weight)
        except Exception as error:  # any failure of the model's own code on these inputs
            raise ValueError(
                f"ChunkedLMHead.wrap: refusing {name}, whose forward fails on token ids and labels "
                f"alone (the probe; a model that needs image inputs fails so): "
                f"{type(error).__name__}: {error}"
            ) from error
        heads = [head_class(x.weight, x.bias, shards=shards, **transform) for x in layers]
        for head in heads:
            head.return_logits = return_logits
        _install(causal_lm, heads, layers, slots)
        try:
            _check_probe_either_loss(causal_lm, heads, inputs, labels, expected)
        except Exception as error:
            unwrap(causal_lm)
            raise ValueError(
                f"ChunkedLMHead.wrap: refusing {name} ({heads[0].extra_repr()}), the wrapped "
                f"forward does not reproduce the original: {error}"
            ) from error
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """``ChunkedLMHead.unwrap`` (documented there)."""
    from ..head import ChunkedLMHead

    causal_lm = _causal_lm(model)
    head = _wrapped_head(causal_lm)
    if head is None:
        raise ValueError(
            "model: expected a model wrapped by ChunkedLMHead.wrap, "
            f"got an unwrapped {type(causal_lm).__name__}"
        )
    methods = head._wrapping.instance_methods
    for slot in _linear_slots(causal_lm.get_output_embeddings()):
        installed = _slot_get(causal_lm, slot)
        if not isinstance(installed, ChunkedLMHead) or installed._wrapping is None:
            continue
        layer = installed._wrapping.original_layer
        layer.weight = installed.weight
        if installed.bias is not None:
            layer.bias = installed.bias
        _slot_set(causal_lm, slot, layer)
        installed._wrapping = None
    for attribute, saved in methods.items():
        if saved is None:
            delattr(causal_lm, attribute)
        else:
            setattr(causal_lm, attribute, saved)
    return model


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = False,
    **model_inputs,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each next token under a causal LM, and optionally the entropy, without
    the logits: what RL trainers (TRL's GRPO/PPO ``selective_log_softmax``, verl's
    ``logprobs_from_logits``) compute from full logits.

    Naive equivalent (``reference.sequence_logprobs``)::

        z = model(input_ids, attention_mask=attention_mask, **model_inputs).logits[:, :-1]
        z = z.float() / temperature       # a tensor: temperature[:, :-1, None]
        logprobs = z.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        # both 0 where attention_mask[:, 1:] == 0

    Args:
        model: a transformers ``*ForCausalLM``, or a PEFT model around one. A model wrapped by
            ``ChunkedLMHead.wrap`` is used as is; any other is wrapped for the call and unwrapped
            after it, which repeats the wrap-time probe (two forwards of 12 tokens) per call: wrap
            once to avoid it.
        input_ids: ``[B, T]`` integer tokens, ``T >= 2``.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding) or None; passed to the model.
            Positions whose *predicted* token is padding get 0 and cost nothing.
        temperature: divides the model's (softcapped, scaled) logits before the log-softmax: a
            float, or one per position, a floating tensor of input_ids' shape ``[B, T]`` (or
            flattened) on its device, finite and positive: ``temperature[b, t]`` divides the
            logits at position ``t``, those that predict ``input_ids[b, t + 1]`` (the last
            column is unused), as ``token_logprobs``' per-position temperatures.
        return_entropy: also return the entropy of each position's tempered distribution.
        model_inputs: further inputs of the model's forward, passed to it as given: the image
            inputs of a vision-language model (``pixel_values``, Qwen-VL's ``image_grid_thw``
            and ``mm_token_type_ids``, Mllama's ``aspect_ratio_ids``, ...), with the image
            tokens in ``input_ids`` (their log-probs are computed like any other token's).

    Returns:
        fp32 ``[B, T - 1]``: ``logprobs[b, t] = log p(input_ids[b, t + 1] | input_ids[b, :t + 1])``
        (and the entropy, same shape), differentiable with respect to the model's parameters.
        Under ``torch.autocast`` the head's blocks run in the autocast dtype (see
        ``ChunkedLMHead``).
    """
    _check_sequences(input_ids, attention_mask)
    check_temperature(temperature, tuple(input_ids.shape), input_ids.device, "input_ids.shape")
    causal_lm = _causal_lm(model)
    if is_encoder_decoder(causal_lm):
        raise ValueError(
            f"model: cl.sequence_logprobs scores a causal LM's next tokens of its own input; "
            f"{type(causal_lm).__name__} is an encoder-decoder model, whose decoder's tokens are "
            "scored given the encoder's input (its loss: ChunkedLMHead.wrap and labels)"
        )
    head = _wrapped_head(causal_lm)
    if head is None:
        from ..head import ChunkedLMHead

        wrap(ChunkedLMHead, causal_lm, shards=None, return_logits=None)
        try:
            return sequence_logprobs(
                causal_lm,
                input_ids,
                attention_mask,
                temperature=temperature,
                return_entropy=return_entropy,
                **model_inputs,
            )
        finally:
            unwrap(causal_lm)
    inputs = {
        **model_inputs,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "use_cache": False,
    }
    _, recorded = _forward_recording(causal_lm, head, inputs, keep_logits=False)
    effective, hidden = _effective_head(causal_lm.get_output_embeddings(), recorded.hidden)
    hidden, next_tokens = hidden[:, :-1], input_ids[:, 1:].to(hidden.device)
    if isinstance(temperature, Tensor):  # those of the positions that predict next_tokens
        temperature = temperature.reshape(input_ids.shape)[:, :-1].to(hidden.device)
    options = {"temperature": temperature, "return_entropy": return_entropy}
    with recorded.autocast:
        if attention_mask is None:
            return effective.token_logprobs(hidden, next_tokens, **options)
        real = attention_mask[:, 1:].to(hidden.device).bool()
        if isinstance(temperature, Tensor):
            options["temperature"] = temperature[real]
        results = effective.token_logprobs(hidden[real], next_tokens[real], **options)
    results = results if return_entropy else (results,)
    scattered = tuple(r.new_zeros(next_tokens.shape).index_put((real,), r) for r in results)
    return scattered if return_entropy else scattered[0]


def _check_sequences(input_ids, attention_mask) -> None:
    check_integer_tensor("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids: expected shape [B, T] with T >= 2, got {tuple(input_ids.shape)}"
        )
    check_attention_mask(attention_mask, input_ids)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (``get_base_model()``), else ``model``: what
    ``wrap`` patches, so that the PEFT model's forward, which calls it, is the wrapped one."""
    peft = _peft()
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def _peft():
    """The ``peft`` module when it has been imported (a model cannot hold PEFT layers
    otherwise), else None: chunklogits does not import it."""
    import sys

    return sys.modules.get("peft")


def _peft_layer_kind(module: nn.Module) -> str | None:
    """``"lora"`` for PEFT's LoRA ``Linear``, ``"modules_to_save"`` for its
    ``ModulesToSaveWrapper``, None for anything else."""
    if _peft() is None:
        return None
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, LoraLinear):
        return "lora"
    if isinstance(module, ModulesToSaveWrapper):
        return "modules_to_save"
    return None


def _linear_slots(outer: nn.Module) -> list[tuple[nn.Module | None, str]]:
    """Where the linear layers holding the output layer's weights sit, as ``(parent, name)``,
    the one the forward uses by default first: the output module itself (``(None, "")``), a LoRA
    layer's ``base_layer``, or a ``ModulesToSaveWrapper``'s ``original_module`` and copies."""
    kind = _peft_layer_kind(outer)
    if kind == "lora":
        return [(outer, "base_layer")]
    if kind == "modules_to_save":
        copies = outer.modules_to_save
        return [(outer, "original_module"), *((copies, name) for name in copies)]
    return [(None, "")]


def _slot_get(causal_lm: nn.Module, slot: tuple[nn.Module | None, str]) -> nn.Module:
    parent, name = slot
    return causal_lm.get_output_embeddings() if parent is None else getattr(parent, name)


def _slot_set(causal_lm: nn.Module, slot: tuple[nn.Module | None, str], layer: nn.Module):
    parent, name = slot
    if parent is None:
        causal_lm.set_output_embeddings(layer)
    else:
        setattr(parent, name, layer)


def _wrapped_head(model: nn.Module):
    """The ``ChunkedLMHead`` that ``wrap`` installed in ``model`` (inside the PEFT layer that
    adapts it, if any), or None."""
    from ..head import ChunkedLMHead

    causal_lm = _causal_lm(model)
    get = getattr(causal_lm, "get_output_embeddings", None)
    outer = get() if get is not None else None
    if not isinstance(outer, nn.Module):
        return None
    layer = _slot_get(causal_lm, _linear_slots(outer)[0])
    return layer if isinstance(layer, ChunkedLMHead) and layer._wrapping is not None else None


def _output_module(model: nn.Module) -> nn.Module:
    """The model's output module (a linear layer, or a PEFT layer around one), if it is one whose
    forward and loss we reproduce."""
    name = type(model).__name__
    if (
        not isinstance(model, nn.Module)
        or not hasattr(model, "get_output_embeddings")
        or not hasattr(model, "config")
    ):
        raise TypeError(
            f"model: expected a transformers *ForCausalLM (a PreTrainedModel with an output "
            f"embedding) or a PEFT model around one, got {name}"
        )
    if _wrapped_head(model) is not None:
        raise ValueError(
            f"model: {name} is already wrapped by ChunkedLMHead.wrap (unwrap it first)"
        )
    outer = model.get_output_embeddings()
    if outer is None:
        raise ValueError(
            f"model: {name} has no output embedding (get_output_embeddings() is None); "
            "wrap the *ForCausalLM model, not its base model"
        )
    if _peft_layer_kind(outer) is not None and _hooked(outer):
        raise ValueError(f"model: {name}'s output layer has forward hooks, which wrap would drop")
    from transformers.loss.loss_utils import ForCausalLMLoss

    loss_function = getattr(model, "loss_function", None)
    if loss_function is not ForCausalLMLoss and not _masked_lm_loss(model):
        raise ValueError(
            f"model: {name}'s loss_function is "
            f"{getattr(loss_function, '__name__', loss_function)}, "
            "expected transformers' ForCausalLMLoss, or ForMaskedLMLoss for an encoder-decoder "
            "model (other losses are not reproduced)"
        )
    return outer


def _masked_lm_loss(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder model whose loss is transformers'
    ``ForMaskedLMLoss`` (T5Gemma): the unshifted cross-entropy, with the loss arguments
    ``ignore_index`` and ``num_items_in_batch``."""
    from transformers.loss.loss_utils import ForMaskedLMLoss

    return is_encoder_decoder(model) and getattr(model, "loss_function", None) is ForMaskedLMLoss


def _hooked(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook"))


def _checked_linear(model: nn.Module, layer: nn.Module) -> nn.Linear:
    """``layer`` (one the output module computes with) if the head can take its place."""
    name = type(model).__name__
    if type(layer) is not nn.Linear:
        raise ValueError(
            f"model: {name}'s output layer is a {type(layer).__module__}.{type(layer).__name__}, "
            "expected a plain torch.nn.Linear, or PEFT's LoRA Linear or ModulesToSaveWrapper "
            "around one (quantised or otherwise adapted layers are not reproduced)"
        )
    # A layer parallelised on the vocabulary (ColwiseParallel: a DTensor weight, its layouts set
    # by hooks) is kept: the head calls it for plain logits (see ChunkedLMHead).
    parallel = local_head(layer.weight, layer.bias).process_group is not None
    if _hooked(layer) and not parallel:
        raise ValueError(
            f"model: {name}'s output layer has forward hooks (e.g. accelerate's device placement), "
            "which replacing it would drop"
        )
    if layer.weight.device.type == "meta":
        raise ValueError(
            f"model: {name}'s output layer is on the meta device; load its weights first"
        )
    return layer


def _install(model: nn.Module, heads: list, layers: list, slots: list) -> None:
    class_forward = type(model).forward
    parameters = list(inspect.signature(class_forward).parameters.values())[1:]  # without self
    positional = tuple(p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD)
    methods = {name: model.__dict__.get(name) for name in ("forward", "resize_token_embeddings")}
    for head, layer, slot in zip(heads, layers, slots, strict=True):
        head._wrapping = _Wrapping(layer, methods, positional)
        _slot_set(model, slot, head)

    # A function per wrap, carrying the class forward's signature (transformers.Trainer reads it
    # to pick the columns and loss arguments to pass), bound to the instance so that
    # ``copy.deepcopy(model)`` binds the copy's forward to the copy.
    @functools.wraps(class_forward)
    def forward(self, *args, **kwargs):
        return _chunked_forward(self, *args, **kwargs)

    @functools.wraps(type(model).resize_token_embeddings)
    def resize_token_embeddings(self, *args, **kwargs):
        return _resize_wrapped(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    model.resize_token_embeddings = types.MethodType(resize_token_embeddings, model)


def _resize_wrapped(model: nn.Module, *args, **kwargs):
    """``resize_token_embeddings`` of a wrapped model: unwrapped, resized by transformers (which
    resizes an ``nn.Linear`` output layer and ``config.vocab_size`` together), wrapped again with
    the same options, so that the head holds the resized output embedding."""
    from ..head import ChunkedLMHead

    head = _wrapped_head(model)
    shards, return_logits = head.shards, head.return_logits
    unwrap(model)
    try:
        return model.resize_token_embeddings(*args, **kwargs)
    finally:
        if shards is not None:
            shards = min(shards, model.get_output_embeddings().out_features)
        wrap(ChunkedLMHead, model, shards=shards, return_logits=return_logits)


def _chunked_forward(model: nn.Module, *args, **kwargs):
    """The wrapped forward: the original one, with the loss computed from the hidden states."""
    head = _wrapped_head(model)
    wrapping = head._wrapping
    if len(args) > len(wrapping.parameter_names):
        raise TypeError(
            f"{type(model).__name__}.forward: too many positional arguments ({len(args)})"
        )
    for parameter, value in zip(wrapping.parameter_names, args, strict=False):
        if parameter in kwargs:
            raise TypeError(
                f"{type(model).__name__}.forward: got multiple values for argument {parameter!r}"
            )
        kwargs[parameter] = value
    labels = kwargs.pop("labels", None)
    if labels is None:
        outputs = wrapping.original_forward(model)(**kwargs)
        _warn_if_training_on_logits(model, outputs)
        return outputs
    check_tensor("labels", labels)
    if (
        is_encoder_decoder(model)
        and kwargs.get("decoder_input_ids") is None
        and kwargs.get("decoder_inputs_embeds") is None
    ):
        kwargs["decoder_input_ids"] = _decoder_input_ids(model, labels)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    keep_logits = head.return_logits
    if keep_logits is None:
        # An evaluation (eval mode, autograd off: Trainer.evaluate/predict, a no_grad loop) may
        # read the logits; a loss that will be backpropagated never needs them, in either mode
        # (from_pretrained returns a model in eval mode).
        keep_logits = not model.training and not torch.is_grad_enabled()
    outputs, recorded = _forward_recording(model, head, kwargs, keep_logits=keep_logits)
    if getattr(outputs, "aux_loss", None) is not None:
        raise ValueError(
            f"{type(model).__name__}: its outputs carry an auxiliary (router) loss, which "
            "ChunkedLMHead does not add to the loss; pass output_router_logits=False or unwrap"
        )
    effective, hidden = _effective_head(model.get_output_embeddings(), recorded.hidden)
    effective = _with_output_bias(model, effective)
    if wrapping.shifted:
        # transformers' ForCausalLMLoss: labels shifted left by one (or shift_labels given),
        # ignore_index -100, the sum divided by num_items_in_batch when given.
        shift_labels = kwargs.get("shift_labels")
        targets = labels if shift_labels is None else check_tensor("shift_labels", shift_labels)
        options = {
            "ignore_index": kwargs.get("ignore_index", -100),
            "num_items_in_batch": kwargs.get("num_items_in_batch"),
            "shift": shift_labels is None,
        }
    elif _masked_lm_loss(model):
        # ForMaskedLMLoss: no shift, ignore_index -100, the sum divided by num_items_in_batch
        # when given.
        targets = labels
        options = {
            "ignore_index": kwargs.get("ignore_index", -100),
            "num_items_in_batch": kwargs.get("num_items_in_batch"),
        }
    else:
        # CrossEntropyLoss()(logits.view(-1, V), labels.view(-1)): no shift, the mean over the
        # labels other than -100, whatever loss arguments the forward is given (it ignores them).
        targets, options = labels, {}
    with recorded.autocast:
        loss = effective.loss(hidden, targets.to(hidden.device), **options)
    rest = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
    logits = outputs.logits if keep_logits else None
    result = type(outputs)(loss=loss, logits=logits, **rest)
    if return_dict:
        return result
    # The positions of the original tuple: loss, logits (None when not computed), the rest.
    return (loss, logits, *rest.values())


def _decoder_input_ids(model: nn.Module, labels: Tensor) -> Tensor:
    """The decoder input an encoder-decoder model's forward builds from ``labels`` when given
    no decoder input: its ``prepare_decoder_input_ids_from_labels`` (BART, T5, Marian, ...), else
    its module's ``shift_tokens_right(labels, ...)`` with the config's values of its other
    parameters (``pad_token_id``, ``decoder_start_token_id``: M2M100, Whisper, ...). ``wrap``'s
    probe checks that the loss is then the forward's."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    import sys

    shift = getattr(sys.modules[type(model).__module__], "shift_tokens_right", None)
    names = list(inspect.signature(shift).parameters)[1:] if shift is not None else []
    if shift is None or not all(hasattr(model.config, name) for name in names):
        raise ValueError(
            f"model: {type(model).__name__} has no prepare_decoder_input_ids_from_labels nor a "
            "shift_tokens_right(labels, <config values>) in its module: chunklogits does not "
            "know how its forward builds the decoder input from the labels; pass "
            "decoder_input_ids"
        )
    return shift(labels, *(getattr(model.config, name) for name in names))


def _with_output_bias(model: nn.Module, head):
    """``head`` with the bias the model's forward adds after the output layer, if any."""
    from ..head import ChunkedLMHead

    bias = with_output_bias(model, head.bias, head.weight.dtype)
    if bias is head.bias:
        return head
    return ChunkedLMHead(
        head.weight, bias, shards=head.shards, softcap=head.softcap, logit_scale=head.logit_scale
    )


def _warn_if_training_on_logits(model: nn.Module, outputs) -> None:
    """A wrapped model called without labels while training, with autograd on, has just made
    the full logits of several positions per row: a loss computed from them outside the model
    (Trainer's ``label_smoothing_factor`` or ``compute_loss_func``, a hand-written loss) costs
    what wrapping was meant to save. Say so rather than let it pass silently."""
    logits = getattr(outputs, "logits", None)
    if not (model.training and torch.is_grad_enabled()) or logits is None or logits.dim() < 3:
        return
    if logits.shape[-2] < 2:
        return
    import warnings

    warnings.warn(
        f"{type(model).__name__} is wrapped by ChunkedLMHead, but was called while training "
        f"without labels, so its forward computed the full {tuple(logits.shape)} logits. "
        "transformers.Trainer does so with label_smoothing_factor or compute_loss_func, which "
        "take the loss from those logits: pass the labels to the model instead (its loss is the "
        "chunked one), or use cl.linear_cross_entropy / cl.sequence_logprobs on the hidden states.",
        stacklevel=3,
    )


@dataclass
class _Recorded:
    """The output module's input in a forward, and the autocast state it was called under."""

    hidden: Tensor
    autocast: torch.autocast


def _forward_recording(model: nn.Module, head, kwargs: dict, *, keep_logits: bool):
    """Run the original forward on ``kwargs`` while the output module records its input and
    hands back an empty stand-in for the logits (or the logits, with ``keep_logits``); returns
    ``(outputs, _Recorded)``."""
    with _recording(model, keep_logits=keep_logits) as seen:
        outputs = head._wrapping.original_forward(model)(**kwargs, return_dict=True)
    return outputs, _only(seen)


def recorded_forward(model: nn.Module, inputs: dict) -> tuple:
    """``model(**inputs)`` with its output layer recording its input instead of computing
    logits: ``(outputs, hidden)``, ``hidden`` ``[..., D]`` what the layer was fed (an
    encoder-decoder model's decoder output, as its forward scales it). The outputs' logits are
    an empty ``[..., 0]`` stand-in."""
    with _recording(model, keep_logits=False) as seen:
        outputs = model(**inputs, return_dict=True)
    return outputs, _only(seen).hidden


def _only(seen: list) -> _Recorded:
    if len(seen) != 1:
        raise RuntimeError(f"the forward called its output layer {len(seen)} times, expected once")
    return seen[0]


@contextmanager
def _recording(model: nn.Module, *, keep_logits: bool) -> Iterator[list]:
    """Within the block, the model's output module appends its input (``_Recorded``) to the list
    yielded and hands back an empty stand-in for the logits (with ``keep_logits``, the logits);
    the bias the forward adds to them (``_OUTPUT_BIAS_ATTRIBUTES``) is then empty too."""
    outer = model.get_output_embeddings()
    compute = _module_forward(outer)
    seen = []

    def record(hidden: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs:
            raise ValueError(
                f"the output layer was called with more than the hidden states ({sorted(kwargs)}"
                f"{', positional' if args else ''}; e.g. PEFT's mixed-adapter batches), which "
                "ChunkedLMHead does not reproduce"
            )
        device_type = hidden.device.type
        autocast = torch.autocast(
            device_type,
            dtype=torch.get_autocast_dtype(device_type),
            enabled=torch.is_autocast_enabled(device_type),
        )
        seen.append(_Recorded(hidden, autocast))
        if keep_logits:
            return compute(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    with _intercepted(outer, record), _output_bias_emptied(model, not keep_logits):
        yield seen


@contextmanager
def _output_bias_emptied(model: nn.Module, empty: bool) -> Iterator[None]:
    """Within the block (when ``empty``), the biases ``_OUTPUT_BIAS_ATTRIBUTES`` of ``model`` are
    their ``[..., 0]`` slices, which the forward adds to the empty stand-in logits."""
    saved = {
        attribute: getattr(model, attribute)
        for attribute in _OUTPUT_BIAS_ATTRIBUTES
        if empty and isinstance(getattr(model, attribute, None), Tensor)
    }
    for attribute, bias in saved.items():
        setattr(model, attribute, bias[..., :0])
    try:
        yield
    finally:
        for attribute, bias in saved.items():
            setattr(model, attribute, bias)


def _module_forward(module: nn.Module) -> Callable:
    """The forward a call of ``module`` runs (an instance's own, else its class's; a
    ``ChunkedLMHead``'s logits, whatever it intercepts)."""
    from ..head import ChunkedLMHead

    if isinstance(module, ChunkedLMHead):
        return module.logits
    return module.__dict__.get("forward") or functools.partial(type(module).forward, module)


@contextmanager
def _intercepted(module: nn.Module, replacement: Callable) -> Iterator[None]:
    """Within the block, calling ``module`` (its hooks included) runs ``replacement``: through
    a ``ChunkedLMHead``'s flag (torch.compile traces it), else by swapping the forward."""
    from ..head import ChunkedLMHead

    if isinstance(module, ChunkedLMHead):
        module._intercept = replacement
        try:
            yield
        finally:
            module._intercept = None
        return
    saved = module.__dict__.get("forward")
    module.forward = replacement
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _effective_head(outer: nn.Module, hidden: Tensor):
    """``(head, hidden)``: a ``ChunkedLMHead`` and its input whose logits are those of
    ``outer(hidden)``. ``outer`` is a wrapped model's output module: its ``ChunkedLMHead``, or a
    PEFT layer around it (the copy a ``ModulesToSaveWrapper`` uses, a LoRA layer's effective
    weight)."""
    from ..head import ChunkedLMHead

    kind = _peft_layer_kind(outer)
    if kind == "modules_to_save":
        # ModulesToSaveWrapper.forward: the original module when adapters are off or an active
        # adapter has no copy, else the first active adapter's copy.
        active = outer.active_adapters
        if outer.disable_adapters or not active or any(a not in outer._adapters for a in active):
            return _effective_head(outer.original_module, hidden)
        return _effective_head(outer.modules_to_save[active[0]], hidden)
    if kind == "lora":
        return _lora_head(outer, hidden)
    if not isinstance(outer, ChunkedLMHead):
        raise ValueError(
            f"the output layer is a {type(outer).__name__} around the ChunkedLMHead, which "
            "chunklogits does not reproduce (PEFT's LoRA Linear and ModulesToSaveWrapper are)"
        )
    return outer, hidden


def _lora_head(layer: nn.Module, hidden: Tensor):
    """``_effective_head`` of PEFT's LoRA ``Linear``, whose forward is ``base(x) + sum over active
    adapters of lora_B(lora_A(dropout(x))) * scaling``. That is one linear layer over a wider
    input: ``[x, s * lora_A(dropout(x)), ...] @ [W, B, ...].T (+ b + s * lora_B.bias with
    lora_bias)``, the effective weight ``W + s * B @ A`` applied without forming ``B @ A``, the
    GEMMs ``r`` columns wider. The dropout mask is drawn as PEFT draws it (the same call at the
    same point of the forward, on the input cast to the adapter's dtype). Gradients reach ``A``
    and ``B`` and, if they require it, ``W`` and ``b``. The concatenated weight is one copy of
    ``W`` (``[V, D + r]``) per call."""
    from ..head import ChunkedLMHead

    base, base_hidden = _effective_head(layer.base_layer, hidden)
    if layer.disable_adapters:
        if layer.merged:
            layer.unmerge()  # as its forward does
        return base, base_hidden
    if layer.merged:
        return base, base_hidden
    weights, inputs, bias = [base.weight], [base_hidden], base.bias
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}):
            raise ValueError(
                f"the output layer's LoRA adapter {adapter!r} is a "
                f"{type(layer.lora_variant[adapter]).__name__} (DoRA or another variant), which "
                "ChunkedLMHead does not reproduce; plain LoRA is"
            )
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        scaling = layer.scaling[adapter]
        projected = lora_a(
            layer.lora_dropout[adapter](layer._cast_input_dtype(hidden, lora_a.weight.dtype))
        )
        inputs.append((projected * scaling).to(base_hidden.dtype))
        weights.append(lora_b.weight.to(base.weight.dtype))
        if lora_b.bias is not None:
            lora_bias = (lora_b.bias * scaling).to(base.weight.dtype)
            bias = lora_bias if bias is None else bias + lora_bias
    if len(weights) == 1:
        return base, base_hidden
    head = ChunkedLMHead(
        torch.cat(weights, dim=1),
        bias,
        shards=base.shards,
        softcap=base.softcap,
        logit_scale=base.logit_scale,
    )
    return head, torch.cat(inputs, dim=-1)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Dropout off and no autograd graph for the probe; every module's mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _probe_inputs(model: nn.Module, weight: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Token ids and labels of the probe, for an output layer of weight ``weight`` ``[V, D]``."""
    vocab = weight.shape[0]
    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, nn.Embedding):
        vocab = min(vocab, embeddings.num_embeddings)
    # Without the config's special tokens: an image token of a vision-language model would ask
    # for image features that the probe, made of tokens alone, does not give.
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[t for t in _special_tokens(model.config) if 0 <= t < vocab]] = False
    allowed = allowed.nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.randint(allowed.numel(), _PROBE_SHAPE, generator=generator)
    input_ids = allowed[drawn].to(weight.device)
    labels = input_ids.clone()
    labels[0, 2] = -100
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if is_encoder_decoder(model) and model.main_input_name != "input_ids":
        # An encoder of audio features (Whisper) or other non-token input: random encoder
        # output stands in for it; the decoder is what feeds the output layer.
        from transformers.modeling_outputs import BaseModelOutput

        width = getattr(model.config.get_text_config(encoder=True), "hidden_size", None)
        if width is None:
            raise ValueError(
                f"its main input is {model.main_input_name} and its config names no encoder "
                "hidden_size, from which the probe would make an encoder output"
            )
        encoded = torch.randn((*_PROBE_SHAPE, width), generator=generator)
        del inputs["input_ids"]
        inputs["encoder_outputs"] = BaseModelOutput(encoded.to(weight))
    return inputs, labels


def _unlabelled(model: nn.Module, inputs: dict, labels: Tensor) -> dict:
    """The probe's ``inputs`` for a call without labels: with an encoder-decoder model's
    decoder input, as its forward builds it from ``labels``."""
    if not is_encoder_decoder(model):
        return inputs
    return {**inputs, "decoder_input_ids": _decoder_input_ids(model, labels)}


def _special_tokens(config) -> list[int]:
    """The token ids a config names (``image_token_id``, ``image_token_index``, ``bos_token_id``,
    ...), its sub-configs' included."""
    tokens = []
    for name, value in config.to_dict().items():
        if isinstance(value, dict) and hasattr(getattr(config, name, None), "to_dict"):
            tokens += _special_tokens(getattr(config, name))
        elif name.endswith(("token_id", "token_index", "token_ids")):
            values = value if isinstance(value, list) else [value]
            tokens += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return tokens


def _check_probe_either_loss(model: nn.Module, heads: list, inputs: dict, labels, expected):
    """``_check_probe`` with the loss of transformers' ``ForCausalLMLoss``, else with the
    unshifted cross-entropy (``_Wrapping.shifted``); the first one's error if neither
    reproduces the original. An encoder-decoder model tries the unshifted one first, the one
    they all compute: in half precision the probe's tolerance may not tell the two losses of a
    random model apart (both near log V)."""
    first, second = (False, True) if is_encoder_decoder(model) else (True, False)
    for head in heads:
        head._wrapping.shifted = first
    try:
        _check_probe(model, heads[0], inputs, labels, expected)
    except ValueError as first_error:
        for head in heads:
            head._wrapping.shifted = second
        try:
            _check_probe(model, heads[0], inputs, labels, expected)
        except ValueError:
            raise first_error from None


def _check_probe(model: nn.Module, head, inputs: dict, labels: Tensor, expected) -> None:
    """The wrapped forward against the original's outputs ``expected`` on the probe inputs: the
    same transform of large raw logits (``_probe_head``), the same loss, the same logits without
    labels. Under autocast (the caller's ``torch.autocast``, or accelerate's around a prepared
    model's forward) the original's logits are rounded to the autocast dtype: the tolerances are
    then that dtype's, which tells its rounding (1e-2 relative in bf16) from a term added to the
    loss or a transform missing from the table (changes of order 1)."""
    unlabelled = _unlabelled(model, inputs, labels)
    eps = _probe_head(model, head.weight, head.softcap, head.logit_scale, unlabelled)
    got = model(**inputs, labels=labels)
    scale = 1.0 + expected.logits.abs().max().item()
    if not abs(got.loss.item() - expected.loss.item()) <= 8 * eps * scale:
        raise ValueError(
            f"loss {got.loss.item():.8g}, the original forward's {expected.loss.item():.8g} "
            "(is something added to the loss?)"
        )
    if not torch.equal(model(**unlabelled).logits, expected.logits):
        raise ValueError("logits without labels differ from the original forward's")


def _probe_head(
    model: nn.Module, weight: Tensor, softcap, logit_scale, inputs: dict, base=None
) -> float:
    """Run ``model(**inputs)`` with its output layer (``weight`` ``[V, D]``) handing back large
    raw logits, and check that the model's logits are those plus the bias its forward adds
    (``with_output_bias``) under the transform ``softcap`` / ``logit_scale`` (random-weight or
    small logits hardly show a softcap: raw logits far from 0 do); with ``base``, also that the
    output layer was fed ``base(**inputs).last_hidden_state`` (as code that runs the base model
    and the head itself assumes). Returns the eps of the precision the layer ran in (the
    autocast dtype, else the weight's): the tolerance unit. The hooks of a layer parallelised on
    the vocabulary (a DTensor weight) only lay out its input and output, which the plain raw
    logits stand in for: they are not run."""
    dtype = weight.dtype
    generator = torch.Generator().manual_seed(1)
    # The logits' positions: the decoder's of an encoder-decoder model.
    positions = inputs.get("decoder_input_ids", inputs.get("input_ids"))
    shape = (*positions.shape, weight.shape[0])
    raw = (torch.randn(shape, generator=generator) * _PROBE_LOGIT_STD).to(weight.device, dtype)
    autocast_dtypes, fed = [], []

    def raw_logits(hidden: Tensor) -> Tensor:
        if torch.is_autocast_enabled(hidden.device.type):
            autocast_dtypes.append(torch.get_autocast_dtype(hidden.device.type))
        fed.append(hidden)
        return raw.clone()

    outer = model.get_output_embeddings()
    with _intercepted(outer, raw_logits), _layout_hooks_skipped(outer, weight):
        theirs = model(**inputs).logits
    if theirs.shape != raw.shape:
        raise ValueError(
            f"its logits have shape {tuple(theirs.shape)}, not its output layer's "
            f"{tuple(raw.shape)} (the forward computes more from them, e.g. n-gram streams)"
        )
    eps = torch.finfo(autocast_dtypes[0] if autocast_dtypes else dtype).eps
    stat_dtype = torch.promote_types(dtype, torch.float32)
    biased = raw.to(stat_dtype, copy=True)
    added = with_output_bias(model, None, stat_dtype)
    ours = make_transform(softcap, logit_scale).apply_(biased if added is None else biased + added)
    excess = (theirs.to(stat_dtype) - ours).abs() - 4 * eps * (1.0 + ours.abs())
    if excess.max().item() > 0:
        worst = int(excess.argmax())
        raise ValueError(
            f"the forward maps a raw logit {raw.flatten()[worst].item():.6g} to "
            f"{theirs.flatten()[worst].item():.6g}, the transform read from the config gives "
            f"{ours.flatten()[worst].item():.6g} (is an unknown logit transform applied?)"
        )
    if base is None:
        return eps
    base_name = type(base).__name__
    last = getattr(base(**inputs), "last_hidden_state", None)
    if last is None:
        raise ValueError(f"its base model {base_name} returns no last_hidden_state")
    if len(fed) != 1 or fed[0].shape != last.shape:
        raise ValueError(
            f"the output layer is called {len(fed)} time(s) on shape "
            f"{[tuple(x.shape) for x in fed]}, not once on {base_name}'s last hidden state "
            f"{tuple(last.shape)}"
        )
    gap = (fed[0].to(stat_dtype) - last.to(stat_dtype)).abs()
    if (gap - 4 * eps * (1.0 + last.to(stat_dtype).abs())).max().item() > 0:
        raise ValueError(
            f"its output layer is not fed {base_name}'s last hidden state (they differ by up to "
            f"{gap.max().item():.3g}): what the model computes between them (such as a "
            "prediction head's dense layer and LayerNorm, or a scaling) is not reproduced"
        )
    return eps


@contextmanager
def _layout_hooks_skipped(layer: nn.Module, weight: Tensor) -> Iterator[None]:
    """Within the block, the forward hooks of ``layer`` are off when ``weight`` is a DTensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        yield
        return
    saved = layer._forward_pre_hooks, layer._forward_hooks
    layer._forward_pre_hooks, layer._forward_hooks = type(saved[0])(), type(saved[1])()
    try:
        yield
    finally:
        layer._forward_pre_hooks, layer._forward_hooks = saved


# check_head_reproduced's verdicts: per model, the parts it was given and the error (or None).
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_head_reproduced(
    model: nn.Module, base: nn.Module | None, *, softcap, logit_scale, caller: str
) -> None:
    """Refuse, with a ``ValueError`` naming ``caller`` and the model's class, a causal LM whose
    logits are not its output layer's applied to ``base(...).last_hidden_state`` under the
    transform ``softcap`` / ``logit_scale``, as code that runs the base model and computes the
    head from its weights (``cl.sample``) assumes: ``wrap``'s probe with the output layer's
    input checked as well (``_probe_head``, two forwards of 12 tokens). ``base`` None (an
    encoder-decoder model, whose output layer's input ``cl.sample`` records from its forward,
    ``recorded_forward``): the transform and the added bias (``with_output_bias``) only. The
    verdict is kept per model and rechecked only when its output layer, base model or transform
    is another."""
    outer = model.get_output_embeddings()
    parts = (weakref.ref(outer), None if base is None else weakref.ref(base), softcap, logit_scale)
    verdict = _VERDICTS.get(model)
    if verdict is None or verdict[0] != parts:
        with _evaluating(model):
            try:
                inputs = _unlabelled(model, *_probe_inputs(model, outer.weight))
                _probe_head(model, outer.weight, softcap, logit_scale, inputs, base=base)
                error = None
            except ValueError as failure:
                error = str(failure)
        verdict = _VERDICTS[model] = (parts, error)
    if verdict[1] is not None:
        raise ValueError(
            f"model: {caller} refuses {type(model).__name__}, whose head it does not reproduce: "
            f"{verdict[1]}"
        )
