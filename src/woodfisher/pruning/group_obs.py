"""Group Optimal Brain Surgeon: score sets of weights removed together, pick them, update.

For a set ``Q`` removed together (Singh & Alistarh 2020, eq. 4, applied to a set; Kurtic et al.
2022 use the same form for blocks) the local model ``½ δᵀFδ`` with ``δ_Q = −w_Q`` has minimum

.. math::

    \\rho_Q = \\tfrac12\\, w_Q^\\top \\big([F^{-1}]_{QQ}\\big)^{-1} w_Q,
    \\qquad \\delta w = -F^{-1}_{:,Q}\\big([F^{-1}]_{QQ}\\big)^{-1} w_Q .

With WoodTaylor's first-order term ``ḡ`` the same holds with ``w_Q`` replaced by
``w_Q − [F⁻¹ḡ]_Q`` and a constant ``−½ ḡᵀF⁻¹ḡ``. All functions here are pure; they take the
principal blocks ``[F⁻¹]_QQ`` (from :meth:`~woodfisher.fisher.InverseCurvature.principal_blocks`)
or None for magnitude pruning (``F⁻¹ = I``).

Example:
    >>> w = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    >>> B = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    >>> group_saliency(w, B)  # ½(1/1 + 4/2)
    tensor([1.5000], dtype=torch.float64)
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from woodfisher.fisher.base import InverseCurvature

__all__ = [
    "MAX_SUBSETS",
    "group_independent_update",
    "group_saliency",
    "nm_best_subsets",
    "nm_capped_selection",
    "select_groups",
]

#: N:M runs are searched exhaustively when C(M, M−N) is at most this (2:4: 6, 4:8: 70).
MAX_SUBSETS = 5000


def _solve(B: Tensor, v: Tensor) -> Tensor:
    """``B⁻¹ v`` for a batch of small SPD blocks ``B`` (G, g, g) and ``v`` (G, g)."""
    L, info = torch.linalg.cholesky_ex(B)
    if bool((info == 0).all()):
        return torch.cholesky_solve(v.unsqueeze(-1), L).squeeze(-1)
    return torch.linalg.solve(B, v.unsqueeze(-1)).squeeze(-1)


def group_saliency(w_q: Tensor, blocks: Tensor | None, shift_q: Tensor | None = None) -> Tensor:
    """``ρ_Q = ½ (w_Q − s_Q)ᵀ([F⁻¹]_QQ)⁻¹(w_Q − s_Q)`` for every group (rows of ``w_q``).

    Args:
        w_q: (G, g) the groups' weights.
        blocks: (G, g, g) ``[F⁻¹]_QQ``, or None for ``F⁻¹ = I`` (magnitude: ``½‖w_Q‖²``).
        shift_q: (G, g) ``[F⁻¹ḡ]_Q`` for WoodTaylor, or None.

    Returns:
        (G,) saliencies (without WoodTaylor's constant).
    """
    v = w_q if shift_q is None else w_q - shift_q
    if blocks is None:
        return 0.5 * (v * v).sum(-1)
    v = v.to(blocks.dtype)
    return 0.5 * (v * _solve(blocks, v)).sum(-1)


def group_independent_update(
    w: Tensor,
    index: Tensor,
    blocks: Tensor,
    inv: InverseCurvature,
    linear: Tensor | None = None,
) -> Tensor:
    """Sum of the per-group OBS steps (the paper's independent rule, one group at a time).

    ``δ = δ₀ + F⁻¹ v`` with ``v_Q = ([F⁻¹]_QQ)⁻¹(−w_Q − δ₀_Q)`` on every group and ``δ₀ = −F⁻¹ḡ``
    (0 without ``linear``). For groups of one weight it is
    :func:`woodfisher.pruning.obs.independent_update`.

    Args:
        w: (d,) weights.
        index: (G, g) flat indices of the removed groups (disjoint).
        blocks: (G, g, g) their ``[F⁻¹]_QQ``.
        inv: The inverse curvature.
        linear: (d,) ``ḡ`` or None.

    Returns:
        (d,) the update.
    """
    w = w.to(inv.dtype)
    base = -inv.mul(linear.to(inv.dtype)) if linear is not None else torch.zeros_like(w)
    v = torch.zeros_like(w)
    if index.numel():
        gap = -w[index] - base[index]
        v[index.reshape(-1)] = _solve(blocks.to(inv.dtype), gap).reshape(-1)
    return base + inv.mul(v)


def select_groups(
    scores: Tensor, cost: Tensor, eligible: Tensor, need: float
) -> Tensor:
    """The lowest-scored eligible groups until their summed ``cost`` reaches ``need``.

    Groups are taken in score order (ties: lower index first) while they fit in what is still
    needed; a group that would overshoot is passed over for the next ones that fit, and only
    when nothing fits any more does the best-scored remaining group close the gap. Groups of
    very different costs (a channel of a wide layer next to one of a narrow layer) thus land
    close to ``need`` instead of a whole large group past it.

    Args:
        scores: (G,) lower goes first.
        cost: (G,) what each group removes (weights or MACs), > 0.
        eligible: (G,) bool.
        need: Amount to remove (<= 0: nothing).

    Returns:
        (G,) bool, the chosen groups.

    Raises:
        ValueError: If an eligible score is NaN.

    Example:
        >>> select_groups(torch.tensor([3., 1., 2.]), torch.tensor([2., 2., 2.]),
        ...               torch.tensor([True, True, True]), 3)
        tensor([False,  True,  True])
        >>> select_groups(torch.tensor([1., 2., 3.]), torch.tensor([1., 5., 1.]),
        ...               torch.tensor([True, True, True]), 2)
        tensor([ True, False,  True])
    """
    out = torch.zeros_like(eligible, dtype=torch.bool)
    if need <= 0:
        return out
    idx = eligible.nonzero().reshape(-1)
    if torch.isnan(scores[idx]).any():
        raise ValueError("group scores contain NaN; the curvature estimate is probably degenerate")
    order = idx[torch.sort(scores[idx], stable=True).indices]
    c = cost[order].double()
    left = torch.ones_like(c, dtype=torch.bool)
    remaining = float(need)
    tol = 1e-9 * max(abs(float(need)), 1.0)
    for _ in range(64):
        fits = left & (c <= remaining + tol)
        if not fits.any():
            break
        pos = fits.nonzero().reshape(-1)
        total = torch.cumsum(c[pos], 0)
        take = pos[total <= remaining + tol]
        out[order[take]] = True
        left[take] = False
        remaining -= float(c[take].sum())
        if remaining <= tol:
            return out
    rest = left.nonzero().reshape(-1)
    if rest.numel():
        out[order[rest[0]]] = True
    return out


def nm_capped_selection(scores: Tensor, present: Tensor, n_keep: int, need: int) -> Tensor:
    """Remove the ``need`` lowest-scored present weights while no run drops below ``n_keep``.

    Within each run the lowest-scored present weights may go, up to ``M − n_keep`` zeros per
    run; among those the lowest ``need`` over all runs are taken. This is an intermediate step
    towards N:M (every run still has room), and the last step fills every run exactly.

    Args:
        scores: (G, M) per-weight scores.
        present: (G, M) bool, weights not pruned yet.
        n_keep: N.
        need: How many to remove now.

    Returns:
        (G, M) bool, newly removed.

    Raises:
        ValueError: If ``need`` exceeds the room left.
    """
    M = scores.shape[1]
    room = (present.sum(1) - n_keep).clamp(min=0)  # (G,)
    s = torch.where(present, scores, torch.full_like(scores, math.inf))
    order = torch.argsort(s, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(M, device=scores.device).expand_as(order))
    eligible = present & (rank < room[:, None])
    if need > int(eligible.sum()):
        raise ValueError(
            f"cannot remove {need} more weights: only {int(eligible.sum())} fit the N:M pattern"
        )
    flat = torch.where(eligible, scores, torch.full_like(scores, math.inf)).reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if need > 0:
        idx = eligible.reshape(-1).nonzero().reshape(-1)
        pick = idx[torch.sort(flat[idx], stable=True).indices[:need]]
        out[pick] = True
    return out.reshape(scores.shape)


def nm_best_subsets(
    w_g: Tensor,
    blocks: Tensor | None,
    present: Tensor,
    n_keep: int,
    shift_g: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per run of M, the removal set of size ``M − N`` with the least joint OBS saliency.

    Every ``(M−N)``-subset ``S`` that contains the run's already-pruned weights is scored by
    :func:`group_saliency` on ``[F⁻¹]_SS`` (exhaustively when C(M, M−N) <= :data:`MAX_SUBSETS`,
    else greedily by single-weight saliency), so weights that can stand in for one another are
    not removed together.

    Args:
        w_g: (G, M) weights of each run.
        blocks: (G, M, M) ``[F⁻¹]`` of each run, or None (magnitude).
        present: (G, M) bool.
        n_keep: N.
        shift_g: (G, M) ``[F⁻¹ḡ]`` (WoodTaylor) or None.

    Returns:
        ``(remove, saliency)``: (G, M) bool of all weights zero after the step (old and new) and
        (G,) the chosen subsets' saliencies.
    """
    G, M = w_g.shape
    q = M - n_keep
    pruned = ~present
    if math.comb(M, q) > MAX_SUBSETS:
        single = group_saliency(
            w_g.reshape(-1, 1),
            None if blocks is None else blocks.diagonal(dim1=1, dim2=2).reshape(-1, 1, 1),
            None if shift_g is None else shift_g.reshape(-1, 1),
        ).reshape(G, M)
        new = nm_capped_selection(single, present, n_keep, int((present.sum(1) - n_keep)
                                                                .clamp(min=0).sum()))
        remove = pruned | new
        return remove, torch.where(new, single, torch.zeros_like(single)).sum(1)
    best = torch.full((G,), math.inf, dtype=torch.float64, device=w_g.device)
    choice = torch.zeros(G, dtype=torch.long, device=w_g.device)
    combos = torch.tensor(list(itertools.combinations(range(M), q)), device=w_g.device)
    n_pruned = pruned.sum(1)
    for c, S in enumerate(combos):
        valid = pruned[:, S].sum(1) == n_pruned  # keeps every already-pruned weight out
        sub = None if blocks is None else blocks[:, S][:, :, S]
        sal = group_saliency(
            w_g[:, S], sub, None if shift_g is None else shift_g[:, S]
        ).double()
        sal = torch.where(valid, sal, torch.full_like(sal, math.inf))
        better = sal < best
        best = torch.where(better, sal, best)
        choice = torch.where(better, torch.full_like(choice, c), choice)
    remove = torch.zeros(G, M, dtype=torch.bool, device=w_g.device)
    remove[torch.arange(G, device=w_g.device)[:, None], combos[choice]] = True
    # Runs with more than M−N zeros already (an earlier unstructured prune) stay as they are.
    over = n_pruned > q
    remove[over] = pruned[over]
    best[over] = 0.0
    return remove, best
