"""Spend a budget of cells where the expected loss falls most.

Each group ``g`` (one weight, or one row of a layer) is stored ``r_g`` times and its reads are
averaged, so its expected loss term falls as ``c_g / r_g`` (``c_g = Σ importance × variance``
of one copy). :func:`allocate` minimises ``Σ c_g / r_g`` over integers ``1 <= r_g <= r_max``
with ``Σ n_g r_g <= budget`` (``n_g`` cells per copy). The objective is separable and convex
in ``r``, so taking increments in order of their gain per cell, ``c_g / (n_g r (r + 1))``, is
optimal for equal ``n_g`` (the exchange argument of marginal allocation); with unequal sizes it
is the usual greedy knapsack. The increments above a threshold ``λ`` have a closed form, so the
greedy order is found by bisection on ``λ`` instead of a heap.

Example:
    >>> import torch
    >>> allocate(torch.tensor([1.0, 4.0, 16.0]), budget=7).tolist()
    [1, 2, 4]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["R_MAX", "allocate", "allocation_objective", "entropy_bits"]

#: Most copies one group may get.
R_MAX = 64


def _copies(a: Tensor, lam: float, r_max: int) -> Tensor:
    """Copies each group takes at threshold ``lam``: increments with ``a/(r(r+1)) >= lam``."""
    if lam <= 0:
        return torch.full_like(a, r_max, dtype=torch.long)
    k = torch.floor((-1 + torch.sqrt(1 + 4 * a / lam)) / 2)
    r = (1 + k).clamp(1, r_max).long()
    # Repair rounding at the boundary: increment r-1 -> r must clear lam, r -> r+1 must not.
    rf = r.to(a.dtype)
    too_many = (r > 1) & (a / ((rf - 1) * rf) < lam)
    r = r - too_many.long()
    rf = r.to(a.dtype)
    too_few = (r < r_max) & (a / (rf * (rf + 1)) >= lam)
    return r + too_few.long()


def allocate(cost: Tensor, budget: int, sizes: Tensor | None = None,
             r_max: int = R_MAX) -> Tensor:
    """Copies per group minimising ``Σ cost / r`` within ``budget`` cells.

    Args:
        cost: (G,) expected loss of each group with one copy (``>= 0``).
        budget: Cells to spend, at least ``Σ sizes`` (one copy of each group).
        sizes: (G,) cells of one copy of each group (default 1).
        r_max: Most copies of one group.

    Returns:
        (G,) int64 copies, ``1 <= r <= r_max``, ``Σ sizes·r <= budget``.

    Raises:
        ValueError: If the budget does not cover one copy of each group, or costs are
            negative or not finite.
    """
    cost = torch.as_tensor(cost, dtype=torch.float64).reshape(-1)
    n = torch.ones_like(cost) if sizes is None else torch.as_tensor(sizes, dtype=torch.float64)
    if not torch.isfinite(cost).all() or (cost < 0).any():
        raise ValueError("allocation costs must be finite and >= 0")
    need = float(n.sum())
    if budget < need:
        raise ValueError(
            f"a budget of {budget} cells is below one copy of every stored weight ({need:g} "
            "cells); raise cells to at least one cell per kept weight"
        )
    a = cost / n
    if float(n.sum()) * r_max <= budget:
        return torch.full(cost.shape, r_max, dtype=torch.long)
    if a.numel() == 0 or float(a.max()) <= 0:
        return torch.ones(cost.shape, dtype=torch.long)
    # Smallest lam whose allocation fits: bisection in log space.
    hi = float(a.max()) / 2 + 1.0  # at lam > max a/2 nobody gets a second copy
    lo = hi
    while float((n * _copies(a, lo, r_max)).sum()) <= budget and lo > 1e-300:
        lo /= 16
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if float((n * _copies(a, mid, r_max)).sum()) <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-12:
            break
    r = _copies(a, hi, r_max)
    # Spend what is left on the next-best increments, in the greedy order.
    left = budget - float((n * r).sum())
    rf = r.to(torch.float64)
    gain = torch.where(r < r_max, a / (rf * (rf + 1)), torch.full_like(a, -1.0))
    for i in torch.argsort(gain, descending=True, stable=True).tolist():
        if left < 1 or gain[i] <= 0:
            break
        if n[i] <= left:
            r[i] += 1
            left -= float(n[i])
    return r


def allocation_objective(cost: Tensor, copies: Tensor) -> float:
    """``Σ cost / copies``, the expected loss an allocation leaves.

    Returns:
        A float.
    """
    return float((torch.as_tensor(cost, dtype=torch.float64) / copies.to(torch.float64)).sum())


def entropy_bits(values: Tensor) -> int:
    """Bits to store ``values`` with an ideal entropy coder: ``n·H`` of their histogram.

    Returns:
        ``ceil(n·H)`` (0 when every value is the same).

    Example:
        >>> entropy_bits(torch.tensor([0, 0, 1, 1]))
        4
    """
    values = torch.as_tensor(values).reshape(-1)
    if values.numel() == 0:
        return 0
    _, counts = torch.unique(values, return_counts=True)
    p = counts.to(torch.float64) / values.numel()
    return int(math.ceil(float(-(counts * p.log2()).sum()) - 1e-9))
