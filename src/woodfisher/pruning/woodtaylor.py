"""WoodTaylor: OBS with the loss's first-order term, as the paper has it and made safe.

The paper (Singh & Alistarh 2020, sec. 4) minimises ``ḡᵀδ + ½δᵀFδ`` subject to the pruned
weights becoming zero (``δ_Q = −w_Q``), with ``ḡ`` the mean of the ``m`` sampled gradients and
the same ``F`` as WoodFisher; the saliency gets the first-order term too. That is
``woodtaylor-paper``. On Fashion-MNIST MLPNet it is much worse than WoodFisher (see
``docs/woodtaylor.md``) for three reasons measured there:

1. ``ḡ`` of ``m = 500`` samples is mostly noise at a trained model (its cosine with the mean
   gradient of 10,000 samples was 0.02);
2. ``F⁻¹`` amplifies it: each block's empirical Fisher has rank ``≤ m``, and ``ḡ_b`` lies in
   the span of the block's gradients, so ``F_b⁻¹ḡ_b`` fits every sample's linearised loss in
   that block alone (``‖F⁻¹ḡ‖ = 1500`` against ``‖w‖ = 20``);
3. blocks add up: the block-diagonal ``F`` ignores the curvature between blocks, and the
   full empirical Fisher along the Newton direction was 136× larger than the block-diagonal
   one — the step overshoots by about the number of blocks.

The safe step (``woodtaylor``) keeps WoodFisher's mask and adds a scaled Newton part. For a
fixed pruned set ``Q`` the constrained minimiser is linear in the linear term, so the minimiser
of ``αḡᵀδ + ½δᵀFδ`` is ``δ(α) = δ_WF + α·n`` with ``n = argmin ḡᵀδ + ½δᵀFδ s.t. δ_Q = 0``.
Because ``n`` is a feasible direction at the optimum ``δ_WF`` (``δ_WFᵀFn = 0``) and
``ḡᵀn = −nᵀFn``, the full quadratic model satisfies

.. math::

    q(\\delta(\\alpha)) = q(\\delta_{WF}) - (\\alpha - \\alpha^2/2)\\, n^\\top F n
    \\le q(\\delta_{WF}) \\quad \\text{for } \\alpha \\in [0, 2],

so every ``α`` of the grid (all in ``[0, 1]``) is no worse than WoodFisher on the quadratic
model, and the one chosen by the loss on held-out samples, a grid that contains ``α = 0``
(WoodFisher itself), is no worse on that held-out loss. Options measured on a validation split
(``bench/woodtaylor.py``): the first-order term in the saliency too, and ``ḡ`` from more
samples than the Fisher.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from woodfisher.batch import batch_len, call_model
from woodfisher.fisher.base import InverseCurvature
from woodfisher.params import Layout, weight_param
from woodfisher.pruning import obs

#: Defaults of the safe WoodTaylor (``prune(..., taylor={...})``), each with its reason.
TAYLOR_DEFAULTS: dict[str, object] = {
    # "auto": the Newton scale α is chosen per step from `grid` by the loss on held-out samples.
    # A float fixes α (0 is WoodFisher's step; 1 is the paper's step with WoodFisher's mask).
    "scale": "auto",
    # Half-decades from 1e-4 to 1: the search chose α of 0..2e-4 at a trained MLPNet, 1e-3 after
    # a distribution shift, up to 0.03 inside gradual and 0.14 at CNN 98 % (bench/woodtaylor.py).
    "grid": (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
    # Samples for ḡ: None takes the m gradients of the Fisher (as the paper); a number takes
    # the mean gradient of that many samples of `data` (held-out samples come after them).
    "grad_samples": None,
    # Also rank weights by the WoodTaylor saliency (with the chosen ḡ at full scale) instead of
    # WoodFisher's. Off: it ranked badly wherever ḡ is noisy (see the module docstring).
    "saliency": False,
}
TAYLOR_KEYS = tuple(TAYLOR_DEFAULTS)


def check_taylor(taylor: Mapping[str, object] | None) -> dict[str, object]:
    """Validate the ``taylor`` options of :func:`woodfisher.prune` and fill in defaults.

    Args:
        taylor: A dict with keys among :data:`TAYLOR_KEYS`, or None.

    Returns:
        The complete options.

    Raises:
        ValueError: On an unknown key or a bad value.
    """
    opts = dict(TAYLOR_DEFAULTS)
    if taylor is None:
        return opts
    if not isinstance(taylor, Mapping):
        raise ValueError(f"taylor must be a dict of options, got {type(taylor).__name__}")
    unknown = sorted(set(taylor) - set(TAYLOR_KEYS))
    if unknown:
        raise ValueError(f"unknown taylor options {unknown}; choose from {list(TAYLOR_KEYS)}")
    opts.update(taylor)
    scale = opts["scale"]
    if scale != "auto" and not (
        isinstance(scale, (int, float)) and not isinstance(scale, bool)
        and math.isfinite(scale) and 0 <= scale <= 2
    ):
        raise ValueError(
            f"taylor scale must be 'auto' or a number in [0, 2] (the range where the step is "
            f"no worse than WoodFisher's on the quadratic model), got {scale!r}"
        )
    grid = tuple(opts["grid"])
    if not grid or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 2 for a in grid
    ):
        raise ValueError(f"taylor grid must be numbers in [0, 2], got {list(grid)}")
    if 0 not in grid:
        raise ValueError(
            f"taylor grid must contain 0 (WoodFisher's step, the guarantee), got {list(grid)}"
        )
    opts["grid"] = grid
    n = opts["grad_samples"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"taylor grad_samples must be a positive integer or None, got {n!r}")
    if not isinstance(opts["saliency"], bool):
        raise ValueError(f"taylor saliency must be True or False, got {opts['saliency']!r}")
    return opts


def split_update(
    update: str, w: Tensor, remove: Tensor, present: Tensor, inv: InverseCurvature,
    grad: Tensor, inv_diag: Tensor,
) -> tuple[Tensor, Tensor]:
    """WoodFisher's step and the Newton part of the WoodTaylor step, for one update rule.

    Both rules are linear in ``(w, ḡ)``, so ``δ(α) = δ_WF + α·n`` for any scale.

    Args:
        update: ``"joint"`` or ``"independent"``.
        w: (d,) current weights.
        remove: (d,) bool, the newly pruned set.
        present: (d,) bool, weights present before this step.
        inv: The inverse curvature.
        grad: (d,) the mean gradient ``ḡ``.
        inv_diag: (d,) ``diag(F⁻¹)``.

    Returns:
        ``(δ_WF, n)``.
    """
    zeros = torch.zeros_like(w)
    if update == "joint":
        return (obs.joint_update(w, remove, inv, None, ~present),
                obs.joint_update(zeros, remove, inv, grad, ~present))
    return (obs.independent_update(w, remove, inv, None, inv_diag),
            obs.independent_update(zeros, remove, inv, grad, inv_diag))


@dataclass
class TaylorStep:
    """What a safe WoodTaylor prune step needs beyond the curvature.

    Attributes:
        options: The checked options (see :data:`TAYLOR_DEFAULTS`).
        model: The model being pruned (for held-out evaluations).
        search: The scale search (``scale="auto"``), else None.
        scales: The scale used at each step, in order.
    """

    options: dict[str, object]
    model: nn.Module
    search: ScaleSearch | None = None
    scales: list[float] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        """JSON-able summary: options, scale per step, held-out loss per scale and step.

        Returns:
            A dict.
        """
        opts = {**self.options, "grid": list(self.options["grid"])}
        return {"options": opts, "scales": list(self.scales),
                "search": None if self.search is None else list(self.search.history)}


@dataclass
class ScaleSearch:
    """Chooses the Newton scale of each prune step by the loss on held-out batches.

    Attributes:
        val: Held-out ``(inputs, targets)`` batches (not used for ``F`` or ``ḡ``).
        loss_fn: Mean loss.
        grid: Scales tried; 0 must be among them.
        history: One ``{scale: held-out loss}`` dict per step, in order.
    """

    val: list[tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    grid: tuple[float, ...]
    history: list[dict[str, float]] = field(default_factory=list)

    def _loss(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in self.val:
                n = batch_len(x)
                total += float(self.loss_fn(call_model(model, x), y)) * n
                count += n
        value = total / max(count, 1)
        return value if math.isfinite(value) else math.inf

    def choose(
        self, model: nn.Module, modules: Mapping[str, nn.Module], layout: Layout,
        candidate: Callable[[float], Tensor],
    ) -> float:
        """Try every scale on the held-out batches and keep the best (ties: the smaller).

        After the grid, four scales around the best nonzero one (×0.5, ×0.7, ×1.4, ×2, at most
        2) refine it: the held-out loss is sharp in α once ḡ is well estimated, and grid points
        half a decade apart can straddle the minimum. Each candidate's weights are written into
        the modules for one evaluation and the original values are put back; the masks are
        untouched (pruned entries of a candidate are already 0).

        Args:
            model: The model (in eval mode).
            modules: The selected modules.
            layout: Their layout.
            candidate: ``α ↦`` the flat new weights of step ``δ(α)``.

        Returns:
            The chosen ``α``.
        """
        params = [weight_param(m) for m in modules.values()]
        saved = [p.detach().clone() for p in params]
        losses: dict[str, float] = {}

        def trial(alpha: float) -> None:
            parts = layout.split(candidate(alpha))
            with torch.no_grad():
                for p, name in zip(params, layout.names, strict=True):
                    p.copy_(parts[name].to(p.dtype))
            losses[repr(float(alpha))] = self._loss(model)

        def best() -> float:
            low = min(losses.values())
            return min(float(a) for a, v in losses.items() if v == low)

        try:
            for alpha in sorted(self.grid):
                trial(alpha)
            top = best()
            if top > 0:
                for factor in (0.5, 0.7, 1.4, 2.0):
                    if top * factor <= 2.0 and repr(top * factor) not in losses:
                        trial(top * factor)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
        self.history.append(losses)
        return best()
