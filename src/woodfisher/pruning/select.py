"""Which weights go: exact-k selection by score, globally, per layer, or with overrides.

Selection is kept apart from how the remaining weights compensate (``obs.py``), so other
patterns (N:M, blocks) can plug in later. Sparsity is always counted over the selected weights,
and weights pruned before count as pruned: reaching sparsity ``s`` over ``d`` weights of which
``p`` are already gone removes ``round(s·d) - p`` more.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from woodfisher.params import Layout

SCOPES = ("global", "layerwise")


def select(scores: Tensor, k: int, eligible: Tensor | None = None) -> Tensor:
    """The ``k`` eligible entries with the lowest scores.

    Ties go to the lower index (stable sort), so the result is deterministic.

    Args:
        scores: (n,) scores; lower is pruned first.
        k: How many to pick.
        eligible: (n,) bool, entries that may be picked (still present); default all.

    Returns:
        (n,) bool mask with exactly ``k`` True entries, all eligible.

    Raises:
        ValueError: If ``k`` is negative or more than the eligible count, or an eligible score
            is NaN.

    Example:
        >>> select(torch.tensor([3.0, 1.0, 1.0, 0.5]), 2)
        tensor([False,  True, False,  True])
    """
    scores = scores.reshape(-1)
    if eligible is None:
        eligible = torch.ones_like(scores, dtype=torch.bool)
    idx = eligible.reshape(-1).nonzero().reshape(-1)
    if k < 0 or k > idx.numel():
        raise ValueError(f"cannot select k={k} entries out of {idx.numel()} eligible")
    cand = scores[idx]
    if torch.isnan(cand).any():
        raise ValueError("scores contain NaN; the curvature estimate is probably degenerate")
    order = torch.sort(cand, stable=True).indices
    out = torch.zeros_like(scores, dtype=torch.bool)
    out[idx[order[:k]]] = True
    return out


def _count(sparsity: float, total: int, pruned: int, where: str) -> int:
    k = round(sparsity * total) - pruned
    if k < 0:
        raise ValueError(
            f"target sparsity {sparsity} of {where} ({round(sparsity * total)} of {total} weights) "
            f"is below the current one ({pruned} already pruned); pruned weights never come "
            "back, so ask for at least the current sparsity"
        )
    return k


def select_by_sparsity(
    scores: Tensor,
    present: Tensor,
    layout: Layout,
    sparsity: float,
    scope: str = "global",
    layer_sparsity: Mapping[str, float] | None = None,
) -> Tensor:
    """New weights to remove so that the selected weights reach the target sparsity exactly.

    Args:
        scores: (d,) scores over the flat vector; lower is pruned first.
        present: (d,) bool, weights not pruned yet.
        layout: Where each layer sits in the flat vector.
        sparsity: Target fraction in [0, 1).
        scope: ``"global"`` ranks all layers together (one threshold, which sets per-layer
            sparsities automatically); ``"layerwise"`` gives every layer ``sparsity``.
        layer_sparsity: Layer name to its own target; those layers are selected within
            themselves, the others follow ``scope`` with ``sparsity``.

    Returns:
        (d,) bool mask of newly removed weights (a subset of ``present``).

    Raises:
        ValueError: If the scope or a layer name is unknown, a sparsity is outside [0, 1), or a
            target is below the current sparsity (already-pruned weights count as pruned).
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose from {list(SCOPES)}")
    overrides = dict(layer_sparsity or {})
    for name, s in overrides.items():
        if name not in layout.names:
            raise ValueError(
                f"layer_sparsity names unknown layer {name!r}; selected: {list(layout.names)}"
            )
        check_sparsity(s, f"layer_sparsity[{name!r}]")
    check_sparsity(sparsity)
    present = present.reshape(-1).to(torch.bool)
    remove = torch.zeros_like(present)
    rest = torch.zeros_like(present)
    for name, off, size in zip(layout.names, layout.offsets, layout.sizes, strict=False):
        sl = slice(off, off + size)
        if name in overrides or scope == "layerwise":
            s = overrides.get(name, sparsity)
            k = _count(s, size, int((~present[sl]).sum()), f"layer {name!r}")
            remove[sl] = select(scores[sl], k, present[sl])
        else:
            rest[sl] = True
    if rest.any():
        k = _count(sparsity, int(rest.sum()), int((rest & ~present).sum()), "the ranked layers")
        remove |= select(scores, k, rest & present)
    return remove


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Check that a sparsity is a number in [0, 1).

    Args:
        sparsity: The value to check.
        what: Its name in the error message.

    Returns:
        The value as float.

    Raises:
        ValueError: If it is outside [0, 1).
        TypeError: If it is not a real number.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"{what} must be in [0, 1), got {sparsity!r}")
    return float(sparsity)
