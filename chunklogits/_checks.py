"""Argument checks shared by the public ops: each error names the argument, what was expected and
what came, before any block is computed."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ._blocks import LogitTransform

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FP32_TINY = torch.finfo(torch.float32).tiny


def check_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_head(hidden, weight, bias) -> None:
    """hidden ``[..., D]`` floating; weight ``[V, D]``, bias ``[V]``: hidden's dtype and device."""
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if isinstance(tensor, DTensor):
            raise TypeError(
                f"{name}: got a DTensor; pass this rank's local slice and its process group: "
                "weight, bias, group = chunklogits.distributed.local_head(lm_head.weight, "
                "lm_head.bias), then process_group=group"
            )
    if hidden.dtype not in _FLOATING:
        raise TypeError(f"hidden: expected a floating-point tensor, got dtype {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight: expected at least one vocabulary row, got V = 0")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight: expected hidden's dtype {hidden.dtype}, got {weight.dtype} "
            "(cast one of them; mixing dtypes would silently change the precision)"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected hidden's device {hidden.device}, got {weight.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias: expected shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias: expected hidden's device {hidden.device}, got {bias.device}")


def check_integer_tensor(name: str, value) -> Tensor:
    check_tensor(name, value)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {value.dtype}")
    return value


def check_attention_mask(attention_mask, input_ids: Tensor) -> None:
    """``attention_mask``: None or a tensor of ``input_ids``' shape."""
    if attention_mask is None:
        return
    check_tensor("attention_mask", attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected input_ids' shape {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )


def check_token_tensor(name: str, tokens, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """An integer tensor of ``shape`` on ``device``, returned as int64 (any integer dtype is
    accepted: the indexing ops need int64)."""
    check_integer_tensor(name, tokens)
    if tuple(tokens.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} (hidden.shape[:-1]), got {tuple(tokens.shape)}"
        )
    if tokens.device != device:
        raise ValueError(f"{name}: expected hidden's device {device}, got {tokens.device}")
    return tokens.long()


def check_in_vocab(name: str, tokens: Tensor, vocab: int, ignore_index: int | None = None) -> None:
    """Every entry of ``tokens`` (``[N]``, already filtered of ``ignore_index``) is in [0, V)."""
    if tokens.numel() == 0 or tokens.is_meta:  # meta tensors carry shapes, no values
        return
    low, high = torch.aminmax(tokens)
    low, high = int(low), int(high)
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        extra = f" other than ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{name}: expected values in [0, {vocab}){extra}, got {bad}")


def check_num_items(num_items) -> None:
    """``num_items_in_batch``: a positive number or a one-element real tensor holding one
    (transformers' count of the labels of a whole accumulated batch). A count of 0 (every label
    of the batch ignored) is refused: the loss would divide by it (+-inf or NaN gradients)."""
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.dtype.is_complex:
            raise ValueError(
                "num_items_in_batch: expected a scalar, "
                f"got a tensor of shape {tuple(num_items.shape)}"
            )
        # One host read per call, as the labels' range check makes; meta tensors have no value.
        # While torch.compile traces, the custom op that takes the tensor checks it when it runs.
        if torch.compiler.is_compiling() or num_items.is_meta:
            return
        if not num_items.item() > 0:
            raise ValueError(f"num_items_in_batch: expected a positive count, got {num_items!r}")
        return
    if not isinstance(num_items, numbers.Real) or isinstance(num_items, bool) or num_items <= 0:
        raise ValueError(
            f"num_items_in_batch: expected a positive number or scalar tensor, got {num_items!r}"
        )


def check_positive_float(name: str, value, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{name}: expected a positive float{' or None' if allow_none else ''}, got {value!r}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite float > 0, got {value!r}")
    return float(value)


def check_temperature(
    temperature,
    shape: tuple[int, ...] | None,
    device=None,
    what: str = "hidden.shape[:-1]",
    read_values: bool = True,
) -> float | Tensor:
    """``temperature``: a float >= the smallest normal fp32 number, or (where ``shape`` is given)
    one per position: a floating tensor of ``shape`` (``what`` names it) or of ``prod(shape)``
    entries, on ``device``, not requiring grad, its entries finite and >= that number (one host
    read, skipped without ``read_values``: a custom op's caller while ``torch.compile`` traces,
    the op checking them when it runs). Returns the float, or the tensor as it came."""
    if shape is None or not isinstance(temperature, Tensor):
        low = high = temperature = check_positive_float(
            "temperature", temperature, allow_none=False
        )
    else:
        flat = (math.prod(shape),)
        if tuple(temperature.shape) not in (tuple(shape), flat):
            raise ValueError(
                f"temperature: expected a float or a tensor of shape {what} = {tuple(shape)} "
                f"(or {flat} flat), one per position, got shape {tuple(temperature.shape)}"
            )
        if not temperature.dtype.is_floating_point:
            raise TypeError(
                f"temperature: expected a float or a floating-point tensor, got dtype "
                f"{temperature.dtype}"
            )
        if temperature.device != device:
            owner = what.split(".")[0]
            raise ValueError(
                f"temperature: expected {owner}'s device {device}, got {temperature.device}"
            )
        if temperature.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "temperature: expected a tensor that does not require grad (no gradient is "
                "formed for the temperatures: pass temperature.detach()), got one that does"
            )
        if temperature.numel() == 0 or temperature.is_meta or not read_values:
            return temperature
        low, high = torch.stack(torch.aminmax(temperature.detach().double())).tolist()
    if not (low >= _FP32_TINY and math.isfinite(high)):
        bad = low if not low >= _FP32_TINY else high
        expected = "a float" if low is temperature else "finite values"
        raise ValueError(
            f"temperature: expected {expected} >= {_FP32_TINY} (the smallest normal fp32 number: "
            f"the logits are divided by it in fp32 and overflow below it), got {bad!r}"
        )
    return temperature


def make_transform(
    softcap,
    logit_scale,
    temperature=1.0,
    positions=None,
    what="hidden.shape[:-1]",
    read_values: bool = True,
) -> LogitTransform:
    """The ops' ``LogitTransform``. ``temperature`` may be a tensor, one per position, only where
    ``positions`` is given: the ``hidden [..., D]`` whose rows it divides (``check_temperature``,
    ``what`` naming its positions, ``read_values`` as there); it is then held as ``[M, 1]`` in
    the statistics' dtype (fp32, fp64 for fp64 hidden)."""
    softcap = check_positive_float("softcap", softcap, allow_none=True)
    if logit_scale is not None:
        if not isinstance(logit_scale, numbers.Real) or isinstance(logit_scale, bool):
            raise TypeError(f"logit_scale: expected a float or None, got {logit_scale!r}")
        if not (math.isfinite(logit_scale) and logit_scale != 0):
            raise ValueError(f"logit_scale: expected a finite non-zero float, got {logit_scale!r}")
        logit_scale = float(logit_scale)
    if positions is None or not isinstance(temperature, Tensor):
        temperature = check_temperature(temperature, None)
    else:
        check_temperature(temperature, positions.shape[:-1], positions.device, what, read_values)
        stat_dtype = torch.promote_types(positions.dtype, torch.float32)
        temperature = temperature.detach().reshape(-1, 1).to(stat_dtype)
    return LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)


def flat_rows(hidden: Tensor) -> Tensor:
    """``hidden [..., D]`` as ``[M, D]`` (a view when hidden is contiguous; D may be 0)."""
    return hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])


def check_real_in(
    name: str,
    value,
    low: float,
    high: float | None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A real number in ``[low, high]`` (``(low`` with ``low_open``, ``high)`` with
    ``high_open``; no upper bound for ``high=None``), returned as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a float, got {value!r}")
    above_low = value > low if low_open else value >= low
    below_high = high is None or (value < high if high_open else value <= high)
    if not (above_low and below_high):
        if high is None:
            expected = f"{'>' if low_open else '>='} {low}"
        else:
            expected = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a float {expected}, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (a ``reduction``, ...)."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_ignore_index(ignore_index) -> int:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    return ignore_index


def check_shift(name: str, hidden: Tensor, shift) -> None:
    """``shift=True`` (predict position ``t + 1`` from ``t``) needs a position axis: ``hidden``
    (called ``name``) ``[..., T, D]``."""
    if shift and hidden.dim() < 2:
        raise ValueError(f"{name}: shift=True needs shape [..., T, D], got {tuple(hidden.shape)}")


def check_sampling_options(
    *,
    do_sample,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=None,
    repetition_penalty=1.0,
    epsilon_cutoff=None,
    eta_cutoff=None,
) -> None:
    """HF's sampling settings: ``top_k`` an int >= 0 (0: off), ``top_p`` in (0, 1] (1: off),
    ``min_p`` None or in [0, 1], ``repetition_penalty`` > 0, ``temperature`` > 0 when sampling,
    ``epsilon_cutoff`` and ``eta_cutoff`` None or in (0, 1). Those not given take their neutral
    value."""
    check_bool("do_sample", do_sample)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise TypeError(f"top_k: expected an int (0 turns top-k off), got {top_k!r}")
    if top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 turns top-k off), got {top_k}")
    check_real_in("top_p", top_p, 0.0, 1.0, low_open=True)
    if min_p is not None:
        check_real_in("min_p", min_p, 0.0, 1.0)
    for name, cutoff in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
        if cutoff is not None:
            check_real_in(name, cutoff, 0.0, 1.0, low_open=True, high_open=True)
    check_positive_float("repetition_penalty", repetition_penalty, allow_none=False)
    if do_sample:
        check_positive_float("temperature", temperature, allow_none=False)
    elif not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature: expected a float, got {temperature!r}")
