"""Rank measures of weight matrices and layers.

For singular values σ_1 ≥ … ≥ σ_Q ≥ 0 of a matrix (Q = min(m, n)):

* effective rank (Roy & Vetterli, EUSIPCO 2007): ``exp(H(p))`` with ``p_k = σ_k / Σ_j σ_j``
  and ``H`` the Shannon entropy, so ``1 ≤ erank ≤ rank``;
* stable rank ``‖W‖_F² / ‖W‖_2² = Σσ_k² / σ_1²``;
* nuclear norm ``‖W‖_* = Σσ_k`` (the ℓ1 norm of the spectrum, the convex rank surrogate);
* ℓ1 rank ``(‖σ‖_1 / ‖σ‖_2)²`` (the ℓ1/ℓ2 sparsity measure of the spectrum, in rank units);
* energy rank: the smallest ``r`` with ``Σ_{k≤r} σ_k² ≥ e · Σ_k σ_k²``.

A convolution weight (T, S, kh, kw) is read as a matrix through :func:`unfold`: mode 0 gives
the T × S·kh·kw matrix (output channels, the default), mode 1 the S × T·kh·kw matrix.

Example:
    >>> import torch
    >>> w = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    >>> round(effective_rank(w), 4), stable_rank(w), energy_rank(w, 0.99)
    (2.0, 2.0, 2)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

F = TypeVar("F", bound=Callable)

__all__ = [
    "single_threaded",
    "effective_rank",
    "energy_rank",
    "l1_rank",
    "layer_measures",
    "nuclear_norm",
    "singular_values",
    "stable_rank",
    "unfold",
]

_EPS = 1e-12


def single_threaded(fn: F) -> F:
    """Run ``fn`` with one intra-op thread, then restore the previous count.

    The decompositions here are many small SVDs and eigenproblems; MKL's threaded SVD gains
    nothing on them and, on a busy machine, was measured 20-60× slower with 2 threads than with
    one (0.17 s vs 10 s for a 300 × 784 matrix).

    Args:
        fn: The function.

    Returns:
        The wrapped function.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        if before == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]


def unfold(weight: Tensor, mode: int = 0) -> Tensor:
    """A weight tensor as a matrix: mode ``mode`` on the rows, every other axis on the columns.

    Args:
        weight: A (out, in) matrix or an (out, in, *kernel) convolution weight.
        mode: 0 (output channels) or 1 (input channels).

    Returns:
        The 2-D matrix.

    Raises:
        ValueError: If ``weight`` has fewer than 2 dimensions or ``mode`` is not 0 or 1.
    """
    if weight.ndim < 2:
        raise ValueError(
            f"need a weight with at least 2 dimensions, got shape {tuple(weight.shape)}"
        )
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (output channels) or 1 (input channels), got {mode!r}")
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


@single_threaded
def singular_values(weight: Tensor, mode: int = 0) -> Tensor:
    """Singular values of :func:`unfold` ``(weight, mode)`` in float64, largest first.

    Returns:
        A (min(m, n),) tensor.
    """
    return torch.linalg.svdvals(unfold(weight, mode).double())


@single_threaded
def effective_rank(weight: Tensor, mode: int = 0, differentiable: bool = False) -> float | Tensor:
    """Roy & Vetterli's effective rank: exp of the entropy of the ℓ1-normalised spectrum.

    Args:
        weight: A matrix or a convolution weight (see :func:`unfold`).
        mode: Which unfolding of a convolution weight.
        differentiable: Return a 0-d tensor with autograd history (for rank penalties) instead
            of a float; the singular values are then computed in ``weight``'s dtype.

    Returns:
        A value in ``[1, rank(W)]`` (1 for an all-zero weight).
    """
    mat = unfold(weight, mode)
    s = torch.linalg.svdvals(mat if differentiable else mat.double())
    total = s.sum()
    if float(total.detach()) <= 0:
        return torch.ones((), dtype=s.dtype) if differentiable else 1.0
    p = s / total
    h = -(p * torch.log(p.clamp_min(_EPS))).sum()
    e = torch.exp(h)
    return e if differentiable else float(e)


def stable_rank(weight: Tensor, mode: int = 0) -> float:
    """``‖W‖_F² / ‖W‖_2²`` (0 for an all-zero weight).

    Returns:
        A value in ``[1, rank(W)]``.
    """
    s = singular_values(weight, mode)
    return float((s**2).sum() / s[0] ** 2) if float(s[0]) > 0 else 0.0


def nuclear_norm(weight: Tensor, mode: int = 0) -> float:
    """``‖W‖_* = Σ σ_k``.

    Returns:
        The nuclear norm.
    """
    return float(singular_values(weight, mode).sum())


def l1_rank(weight: Tensor, mode: int = 0) -> float:
    """``(‖σ‖_1 / ‖σ‖_2)²``: the ℓ1/ℓ2 sparsity of the spectrum, in ``[1, rank(W)]``.

    Returns:
        The value (0 for an all-zero weight).
    """
    s = singular_values(weight, mode)
    norm2 = float((s**2).sum())
    return float(s.sum()) ** 2 / norm2 if norm2 > 0 else 0.0


def energy_rank(weight: Tensor, energy: float = 0.9, mode: int = 0) -> int:
    """Smallest ``r`` whose top singular values keep a fraction ``energy`` of ``Σσ²``.

    Args:
        weight: A matrix or a convolution weight.
        energy: Fraction in (0, 1].
        mode: Which unfolding.

    Returns:
        The rank, ``1 ≤ r ≤ min(m, n)``.

    Raises:
        ValueError: If ``energy`` is outside (0, 1].
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    s2 = singular_values(weight, mode) ** 2
    total = float(s2.sum())
    if total <= 0:
        return 1
    kept = torch.cumsum(s2, 0) / total
    # Tolerance so that energy=1 returns the numerical rank, not Q by round-off.
    return max(1, int((kept < energy - 1e-12).sum()) + 1)


def layer_measures(modules: dict[str, nn.Module]) -> list[dict[str, object]]:
    """Every measure for every layer, on the output-channel unfolding.

    Args:
        modules: Module name to a Linear/Conv module (effective weights are read, masks
            applied).

    Returns:
        One dict per layer: ``name``, ``shape``, ``full_rank`` (min of the unfolding's sides),
        ``erank``, ``stable_rank``, ``nuclear_norm``, ``l1_rank``, ``energy90`` (energy rank at
        0.9), ``erank_ratio`` (erank / full rank) and ``mean_abs`` (ℓ1 norm of the weights per
        entry).
    """
    from woodfisher.params import effective_weight

    rows = []
    for name, mod in modules.items():
        w = effective_weight(mod)
        q = min(unfold(w).shape)
        er = effective_rank(w)
        rows.append({
            "name": name,
            "shape": list(w.shape),
            "full_rank": q,
            "erank": er,
            "stable_rank": stable_rank(w),
            "nuclear_norm": nuclear_norm(w),
            "l1_rank": l1_rank(w),
            "energy90": energy_rank(w, 0.9),
            "erank_ratio": er / q,
            "mean_abs": float(w.abs().mean()) if w.numel() else math.nan,
        })
    return rows
