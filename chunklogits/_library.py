"""The differentiable ops as ``torch.library`` custom ops, for ``torch.compile``.

Dynamo cannot trace the engine (its Python loops over blocks, its data-dependent row selection
and checks, its ``autograd.Function`` with non-tensor state), so under ``torch.compile`` the
public ops call these instead, each one opaque node of the graph:
``chunklogits::linear_cross_entropy``, ``chunklogits::linear_cross_entropy_and_grads`` and
``chunklogits::token_logprobs``. Their implementation is the public op itself, run eagerly on
the real tensors (every check included: bad input fails there as it does eagerly): the engine's
code in both directions, no second copy of the math.

A scalar loss (reduction "mean" or "sum") of which some input needs a gradient (known while
the graph is traced) is ``..._and_grads``: it runs the public op with autograd on and takes the
gradients of the inputs that need one at once, by the eager op's own backward, for a loss
gradient of 1, and returns them with the loss; its backward only multiplies them by the loss's
incoming gradient (out of place: a backward with ``retain_graph=True`` may run again). That is
the eager training step's work, GEMM for GEMM (8 ``N V D`` flops on the recomputing path, 6 on
``grad_in_forward``'s fused one, whichever the eager default picks: ``test_torch_compile``
counts them); the gradients exist from the forward pass on, as on the fused path, and a
half-precision gradient is rounded before that multiplication (exact for the usual gradient
of 1).

Vector outputs (reduction "none", ``token_logprobs``) have no such single gradient: their
forward op runs the public op with autograd off, and their backward is a second custom op
(``..._backward``) that runs the public op again with autograd on and returns the gradients
its own backward computes against the incoming ones. The price is one more pass of GEMMs over
the head (``2 N V D`` flops) than eager: the backward's own forward pass, the first one's
statistics not being kept across the graph. Eager calls never come here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

# The differentiable tensor arguments of each op, in schema order (the others are integer or
# options); the backward op returns the gradients of those autograd asks for.
_LOSS_GRADS = ("hidden", "weight", "bias", "class_weight")
_LOGPROBS_GRADS = ("hidden", "weight", "bias")


def _input_grads(
    run: Callable[..., Sequence[Tensor]],
    tensors: dict[str, Tensor | None],
    names: tuple[str, ...],
    needs: Sequence[bool],
    grad_outputs: Sequence[Tensor | None] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """``(outputs, gradients)``: the outputs of ``run(**leaves)`` (a sequence) and their
    gradients against ``grad_outputs`` (None: ones, a scalar's own) with respect to the tensors
    ``names`` that ``needs`` marks, by the eager op's own backward; zeros where the outputs do
    not depend on one (every label ignored)."""
    leaves = dict(tensors)
    wanted = []
    for name, need in zip(names, needs, strict=True):
        if need:
            leaves[name] = tensors[name].detach().requires_grad_()
            wanted.append(leaves[name])
    with _autograd_on():
        outputs = run(**leaves)
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(out) for out in outputs]
    pairs = [
        (out, grad)
        for out, grad in zip(outputs, grad_outputs, strict=True)
        if grad is not None and out.grad_fn is not None
    ]
    outputs = [out.detach() for out in outputs]
    grads = [None] * len(wanted)
    if pairs:
        grads = torch.autograd.grad(
            [out for out, _ in pairs], wanted, [grad for _, grad in pairs], allow_unused=True
        )
    found = zip(wanted, grads, strict=True)
    return outputs, [
        torch.zeros(leaf.shape, dtype=leaf.dtype, device=leaf.device)
        if grad is None
        else grad.contiguous()  # the strides _fake_grads promises, whatever the input's
        for leaf, grad in found
    ]


def _fake_grads(tensors: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor]:
    """The gradients ``_input_grads`` returns for ``tensors`` that ``needs`` marks, as
    ``register_fake`` describes them: contiguous, of the tensors' shapes and dtypes."""
    return [t.new_empty(t.shape) for t, need in zip(tensors, needs, strict=True) if need]


def temperature_arguments(temperature: float | Tensor) -> tuple[float, Tensor | None]:
    """A public op's checked ``temperature`` as the custom ops' ``(temperature,
    position_temperature)`` arguments: the float and None, or 1.0 and the per-position tensor."""
    return (1.0, temperature) if isinstance(temperature, Tensor) else (float(temperature), None)


@contextmanager
def _autograd_on() -> Iterator[None]:
    """Autograd on inside a custom op's implementation, which the dispatcher runs with the
    autograd keys excluded (and grad mode off): the backward op runs the public op's own
    forward and backward there."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _register_autograd(op, backward_op, names: tuple[str, ...]) -> None:
    """Make ``backward_op(grads, needs, *op's arguments)``, which returns the gradients of the
    tensors ``names`` that ``needs`` marks, ``op``'s backward."""
    schema = [argument.name for argument in op._opoverload._schema.arguments]
    positions = [schema.index(name) for name in names]

    def setup_context(ctx, inputs, output) -> None:
        # Tensors are saved for backward; the other arguments travel as they are.
        ctx.is_tensor = [isinstance(value, Tensor) for value in inputs]
        ctx.options = [None if isinstance(value, Tensor) else value for value in inputs]
        ctx.save_for_backward(*(value for value in inputs if isinstance(value, Tensor)))

    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if t else v for v, t in zip(ctx.options, ctx.is_tensor, strict=True)]
        needs = [ctx.needs_input_grad[position] for position in positions]
        computed = iter(backward_op(list(grads), needs, *inputs))
        result = [None] * len(inputs)
        for position, need in zip(positions, needs, strict=True):
            if need:
                result[position] = next(computed)
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


def _register_scaled_autograd(op, names: tuple[str, ...]) -> None:
    """Make the backward of ``op(needs, *arguments) -> [loss, *gradients]``, whose gradients
    are those of a scalar loss, for a loss gradient of 1, with respect to the tensors ``names``
    that ``needs`` marks, those gradients times the loss's incoming gradient."""
    schema = [argument.name for argument in op._opoverload._schema.arguments]
    positions = [schema.index(name) for name in names]

    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output[1:])
        ctx.positions = [p for p, need in zip(positions, inputs[0], strict=True) if need]
        ctx.inputs = len(inputs)

    def backward(ctx, grads):
        result = [None] * ctx.inputs
        for position, grad in zip(ctx.positions, ctx.saved_tensors, strict=True):
            if ctx.needs_input_grad[position]:
                result[position] = grads[0] * grad  # a new tensor: the saved one stays as it is
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


def _stat_dtype(hidden: Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)


# --- linear_cross_entropy ---------------------------------------------------------------------


def _loss_call(
    hidden, weight, labels, bias, class_weight, num_items_in_batch, shards, chunk_size,
    ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, temperature,
    position_temperature, shift, grad_in_forward,
) -> Tensor:  # fmt: skip
    from .loss import linear_cross_entropy

    loss = linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias=bias,
        class_weight=class_weight,
        num_items_in_batch=num_items_in_batch,
        shards=shards,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        temperature=temperature if position_temperature is None else position_temperature,
        shift=shift,
        grad_in_forward=grad_in_forward,
    )
    return loss.contiguous()  # with shift, "none" is a view of its [..., T] buffer


@torch.library.custom_op("chunklogits::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    num_items_in_batch: Tensor | None,
    shards: int | None,
    chunk_size: int | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float | None,
    temperature: float,
    position_temperature: Tensor | None,
    shift: bool,
    grad_in_forward: bool | None,
) -> Tensor:
    """``chunklogits.linear_cross_entropy`` with these arguments (a count ``num_items_in_batch``
    as a tensor; a float ``temperature`` or, when given, the ``position_temperature`` tensor),
    without its autograd graph."""
    with torch.no_grad():
        return _loss_call(**locals())


@linear_cross_entropy.register_fake
def _(hidden, weight, labels, bias, class_weight, num_items_in_batch, shards, chunk_size,
      ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, temperature,
      position_temperature, shift, grad_in_forward):  # fmt: skip
    if reduction != "none":
        return hidden.new_empty((), dtype=_stat_dtype(hidden))
    shape = (*labels.shape[:-1], labels.shape[-1] - 1) if shift else labels.shape
    return hidden.new_empty(shape, dtype=_stat_dtype(hidden))


@torch.library.custom_op("chunklogits::linear_cross_entropy_and_grads", mutates_args=())
def linear_cross_entropy_and_grads(
    needs: list[bool],
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    num_items_in_batch: Tensor | None,
    shards: int | None,
    chunk_size: int | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float | None,
    temperature: float,
    position_temperature: Tensor | None,
    shift: bool,
    grad_in_forward: bool | None,
) -> list[Tensor]:
    """``[loss, *gradients]``: ``linear_cross_entropy``'s scalar loss (``reduction`` "mean" or
    "sum") and its gradients, for a loss gradient of 1, with respect to those of ``(hidden,
    weight, bias, class_weight)`` that ``needs`` marks, in that order, from one eager call."""
    arguments = dict(locals())
    del arguments["needs"]
    tensors = {name: arguments.pop(name) for name in _LOSS_GRADS}

    def run(**leaves):
        return [_loss_call(**leaves, **arguments)]

    (loss,), grads = _input_grads(run, tensors, _LOSS_GRADS, needs)
    return [loss, *grads]


@linear_cross_entropy_and_grads.register_fake
def _(needs, hidden, weight, labels, bias, class_weight, *args):
    grads = _fake_grads((hidden, weight, bias, class_weight), needs)
    return [hidden.new_empty((), dtype=_stat_dtype(hidden)), *grads]


_register_scaled_autograd(linear_cross_entropy_and_grads, _LOSS_GRADS)


@torch.library.custom_op("chunklogits::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grads: list[Tensor | None],
    needs: list[bool],
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    num_items_in_batch: Tensor | None,
    shards: int | None,
    chunk_size: int | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float | None,
    temperature: float,
    position_temperature: Tensor | None,
    shift: bool,
    grad_in_forward: bool | None,
) -> list[Tensor]:
    """The gradients of ``linear_cross_entropy``'s loss against ``grads`` (one) with respect to
    those of ``(hidden, weight, bias, class_weight)`` that ``needs`` marks, in that order."""
    arguments = dict(locals())
    del arguments["grads"], arguments["needs"]
    tensors = {name: arguments.pop(name) for name in _LOSS_GRADS}

    def run(**leaves):
        return [_loss_call(**leaves, **arguments)]

    return _input_grads(run, tensors, _LOSS_GRADS, needs, grads)[1]


@linear_cross_entropy_backward.register_fake
def _(grads, needs, hidden, weight, labels, bias, class_weight, *args):
    return _fake_grads((hidden, weight, bias, class_weight), needs)


_register_autograd(linear_cross_entropy, linear_cross_entropy_backward, _LOSS_GRADS)


# --- token_logprobs ---------------------------------------------------------------------------


def _logprobs_call(
    hidden, weight, tokens, bias, temperature, position_temperature, return_entropy, softcap,
    logit_scale, shards, chunk_size,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from .logprobs import token_logprobs

    results = token_logprobs(
        hidden,
        weight,
        tokens,
        bias=bias,
        temperature=temperature if position_temperature is None else position_temperature,
        return_entropy=return_entropy,
        softcap=softcap,
        logit_scale=logit_scale,
        shards=shards,
        chunk_size=chunk_size,
    )
    if return_entropy:
        return results
    return results, results.new_empty(0)  # a schema's outputs are fixed: no entropy, 0 entries


@torch.library.custom_op("chunklogits::token_logprobs", mutates_args=())
def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    bias: Tensor | None,
    temperature: float,
    position_temperature: Tensor | None,
    return_entropy: bool,
    softcap: float | None,
    logit_scale: float | None,
    shards: int | None,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """``chunklogits.token_logprobs`` with these arguments (a float ``temperature`` or, when
    given, the ``position_temperature`` tensor), without its autograd graph: ``(logprobs,
    entropy)``, the entropy with 0 entries unless ``return_entropy``."""
    with torch.no_grad():
        return _logprobs_call(**locals())


@token_logprobs.register_fake
def _(hidden, weight, tokens, bias, temperature, position_temperature, return_entropy, *args):
    logprobs = hidden.new_empty(tokens.shape, dtype=_stat_dtype(hidden))
    return logprobs, torch.empty_like(logprobs) if return_entropy else logprobs.new_empty(0)


@torch.library.custom_op("chunklogits::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(
    grads: list[Tensor | None],
    needs: list[bool],
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    bias: Tensor | None,
    temperature: float,
    position_temperature: Tensor | None,
    return_entropy: bool,
    softcap: float | None,
    logit_scale: float | None,
    shards: int | None,
    chunk_size: int | None,
) -> list[Tensor]:
    """The gradients of ``token_logprobs``' outputs against ``grads`` (of the log-probs and the
    entropy) with respect to those of ``(hidden, weight, bias)`` that ``needs`` marks, in that
    order."""
    arguments = dict(locals())
    del arguments["grads"], arguments["needs"]
    tensors = {name: arguments.pop(name) for name in _LOGPROBS_GRADS}

    def run(**leaves):
        return _logprobs_call(**leaves, **arguments)

    return _input_grads(run, tensors, _LOGPROBS_GRADS, needs, grads)[1]


@token_logprobs_backward.register_fake
def _(grads, needs, hidden, weight, tokens, bias, *args):
    return _fake_grads((hidden, weight, bias), needs)


_register_autograd(token_logprobs, token_logprobs_backward, _LOGPROBS_GRADS)
