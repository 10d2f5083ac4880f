"""Pruning methods, plugged in through a plain dict, and the one place for defaults.

A :class:`Method` says which curvature it needs, how it scores weights and which update it uses
unless told otherwise. ``METHODS`` maps the public names to them; the CLI's choices come from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from woodfisher.curvature import CURVATURE_DEFAULTS, relative_damp_scale
from woodfisher.fisher.base import InverseCurvature
from woodfisher.pruning import obs

UPDATES = ("none", "independent", "joint")

#: Defaults of :func:`woodfisher.pruning.prune`, each with the reason it was chosen.
DEFAULTS: dict[str, object] = {
    # 500 per-sample gradients (fisher-mini-bsz 1): with recompute="auto" (several steps) this
    # met every quality target on the Fashion-MNIST MLPNets (see README) at a quarter of the
    # m² cost of the paper's 1000.
    "num_grads": CURVATURE_DEFAULTS["num_grads"],
    "samples_per_grad": CURVATURE_DEFAULTS["samples_per_grad"],
    # A block as wide as the number of gradients lets each block's Fisher reach full rank
    # (rank ≤ m); wider blocks are rank-deficient and lean on damp.
    "block_size": CURVATURE_DEFAULTS["block_size"],
    # damp=None means relative: damp = relative_damp · mean(diag(GᵀG/m)), so one default works
    # whatever the gradient scale of the model. A float passed as damp is absolute.
    "relative_damp": CURVATURE_DEFAULTS["relative_damp"],
    # Relative grid for damp="auto" (a prune per value, scored on held-out samples).
    "damp_grid": (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    # Held-out samples for damp="auto" when no val_data is given (taken after the gradients').
    "val_samples": 1000,
    # K-FAC: number of mini-batches for its factors (num_grads is read as that for kfac).
    "kfac_num_batches": CURVATURE_DEFAULTS["kfac_num_batches"],
    # The absolute damp K-FAC gets when damp=None (its factors are not on the EF scale).
    "kfac_damp": CURVATURE_DEFAULTS["kfac_damp"],
    # Steps to reach a one-shot target, with fresh gradients and inverse between them. "auto":
    # as many geometric steps as needed so that none removes more than max_step_removed of the
    # remaining weights (3 steps to 50 %, 9 to 90 %, 14 to 98 %). On MLPNet 784-40-20-10 at
    # 98 % this lifts the joint update from 34 % (1 step) to 69 % test accuracy.
    "recompute": "auto",
    "max_step_removed": 0.25,
    # How the steps get their curvature: "resample" (fresh gradients and inverses, the paper's
    # recomputation), "downdate" (Schur-downdated block inverses, re-estimated as "refresh"
    # says) or "auto" (downdate when block_size <= 2 num_grads); see
    # woodfisher.pruning.downdate. Auto is the default since issue 13: as accurate as
    # resample and several times faster and leaner (docs/scale.md).
    "recompute_by": "auto",
    # Downdate path: re-estimate the Fisher before each step that starts with at most this
    # fraction of the weights (0: never, 1: every step, the paper's recomputation done over
    # the kept weights only). 1: on MLPNet at 90 % (m = 1000) 0.3-0.4 matched resampling on
    # a validation split, but on the small digits MLP they lost 4-7 points where 1 did not
    # (docs/scale.md), so the default keeps the paper's accuracy and 0.3-0.4 is a faster knob.
    "refresh": 1.0,
    # Recomputation schedule: "geometric" (the same fraction of the remaining weights per
    # step: at 95 % with 8 steps 79.8 % accuracy against 68.4 % for cubic), "cubic" (Zhu &
    # Gupta's polynomial, larger steps first) or "linear".
    "schedule": "geometric",
}


@dataclass(frozen=True)
class Method:
    """How a pruning method is put together.

    Attributes:
        name: Public name, the key in :data:`METHODS`.
        curvature: What inverse to build: ``None`` (magnitude), ``"diagonal"``, ``"kfac"`` or
            ``"woodfisher"`` (block-wise empirical Fisher).
        saliency: ``(w, inv, inv_diag, grad, inv_grad) -> scores``; lower is pruned first.
        needs_mean_grad: Whether the first-order term ``ḡ`` enters (WoodTaylor).
        default_update: The update used when ``update=None``.
        updates: The update rules this method allows.
        newton: How ``ḡ`` enters: None (it does not), ``"paper"`` (in the saliency and the
            full constrained step, as the paper) or ``"safe"`` (WoodFisher's mask plus a
            Newton part scaled on held-out samples, see :mod:`woodfisher.pruning.woodtaylor`).
    """

    name: str
    curvature: str | None
    saliency: Callable[..., Tensor]
    needs_mean_grad: bool
    default_update: str
    updates: tuple[str, ...] = UPDATES
    newton: str | None = None


def _magnitude(w: Tensor, inv: InverseCurvature | None, inv_diag, grad, inv_grad) -> Tensor:
    return obs.magnitude_saliency(w)


def _obs(w: Tensor, inv: InverseCurvature, inv_diag: Tensor, grad, inv_grad) -> Tensor:
    return obs.obs_saliency(w.to(inv_diag.dtype), inv_diag)


def _woodtaylor(
    w: Tensor, inv: InverseCurvature, inv_diag: Tensor, grad: Tensor, inv_grad: Tensor
) -> Tensor:
    return obs.woodtaylor_saliency(
        w.to(inv_diag.dtype), inv_diag, inv_grad, grad.to(inv_diag.dtype)
    )


# The paper's code applies the independent (summed) update; "joint" is the exact per-block OBS
# and measures better (MLPNet 784-40-20-10 at 90 %, one step: 83.6 % against 70.3 %). Diagonal
# and K-FAC curvature keep "independent": for a diagonal F the two coincide, and K-FAC offers
# no exact joint step inside a large layer.
METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, _magnitude, False, "none", ("none",)),
    "diag-fisher": Method("diag-fisher", "diagonal", _obs, False, "independent"),
    "kfac": Method("kfac", "kfac", _obs, False, "independent"),
    "woodfisher": Method("woodfisher", "woodfisher", _obs, False, "joint"),
    # The paper's WoodTaylor (first-order term in the saliency and the step), a baseline; and
    # the safe one (WoodFisher's mask, Newton part scaled by held-out loss, 0 = WoodFisher).
    "woodtaylor-paper": Method("woodtaylor-paper", "woodfisher", _woodtaylor, True, "joint",
                               newton="paper"),
    "woodtaylor": Method("woodtaylor", "woodfisher", _obs, True, "joint", newton="safe"),
}


def get_method(name: str) -> Method:
    """Look a method up by name.

    Args:
        name: A key of :data:`METHODS`.

    Returns:
        The method.

    Raises:
        ValueError: If the name is unknown.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def resolve_update(method: Method, update: str | None) -> str:
    """The update rule to use.

    Args:
        method: The method.
        update: The requested rule or None for the method's default.

    Returns:
        One of :data:`UPDATES`.

    Raises:
        ValueError: If the rule is unknown or the method cannot use it (magnitude has no
            curvature, so it allows only ``"none"``).
    """
    if update is None:
        return method.default_update
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; choose from {list(UPDATES)}")
    if update not in method.updates:
        raise ValueError(
            f"method {method.name!r} has no curvature for an OBS update; use update='none' "
            f"(allowed: {list(method.updates)}) or a second-order method"
        )
    return update


__all__ = ["DEFAULTS", "METHODS", "UPDATES", "Method", "get_method", "relative_damp_scale",
           "resolve_update"]
