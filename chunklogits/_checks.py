"""Argument checks shared by the public ops: each error names the argument, what was expected and
what came, before any block is computed."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._blocks import LogitTransform

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_head(hidden, weight, bias) -> None:
    """hidden ``[..., D]`` floating; weight ``[V, D]``, bias ``[V]``: hidden's dtype and device."""
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
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


def check_token_tensor(name: str, tokens, shape: tuple[int, ...], device: torch.device) -> Tensor:
    check_tensor(name, tokens)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {tokens.dtype}")
    if tuple(tokens.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} (hidden.shape[:-1]), got {tuple(tokens.shape)}"
        )
    if tokens.device != device:
        raise ValueError(f"{name}: expected hidden's device {device}, got {tokens.device}")
    return tokens


def check_in_vocab(name: str, tokens: Tensor, vocab: int, ignore_index: int | None = None) -> None:
    """Every entry of ``tokens`` (``[N]``, already filtered of ``ignore_index``) is in [0, V)."""
    if tokens.numel() == 0:
        return
    low, high = torch.aminmax(tokens)
    low, high = int(low), int(high)
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        extra = f" other than ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{name}: expected values in [0, {vocab}){extra}, got {bad}")


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


def make_transform(softcap, logit_scale, temperature=1.0) -> LogitTransform:
    softcap = check_positive_float("softcap", softcap, allow_none=True)
    if logit_scale is not None:
        if not isinstance(logit_scale, numbers.Real) or isinstance(logit_scale, bool):
            raise TypeError(f"logit_scale: expected a float or None, got {logit_scale!r}")
        if not (math.isfinite(logit_scale) and logit_scale != 0):
            raise ValueError(f"logit_scale: expected a finite non-zero float, got {logit_scale!r}")
        logit_scale = float(logit_scale)
    temperature = check_positive_float("temperature", temperature, allow_none=False)
    return LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)


def flat_rows(hidden: Tensor) -> Tensor:
    """``hidden [..., D]`` as ``[M, D]`` (a view when hidden is contiguous)."""
    return hidden.reshape(-1, hidden.shape[-1])
