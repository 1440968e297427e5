"""Shared test helpers: seeding, per-dtype tolerances and the relative accuracy oracle."""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Absolute slack on top of the naive same-dtype error, as a multiple of the largest magnitude of
# the fp64 result: covers a different but equally valid order of fp32 accumulation, and
# half-precision partial sums that round once more than the naive single GEMM does.
_SLACK = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def assert_as_accurate(ours: Tensor, naive: Tensor, exact: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """The accuracy oracle of design.md: ``|exact - ours| <= |exact - naive| + slack`` elementwise,
    where ``exact`` is the fp64 ground truth and ``naive`` the materialising computation in
    ``dtype``; ``slack = _SLACK[dtype] * max|exact|``."""
    exact = exact.double()
    ours_error = (ours.double() - exact).abs()
    naive_error = (naive.double() - exact).abs()
    slack = _SLACK[dtype] * max(exact.abs().max().item(), 1e-30) if exact.numel() else 0.0
    excess = ours_error - naive_error - slack
    if exact.numel() and excess.max().item() > 0:
        worst = int(excess.argmax())
        raise AssertionError(
            f"{what}: ours is less accurate than the naive {dtype} computation at flat index "
            f"{worst}: |exact - ours| = {ours_error.flatten()[worst].item():.3g}, "
            f"|exact - naive| = {naive_error.flatten()[worst].item():.3g}, slack = {slack:.3g} "
            f"(exact {exact.flatten()[worst].item():.6g}, ours {ours.flatten()[worst].item():.6g})"
        )


def chi_square_pvalue(counts: Tensor, probs: Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test that ``counts`` ``[V]`` were drawn from ``probs``
    ``[V]``. Categories expected fewer than ``min_expected`` times are pooled into one, so the
    chi-square approximation holds."""
    expected = probs.double() * counts.sum().double()
    counts = counts.double()
    small = expected < min_expected
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected).square() / expected).sum()
    dof = observed.numel() - 1
    if dof == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2.0).item()
