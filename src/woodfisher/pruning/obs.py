"""Optimal Brain Surgeon: saliencies and weight updates as pure functions.

Everything works on the flat vector of selected weights (see :class:`woodfisher.params.Layout`)
and asks the curvature only through :class:`woodfisher.fisher.InverseCurvature`. The local model
of the loss around the current weights ``w`` is (Singh & Alistarh, 2020, eqs. 2 and 9)

.. math::

    \\delta L(\\delta w) \\approx \\bar g^\\top \\delta w + \\tfrac12 \\delta w^\\top F \\delta w,

with ``ḡ = 0`` for WoodFisher/OBS (the model sits at a minimum) and the mean sampled gradient for
WoodTaylor. Removing a set ``Q`` of weights means ``δw_Q = -w_Q``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from woodfisher.fisher.base import InverseCurvature


def magnitude_saliency(w: Tensor) -> Tensor:
    """Magnitude pruning score ``w²`` (no curvature).

    Args:
        w: (d,) weights.

    Returns:
        (d,) scores; lower is pruned first.

    Example:
        >>> magnitude_saliency(torch.tensor([-2.0, 1.0]))
        tensor([4., 1.])
    """
    return w * w


def obs_saliency(w: Tensor, inv_diag: Tensor) -> Tensor:
    """OBS saliency ``ρ_q = w_q² / (2 [F⁻¹]_qq)``: the loss increase of removing ``q`` alone.

    Args:
        w: (d,) weights.
        inv_diag: (d,) diagonal of ``F⁻¹``.

    Returns:
        (d,) saliencies.

    Example:
        >>> obs_saliency(torch.tensor([2.0]), torch.tensor([0.5]))
        tensor([4.])
    """
    return w * w / (2 * inv_diag)


def woodtaylor_saliency(w: Tensor, inv_diag: Tensor, inv_grad: Tensor, grad: Tensor) -> Tensor:
    """WoodTaylor saliency: the minimum of ``ḡᵀδ + ½ δᵀFδ`` subject to ``δ_q = -w_q``.

    The free minimiser is ``δ₀ = -F⁻¹ḡ`` with value ``-½ ḡᵀF⁻¹ḡ``; pinning one entry adds
    ``(δ_q - δ₀_q)² / (2 [F⁻¹]_qq)``, hence

    .. math::

        \\rho_q = \\frac{(w_q - [F^{-1}\\bar g]_q)^2}{2 [F^{-1}]_{qq}}
                  - \\tfrac12 \\bar g^\\top F^{-1} \\bar g .

    The constant does not change the ranking; it is kept so that ``ρ_q`` is the model's value.

    Args:
        w: (d,) weights.
        inv_diag: (d,) diagonal of ``F⁻¹``.
        inv_grad: (d,) ``F⁻¹ ḡ``.
        grad: (d,) the mean gradient ``ḡ``.

    Returns:
        (d,) saliencies.
    """
    return (w - inv_grad) ** 2 / (2 * inv_diag) - 0.5 * torch.dot(grad, inv_grad)


def independent_update(
    w: Tensor,
    remove: Tensor,
    inv: InverseCurvature,
    linear: Tensor | None = None,
    inv_diag: Tensor | None = None,
) -> Tensor:
    """Sum of the single-weight OBS updates for the weights in ``remove`` (the paper's rule).

    Without a linear term, ``δ = -F⁻¹ v`` with ``v_q = w_q / [F⁻¹]_qq`` on ``Q`` and 0 elsewhere.
    With one (WoodTaylor) every single-weight step starts from the Newton step ``δ₀ = -F⁻¹ḡ``:
    ``δ = δ₀ + F⁻¹ v`` with ``v_q = (-w_q - δ₀_q) / [F⁻¹]_qq`` on ``Q``. For ``|Q| = 1`` both equal
    the exact (joint) step. For ``|Q| > 1`` ``δ_Q ≠ -w_Q`` in general: callers zero ``w_Q`` after.

    Args:
        w: (d,) current weights (already-pruned entries 0).
        remove: (d,) bool, the set ``Q``.
        inv: The inverse curvature.
        linear: (d,) mean gradient ``ḡ``, or None.
        inv_diag: (d,) ``diag(F⁻¹)`` if already computed.

    Returns:
        (d,) the update ``δ``.
    """
    w = w.to(inv.dtype)
    diag = inv.diag() if inv_diag is None else inv_diag.to(inv.dtype)
    base = -inv.mul(linear.to(inv.dtype)) if linear is not None else torch.zeros_like(w)
    gap = -w - base
    v = torch.where(remove, gap / diag, torch.zeros_like(w))
    return base + inv.mul(v)


def joint_update(
    w: Tensor,
    remove: Tensor,
    inv: InverseCurvature,
    linear: Tensor | None = None,
    pruned: Tensor | None = None,
) -> Tensor:
    """Exact OBS step for the whole set ``Q`` (per block): ``min ḡᵀδ + ½δᵀFδ`` s.t. ``δ_Q = -w_Q``.

    Weights pruned before (``pruned``) are constrained too, with ``δ = -w = 0`` there, so the
    compensation never leans on a weight that no longer exists. With ``linear = ḡ`` (WoodTaylor)
    the kept weights also take the Newton step ``-F⁻¹ḡ``, corrected for the constraints: the
    update moves weights even in blocks where nothing is removed.

    Args:
        w: (d,) current weights (already-pruned entries 0).
        remove: (d,) bool, the newly removed set ``Q``.
        inv: The inverse curvature.
        linear: (d,) mean gradient ``ḡ``, or None.
        pruned: (d,) bool, weights already pruned before this step, or None.

    Returns:
        (d,) the update ``δ``; ``δ[remove | pruned] == -w`` there exactly.

    Example:
        >>> from woodfisher.fisher import DenseInverse
        >>> F = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> joint_update(torch.tensor([1.0, 1.0], dtype=torch.float64),
        ...              torch.tensor([True, False]), DenseInverse(F))
        tensor([-1.0000,  0.5000], dtype=torch.float64)
    """
    w = w.to(inv.dtype)
    fixed = remove if pruned is None else remove | pruned
    return inv.constrained_min(fixed, -w, None if linear is None else linear.to(inv.dtype))


def finish_update(w: Tensor, delta: Tensor, zero: Tensor) -> Tensor:
    """New weights ``w + δ`` with the entries in ``zero`` set to exactly 0.

    Args:
        w: (d,) current weights.
        delta: (d,) update.
        zero: (d,) bool, every entry that must be 0 (newly and previously pruned).

    Returns:
        (d,) new weights in the dtype of ``w``.
    """
    new = (w.to(delta.dtype) + delta).to(w.dtype)
    return torch.where(zero, torch.zeros_like(new), new)


def quadratic_model(delta: Tensor, fmul, linear: Tensor | None = None) -> float:
    """Value of the local model ``ḡᵀδ + ½ δᵀFδ`` given a product ``v ↦ F v``.

    Args:
        delta: (d,) the update.
        fmul: Callable returning ``F v`` for a (d,) vector.
        linear: (d,) ``ḡ`` or None.

    Returns:
        The predicted loss change.
    """
    value = 0.5 * torch.dot(delta, fmul(delta))
    if linear is not None:
        value = value + torch.dot(linear.to(delta.dtype), delta)
    return float(value)
