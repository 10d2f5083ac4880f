"""Second-order scores for coefficients (ours): WoodFisher in the DCT basis.

The DCT is orthonormal, so the coefficients' gradients are ``D g`` (``D = I ⊗ A ⊗ A`` per
kernel) and their empirical Fisher is ``D F Dᵀ``. Nothing special is needed to get it: a
:class:`~woodfisher.frequency.layers.DCTConv2d` exposes its coefficients as its ``weight``,
so :func:`woodfisher.fisher_inverse` and :func:`woodfisher.prune` work on them as on any conv.

* :func:`woodfisher_scales` — ``1/sqrt([F⁻¹]_qq)`` for every coefficient, pruned ones included
  (their gradient is taken at the masked model, as DNS's straight-through update does), so that
  ``|c_q|·scale_q = sqrt(2ρ_q)`` with the OBS saliency ``ρ_q = c_q² / (2[F⁻¹]_qq)``: the score the
  dynamic rule compares with its thresholds when ``criterion="woodfisher"``.
* :func:`prune_oneshot` — one-shot OBS pruning (saliency and weight update) of the coefficients
  (or, for comparison, of the spatial weights) with any pruning method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from woodfisher.params import weight_param

__all__ = ["coefficient_inverse_diag", "prune_oneshot", "woodfisher_scales"]


def coefficient_inverse_diag(
    model: nn.Module,
    data: Iterable,
    names: Sequence[str],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    num_grads: int = 256,
    block_size: int | None = 576,
    relative_damp: float = 1.0,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal of the WoodFisher ``F⁻¹`` over every entry of the named layers' weights.

    Pruned entries take part: the estimate is built on a copy of the model whose masks are baked
    in (every entry is a plain weight, zero where pruned), so their gradients are those of the
    masked model.

    Args:
        model: The network (left unchanged).
        data: ``(x, y)`` batches with at least ``num_grads`` samples.
        names: Module names (DCTConv2d for coefficients, any Linear/Conv for weights).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; cross-entropy by default.
        num_grads: Per-sample gradients ``m``.
        block_size: Block size of the block-diagonal estimate.
        relative_damp: Damp as a multiple of the Fisher's mean diagonal.
        seed: Seed of the gradient pass.

    Returns:
        Module name to a positive tensor of the weight's shape.
    """
    from woodfisher.curvature import fisher_inverse
    from woodfisher.pruning import bake

    for mod in model.modules():
        # torch's pruning keeps ``weight`` as a non-leaf tensor, which deepcopy refuses; the
        # forward pre-hook recomputes it anyway.
        if hasattr(mod, "weight_mask") and hasattr(mod, "weight_orig"):
            mod.weight = (mod.weight_orig * mod.weight_mask).detach()
    clone = bake(copy.deepcopy(model))
    inv = fisher_inverse(clone, data, "woodfisher", loss_fn, params=list(names),
                         num_grads=num_grads, block_size=block_size,
                         relative_damp=relative_damp, seed=seed)
    return {n: d.to(weight_param(model.get_submodule(n))) for n, d in inv.diag().items()}


def woodfisher_scales(diag: dict[str, Tensor]) -> dict[str, Tensor]:
    """Score scales ``1/sqrt([F⁻¹]_qq)`` from the diagonal of the inverse Fisher.

    Args:
        diag: Module name to ``diag(F⁻¹)`` (positive), as from :func:`coefficient_inverse_diag`.

    Returns:
        Module name to ``1/sqrt(diag)``, same shapes.
    """
    return {n: d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt() for n, d in diag.items()}


def prune_oneshot(
    model: nn.Module,
    data: Iterable,
    compression: float,
    *,
    method: str = "woodfisher",
    domain: str = "frequency",
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    **prune_options: Any,
) -> dict[str, Any]:
    """One-shot pruning of the convs' DCT coefficients (or spatial weights) to a compression.

    ``domain="frequency"`` converts the eligible convs to DCTConv2d first (in place); then
    :func:`woodfisher.prune` removes ``1 − 1/compression`` of the selected weights with
    ``method`` (OBS saliency and update for ``"woodfisher"``, ``|c|`` for ``"magnitude"``).

    Args:
        model: The network; changed in place.
        data: Re-iterable ``(x, y)`` batches for the curvature.
        compression: Ratio of selected weights to kept ones (> 1).
        method: A key of :data:`woodfisher.pruning.METHODS`.
        domain: ``"frequency"`` or ``"spatial"``.
        layers: Patterns of convs to consider (default every eligible Conv2d).
        skip: Patterns of convs to leave alone.
        **prune_options: More options of :func:`woodfisher.prune` (``num_grads``, ``damp``...).

    Returns:
        ``{"layers": names pruned, "skipped": {name: reason}, "prune": PruneResult dict}``.

    Raises:
        ValueError: If ``compression ≤ 1``, the domain is unknown or no conv is eligible.
    """
    from woodfisher.frequency.layers import eligible_convs, to_frequency
    from woodfisher.pruning import prune

    check_compression(compression)
    if domain == "frequency":
        conv = to_frequency(model, layers, skip)
        names, skipped = conv["converted"], conv["skipped"]
    elif domain == "spatial":
        names, skipped = eligible_convs(model, layers, skip)
    else:
        raise ValueError(f"unknown domain {domain!r}; choose 'frequency' or 'spatial'")
    if not names:
        raise ValueError(f"no conv is eligible for pruning (skipped: {skipped})")
    result = prune(model, data, 1 - 1 / compression, method=method, layers=names,
                   **prune_options)
    return {"layers": names, "skipped": skipped, "prune": result.to_dict()}


def check_compression(compression: float) -> float:
    """Check a compression ratio.

    Args:
        compression: Selected weights per kept weight.

    Returns:
        It, as a float.

    Raises:
        ValueError: If it is not a finite number above 1.
    """
    try:
        value = float(compression)
    except (TypeError, ValueError):
        raise ValueError(f"compression must be a number > 1, got {compression!r}") from None
    if not (value > 1 and value != float("inf")):
        raise ValueError(
            f"compression must be a finite ratio > 1 (8 keeps 1/8 of the coefficients), got "
            f"{compression!r}"
        )
    return value
