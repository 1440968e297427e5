"""transformers: chunked loss and log-probs for any ``*ForCausalLM`` without copying its forward.

A transformers causal LM's forward runs the base model, slices the last hidden states to
``logits_to_keep``, calls its output layer, applies a family-specific transform to the logits
(Gemma's softcap, Cohere's scale, ...) and, given labels, calls ``ForCausalLMLoss``. Rather than
re-implementing that forward once per family, the wrapped forward runs the *original* one without
the labels while the ``ChunkedLMHead`` records the hidden states it is called with and hands back
an empty ``[..., 0]`` stand-in for the logits. The loss is then the chunked cross-entropy of those
hidden states under the transform read from the config (``_TRANSFORM_ATTRIBUTES``). Whatever the
original forward does up to its output layer (inputs, caches, ``logits_to_keep``, scaling of the
hidden states) is reproduced by construction; what it does after it is reproduced only for the
transforms in the table and ``ForCausalLMLoss``, and ``wrap`` checks that claim on the model
itself with a probe before it returns.

Nothing here imports transformers at module level: ``import chunklogits`` stays light.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_attention_mask, check_integer_tensor, check_tensor, make_transform
from ..distributed import local_head

# Config attributes of logit transforms applied after the output layer: (attribute, the
# ChunkedLMHead argument it sets, how its value maps to that argument). Read from the text config.
_TRANSFORM_ATTRIBUTES = (
    ("final_logit_softcapping", "softcap", float),  # Gemma-2, Gemma-3: c * tanh(x / c)
    ("logit_scale", "logit_scale", float),  # Cohere, Cohere2: x * logit_scale
    ("logits_scaling", "logit_scale", lambda value: 1.0 / value),  # Granite: x / logits_scaling
)

# The probe: 2 sequences of 6 random tokens, one label ignored; raw logits up to ~4 x this
# magnitude exercise the transform where it is far from the identity (Gemma-2 caps at 30).
_PROBE_SHAPE = (2, 6)
_PROBE_LOGIT_STD = 40.0


@dataclass
class _Wrapping:
    """What ``unwrap`` restores, kept on the head (so it follows ``copy.deepcopy`` of the model)."""

    original_layer: nn.Module
    instance_forward: Callable | None  # a forward set on the instance before wrapping, if any
    parameter_names: tuple[str, ...]  # the original forward's positional parameters, without self

    def original_forward(self, model: nn.Module) -> Callable:
        if self.instance_forward is not None:
            return self.instance_forward
        return types.MethodType(type(model).forward, model)


def logit_transform(config) -> dict[str, float | None]:
    """``{"softcap": ..., "logit_scale": ...}`` of a transformers config (its text config for
    multimodal ones), from ``_TRANSFORM_ATTRIBUTES``; None where the family has none."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    transform: dict[str, float | None] = {"softcap": None, "logit_scale": None}
    found = {}
    for attribute, argument, convert in _TRANSFORM_ATTRIBUTES:
        value = getattr(text_config, attribute, None)
        if value is None:
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


def wrap(
    head_class: type, model: nn.Module, *, shards: int | None, return_logits: bool
) -> nn.Module:
    """``ChunkedLMHead.wrap`` (documented there)."""
    name = type(model).__name__
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits: expected a bool, got {return_logits!r}")
    layer = _output_layer(model)
    head = head_class(layer.weight, layer.bias, shards=shards, **logit_transform(model.config))
    head.return_logits = return_logits
    with _evaluating(model):
        inputs, labels = _probe_inputs(model, layer)
        expected = model(**inputs, labels=labels)
        _install(model, head, layer)
        try:
            _check_probe(model, head, inputs, labels, expected)
        except Exception as error:
            unwrap(model)
            raise ValueError(
                f"ChunkedLMHead.wrap: refusing {name} ({head.extra_repr()}), the wrapped forward "
                f"does not reproduce the original: {error}"
            ) from error
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """``ChunkedLMHead.unwrap`` (documented there)."""
    head = _wrapped_head(model)
    if head is None:
        raise ValueError(
            "model: expected a model wrapped by ChunkedLMHead.wrap, "
            f"got an unwrapped {type(model).__name__}"
        )
    wrapping = head._wrapping
    layer = wrapping.original_layer
    layer.weight = head.weight
    if head.bias is not None:
        layer.bias = head.bias
    model.set_output_embeddings(layer)
    if wrapping.instance_forward is None:
        del model.forward
    else:
        model.forward = wrapping.instance_forward
    head._wrapping = None
    return model


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each next token under a causal LM, and optionally the entropy, without
    the logits: what RL trainers (TRL's GRPO/PPO ``selective_log_softmax``, verl's
    ``logprobs_from_logits``) compute from full logits.

    Naive equivalent (``reference.sequence_logprobs``)::

        z = model(input_ids, attention_mask=attention_mask).logits[:, :-1].float() / temperature
        logprobs = z.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        # both 0 where attention_mask[:, 1:] == 0

    Args:
        model: a transformers ``*ForCausalLM``. A model wrapped by ``ChunkedLMHead.wrap`` is used
            as is; any other is wrapped for the call and unwrapped after it, which repeats the
            wrap-time probe (two forwards of 12 tokens) per call: wrap once to avoid it.
        input_ids: ``[B, T]`` integer tokens, ``T >= 2``.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding) or None; passed to the model.
            Positions whose *predicted* token is padding get 0 and cost nothing.
        temperature: divides the model's (softcapped, scaled) logits before the log-softmax.
        return_entropy: also return the entropy of each position's tempered distribution.

    Returns:
        fp32 ``[B, T - 1]``: ``logprobs[b, t] = log p(input_ids[b, t + 1] | input_ids[b, :t + 1])``
        (and the entropy, same shape), differentiable with respect to the model's parameters.
    """
    _check_sequences(input_ids, attention_mask)
    head = _wrapped_head(model)
    if head is None:
        from ..head import ChunkedLMHead

        wrap(ChunkedLMHead, model, shards=None, return_logits=False)
        try:
            return sequence_logprobs(
                model,
                input_ids,
                attention_mask,
                temperature=temperature,
                return_entropy=return_entropy,
            )
        finally:
            unwrap(model)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    _, hidden = _forward_recording(
        head._wrapping.original_forward(model), head, inputs, keep_logits=False
    )
    hidden, next_tokens = hidden[:, :-1], input_ids[:, 1:].to(hidden.device)
    options = {"temperature": temperature, "return_entropy": return_entropy}
    if attention_mask is None:
        return head.token_logprobs(hidden, next_tokens, **options)
    real = attention_mask[:, 1:].to(hidden.device).bool()
    results = head.token_logprobs(hidden[real], next_tokens[real], **options)
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


def _wrapped_head(model: nn.Module):
    """The ``ChunkedLMHead`` that ``wrap`` installed in ``model``, or None."""
    from ..head import ChunkedLMHead

    get = getattr(model, "get_output_embeddings", None)
    layer = get() if get is not None else None
    return layer if isinstance(layer, ChunkedLMHead) and layer._wrapping is not None else None


def _output_layer(model: nn.Module) -> nn.Linear:
    """The model's output layer, if it is one whose forward and loss we reproduce."""
    name = type(model).__name__
    if (
        not isinstance(model, nn.Module)
        or not hasattr(model, "get_output_embeddings")
        or not hasattr(model, "config")
    ):
        raise TypeError(
            f"model: expected a transformers *ForCausalLM (a PreTrainedModel with an output "
            f"embedding), got {name}"
        )
    if _wrapped_head(model) is not None:
        raise ValueError(
            f"model: {name} is already wrapped by ChunkedLMHead.wrap (unwrap it first)"
        )
    layer = model.get_output_embeddings()
    if layer is None:
        raise ValueError(
            f"model: {name} has no output embedding (get_output_embeddings() is None); "
            "wrap the *ForCausalLM model, not its base model"
        )
    if type(layer) is not nn.Linear:
        raise ValueError(
            f"model: {name}'s output layer is a {type(layer).__module__}.{type(layer).__name__}, "
            "expected a plain torch.nn.Linear (quantised or adapted layers are not reproduced)"
        )
    # A layer parallelised on the vocabulary (ColwiseParallel: a DTensor weight, its layouts set
    # by hooks) is kept: the head calls it for plain logits (see ChunkedLMHead).
    parallel = local_head(layer.weight, layer.bias).process_group is not None
    hooked = layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook")
    if hooked and not parallel:
        raise ValueError(
            f"model: {name}'s output layer has forward hooks (e.g. accelerate's device placement), "
            "which replacing it would drop"
        )
    if layer.weight.device.type == "meta":
        raise ValueError(
            f"model: {name}'s output layer is on the meta device; load its weights first"
        )
    from transformers.loss.loss_utils import ForCausalLMLoss

    loss_function = getattr(model, "loss_function", None)
    if loss_function is not ForCausalLMLoss:
        raise ValueError(
            f"model: {name}'s loss_function is "
            f"{getattr(loss_function, '__name__', loss_function)}, "
            "expected transformers' ForCausalLMLoss (other losses are not reproduced)"
        )
    return layer


def _install(model: nn.Module, head, layer: nn.Module) -> None:
    class_forward = type(model).forward
    parameters = list(inspect.signature(class_forward).parameters.values())[1:]  # without self
    positional = tuple(p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD)
    head._wrapping = _Wrapping(layer, model.__dict__.get("forward"), positional)
    model.set_output_embeddings(head)

    # A function per wrap, carrying the class forward's signature (transformers.Trainer reads it
    # to pick the columns and loss arguments to pass), bound to the instance so that
    # ``copy.deepcopy(model)`` binds the copy's forward to the copy.
    @functools.wraps(class_forward)
    def forward(self, *args, **kwargs):
        return _chunked_forward(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)


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
    original = wrapping.original_forward(model)
    labels = kwargs.pop("labels", None)
    if labels is None:
        return original(**kwargs)
    check_tensor("labels", labels)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    outputs, hidden = _forward_recording(original, head, kwargs, keep_logits=head.return_logits)
    if getattr(outputs, "aux_loss", None) is not None:
        raise ValueError(
            f"{type(model).__name__}: its outputs carry an auxiliary (router) loss, which "
            "ChunkedLMHead does not add to the loss; pass output_router_logits=False or unwrap"
        )
    # transformers' ForCausalLMLoss: labels shifted left by one (or shift_labels given),
    # ignore_index -100, the sum divided by num_items_in_batch when given.
    shift_labels = kwargs.get("shift_labels")
    targets = labels if shift_labels is None else check_tensor("shift_labels", shift_labels)
    loss = head.loss(
        hidden,
        targets.to(hidden.device),
        ignore_index=kwargs.get("ignore_index", -100),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
        shift=shift_labels is None,
    )
    fields = dict(outputs.items())
    fields["loss"] = loss
    if not head.return_logits:
        fields.pop("logits", None)
    result = type(outputs)(**fields)
    return result if return_dict else result.to_tuple()


def _forward_recording(original: Callable, head, kwargs: dict, *, keep_logits: bool):
    """Run ``original(**kwargs)`` while the head records its input; returns (outputs, hidden)."""
    seen = []

    def record(hidden: Tensor) -> Tensor:
        seen.append(hidden)
        if keep_logits:
            return head._linear(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    with head._intercepted(record):
        outputs = original(**kwargs, return_dict=True)
    if len(seen) != 1:
        raise RuntimeError(f"the forward called its output layer {len(seen)} times, expected once")
    return outputs, seen[0]


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


def _probe_inputs(model: nn.Module, layer: nn.Linear) -> tuple[dict[str, Tensor], Tensor]:
    vocab = layer.out_features
    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, nn.Embedding):
        vocab = min(vocab, embeddings.num_embeddings)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(vocab, _PROBE_SHAPE, generator=generator).to(layer.weight.device)
    labels = input_ids.clone()
    labels[0, 2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, labels


def _check_probe(model: nn.Module, head, inputs: dict, labels: Tensor, expected) -> None:
    """The wrapped forward against the original's outputs ``expected`` on the probe inputs: the
    same transform of large raw logits, the same loss, the same logits without labels."""
    dtype = head.weight.dtype
    eps = torch.finfo(dtype).eps
    # Random-weight (or small) logits hardly show a softcap: feed the forward's transform raw
    # logits far from 0 and compare with the transform read from the config.
    generator = torch.Generator().manual_seed(1)
    shape = (*inputs["input_ids"].shape, head.out_features)
    raw = (torch.randn(shape, generator=generator) * _PROBE_LOGIT_STD).to(head.weight.device, dtype)
    with head._intercepted(lambda hidden: raw.clone()):
        theirs = model(**inputs).logits
    stat_dtype = torch.promote_types(dtype, torch.float32)
    ours = make_transform(head.softcap, head.logit_scale).apply_(raw.to(stat_dtype, copy=True))
    excess = (theirs.to(stat_dtype) - ours).abs() - 4 * eps * (1.0 + ours.abs())
    if excess.max().item() > 0:
        worst = int(excess.argmax())
        raise ValueError(
            f"the forward maps a raw logit {raw.flatten()[worst].item():.6g} to "
            f"{theirs.flatten()[worst].item():.6g}, the transform read from the config gives "
            f"{ours.flatten()[worst].item():.6g} (is an unknown logit transform applied?)"
        )
    got = model(**inputs, labels=labels)
    scale = 1.0 + expected.logits.abs().max().item()
    if not abs(got.loss.item() - expected.loss.item()) <= 8 * eps * scale:
        raise ValueError(
            f"loss {got.loss.item():.8g}, the original forward's {expected.loss.item():.8g} "
            "(is something added to the loss?)"
        )
    if not torch.equal(model(**inputs).logits, expected.logits):
        raise ValueError("logits without labels differ from the original forward's")
