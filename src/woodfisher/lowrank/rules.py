"""Rank rules: how many components each layer keeps under a parameter or FLOP budget.

Every rule returns per-layer ranks (None keeps a layer dense) whose total cost is within the
budget:

* ``uniform``: the same fraction of every layer's dense cost (one scale for all, bisected);
* ``energy``: the smallest rank keeping a fraction ``e`` of each layer's σ² energy, with ``e``
  bisected to the budget;
* ``erank``: ranks proportional to each layer's effective rank; ``l1``: proportional to its
  ℓ1 rank ``(‖σ‖₁/‖σ‖₂)²`` (the survey's "conventional sparse measure", for comparison);
* ``fisher`` (ours): per layer and candidate rank the predicted loss increase
  ``½ ΔᵀFΔ`` of the truncation ``Δ = Ŵ_r − W``, with ``F`` from :func:`woodfisher.fisher_inverse`
  (diagonal or block-wise WoodFisher), then the assignment of least total predicted loss within
  the budget (multiple-choice knapsack, :func:`~woodfisher.lowrank.budget.knapsack`).

For Tucker-2 and CP layers the spectra are those of the two channel unfoldings (mode 0 and 1) and
a measure is the larger of the two (a tied rank ``r`` keeps ``min(r, T)`` and ``min(r, S)``
components). Candidate truncations for ``fisher`` are nested: SVD truncations for matrices and
HOSVD truncations for Tucker-2 (one SVD per mode; the final layer is then fitted by HOOI); CP
candidates are fitted by CP-ALS at a coarser grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from woodfisher.lowrank.budget import LayerPlan, Ranks, fit_scale, knapsack
from woodfisher.lowrank.layers import compose, factorise, fisher_scales
from woodfisher.lowrank.measures import effective_rank, l1_rank, single_threaded, stable_rank

__all__ = [
    "CURVATURES",
    "RuleContext",
    "fisher_diagonal",
    "layer_quadratic",
    "spectral_measures",
    "truncation_deltas",
]

#: Curvatures the ``fisher`` rule and Fisher weighting accept.
CURVATURES = ("diagonal", "woodfisher")


@dataclass
class RuleContext:
    """What rules may need beyond the plans and the budget.

    Attributes:
        model: The dense model.
        data: Batches ``(x, y)`` (held-out samples for ``fisher`` and ``rene``).
        weighting: None or ``"fisher"`` (Fisher-weighted decompositions).
        curvature: ``"diagonal"`` or ``"woodfisher"``.
        num_grads: Gradients for the Fisher.
        block_size: WoodFisher block size.
        seed: Seed of every random choice.
        progress: Show progress bars.
        options: Rule-specific options (``rene``: see :mod:`woodfisher.lowrank.rene`).
        grid: Most candidate ranks per layer for ``fisher``.
        cache: Built statistics (the Fisher operator and its diagonal), shared with decompose.
    """

    model: nn.Module
    data: Iterable | None = None
    weighting: str | None = None
    curvature: str = "diagonal"
    num_grads: int = 256
    block_size: int | None = 500
    seed: int = 0
    progress: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    grid: int = 64
    cache: dict[str, Any] = field(default_factory=dict)

    def fisher(self, plans: Sequence[LayerPlan]):
        """The Fisher operator over the plans' weights (built once).

        Returns:
            A :class:`woodfisher.FisherInverse`.

        Raises:
            ValueError: If no data was given or the curvature is unknown.
        """
        if "fisher" not in self.cache:
            from woodfisher.curvature import fisher_inverse

            if self.data is None:
                raise ValueError(
                    "the Fisher needs data: pass data= (batches of (x, y) held out from training)"
                )
            if self.curvature not in CURVATURES:
                raise ValueError(
                    f"unknown curvature {self.curvature!r}; choose from {list(CURVATURES)}"
                )
            self.cache["fisher"] = fisher_inverse(
                self.model, self.data, self.curvature,
                params={p.name: p.module for p in plans}, num_grads=self.num_grads,
                block_size=self.block_size, seed=self.seed, progress=self.progress,
            )
        return self.cache["fisher"]

    def scales(self, plans: Sequence[LayerPlan], plan: LayerPlan):
        """Row/column weights of ``plan``'s decomposition (None, None without weighting).

        Returns:
            ``(row_weight, col_weight)``.
        """
        if self.weighting is None:
            return None, None
        if "diag" not in self.cache:
            self.cache["diag"] = fisher_diagonal(self.fisher(plans))
        return fisher_scales(self.cache["diag"][plan.name], plan.method)


def fisher_diagonal(op) -> dict[str, Tensor]:
    """The diagonal of ``F`` (not of ``F⁻¹``) in parameter shapes.

    The block-wise empirical Fisher and the diagonal Fisher share it: ``damp + mean_k g_k²``.

    Returns:
        Layer name to a tensor of the weight's shape.
    """
    inv = op.inv
    if hasattr(inv, "fisher_diag"):
        flat = inv.fisher_diag
    elif hasattr(inv, "grads"):
        flat = inv.grads.double().square().mean(0) + op.damp
    else:
        flat = op.fmul(torch.ones(op.layout.d, dtype=torch.float64)).double()
    return op.layout.split(flat.double())


def layer_quadratic(op, name: str, deltas: Tensor) -> Tensor:
    """``½ ΔᵀFΔ`` for changes ``Δ`` of one layer's weight (zero elsewhere).

    Uses the operator's gradients and blocks where it has them (the product only touches the
    layer's blocks), else ``op.fmul`` on full vectors; both give the same numbers.

    Args:
        op: A :class:`woodfisher.FisherInverse` built with ``fmul``.
        name: The layer.
        deltas: (k, *weight_shape) changes.

    Returns:
        (k,) predicted loss increases.
    """
    layout = op.layout
    i = layout.names.index(name)
    off, n = layout.offsets[i], layout.sizes[i]
    dv = deltas.reshape(deltas.shape[0], n).double()
    inv = op.inv
    if hasattr(inv, "fisher_diag"):
        f = inv.fisher_diag[off:off + n].double()
        return 0.5 * (dv.square() * f).sum(1)
    if hasattr(inv, "grads") and hasattr(inv, "blocks"):
        out = op.damp * dv.square().sum(1)
        m = inv.grads.shape[0]
        for start, stop in inv.blocks:
            a, b = max(start, off), min(stop, off + n)
            if a >= b:
                continue
            proj = inv.grads[:, a:b].double() @ dv[:, a - off:b - off].T  # (m, k)
            out += proj.square().sum(0) / m
        return 0.5 * out
    full = torch.zeros(layout.d, dv.shape[0], dtype=torch.float64)
    full[off:off + n] = dv.T
    return 0.5 * (full * op.fmul(full).double()).sum(0)


def _scaled(w: Tensor, rw: Tensor | None, cw: Tensor | None, channels: bool) -> Tensor:
    x = w.double()
    if rw is not None:
        x = x * rw.double().sqrt().reshape(-1, *([1] * (x.ndim - 1)))
    if cw is not None:
        if channels:
            x = x * cw.double().sqrt().reshape(1, -1, *([1] * (x.ndim - 2)))
        else:
            x = (x.reshape(x.shape[0], -1) * cw.double().sqrt()).reshape(x.shape)
    return x


def _unscaled(x: Tensor, rw: Tensor | None, cw: Tensor | None, channels: bool) -> Tensor:
    inv_r = None if rw is None else 1 / rw
    inv_c = None if cw is None else 1 / cw
    return _scaled(x, inv_r, inv_c, channels)


@single_threaded
def truncation_deltas(
    plan: LayerPlan, ranks: Sequence[int], rw: Tensor | None = None, cw: Tensor | None = None,
    cp_iters: int = 30,
) -> Tensor:
    """``Ŵ_r − W`` for each candidate rank (nested truncations; CP: one CP-ALS per rank).

    Returns:
        (len(ranks), *weight_shape) in float64.
    """
    from woodfisher.params import effective_weight

    w = effective_weight(plan.module).double()
    out = torch.empty(len(ranks), *w.shape, dtype=torch.float64)
    if plan.method == "svd":
        x = _scaled(w, rw, cw, channels=False).reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        for i, r in enumerate(ranks):
            approx = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(w.shape)
            out[i] = _unscaled(approx, rw, cw, channels=False) - w
    elif plan.method == "tucker2":
        x = _scaled(w, rw, cw, channels=True)
        u0 = torch.linalg.svd(x.reshape(x.shape[0], -1), full_matrices=False)[0]
        u1 = torch.linalg.svd(x.transpose(0, 1).reshape(x.shape[1], -1), full_matrices=False)[0]
        for i, r in enumerate(ranks):
            p0 = u0[:, :r] @ u0[:, :r].T
            p1 = u1[:, :r] @ u1[:, :r].T
            approx = torch.einsum("ab,bchw,dc->adhw", p0, x, p1)
            out[i] = _unscaled(approx, rw, cw, channels=True) - w
    else:
        for i, r in enumerate(ranks):
            seq = factorise(plan.module, "cp", r, rw, cw, iters=cp_iters)
            out[i] = compose(seq).double() - w
    return out


@single_threaded
def spectral_measures(plan: LayerPlan) -> dict[str, Any]:
    """Measures of ``plan``'s dense weight on the unfoldings its decomposition uses.

    Returns:
        ``{"erank", "l1_rank", "stable_rank", "spectra"}`` (the larger over the modes for
        Tucker-2/CP; ``spectra`` are the σ² of each mode).
    """
    if "erank" in plan.measures:
        return plan.measures
    from woodfisher.lowrank.measures import singular_values
    from woodfisher.params import effective_weight

    w = effective_weight(plan.module)
    modes = (0,) if plan.method == "svd" else (0, 1)
    plan.measures.update({
        "erank": max(effective_rank(w, m) for m in modes),
        "l1_rank": max(l1_rank(w, m) for m in modes),
        "stable_rank": max(stable_rank(w, m) for m in modes),
        "spectra": [singular_values(w, m) ** 2 for m in modes],
    })
    return plan.measures


def _rank_for_fraction(plan: LayerPlan, fraction: float, kind: str) -> int:
    target = fraction * plan.cost(None, kind)
    lo, hi = 0, plan.max_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan.cost(mid, kind) <= target:
            lo = mid
        else:
            hi = mid - 1
    return max(lo, 1)


def uniform(plans, kind, budget, ctx):
    """The same fraction of every layer's dense cost, as large as the budget allows.

    Returns:
        ``(ranks, info)``.
    """
    ranks, c = fit_scale(
        plans, lambda c: {p.name: _rank_for_fraction(p, c, kind) for p in plans}, budget, kind
    )
    return ranks, {"fraction": c}


def _energy_rank_of(spectra: list[Tensor], e: float) -> int:
    ranks = []
    for s2 in spectra:
        total = float(s2.sum())
        if total <= 0:
            ranks.append(1)
            continue
        kept = torch.cumsum(s2, 0) / total
        ranks.append(int((kept < e - 1e-12).sum()) + 1)
    return max(ranks)


def energy(plans, kind, budget, ctx):
    """Keep the same fraction of σ² energy in every layer, bisected to the budget.

    Returns:
        ``(ranks, info)``.
    """
    spectra = {p.name: spectral_measures(p)["spectra"] for p in plans}
    ranks, e = fit_scale(
        plans, lambda e: {p.name: _energy_rank_of(spectra[p.name], e) for p in plans}, budget,
        kind,
    )
    return ranks, {"energy": e}


def proportional(plans, kind, budget, measure: dict[str, float]):
    """Ranks ``round(c · measure)``, with ``c`` bisected to the budget.

    Returns:
        ``(ranks, c)``.
    """
    hi = max(p.max_rank / max(measure[p.name], 1e-9) for p in plans)
    return fit_scale(
        plans, lambda c: {p.name: max(1, round(c * measure[p.name])) for p in plans}, budget,
        kind, hi=hi,
    )


def erank(plans, kind, budget, ctx):
    """Ranks proportional to each layer's effective rank.

    Returns:
        ``(ranks, info)``.
    """
    measure = {p.name: spectral_measures(p)["erank"] for p in plans}
    ranks, c = proportional(plans, kind, budget, measure)
    return ranks, {"scale": c, "erank": measure}


def l1(plans, kind, budget, ctx):
    """Ranks proportional to each layer's ℓ1 rank ``(‖σ‖₁/‖σ‖₂)²``.

    Returns:
        ``(ranks, info)``.
    """
    measure = {p.name: spectral_measures(p)["l1_rank"] for p in plans}
    ranks, c = proportional(plans, kind, budget, measure)
    return ranks, {"scale": c, "l1_rank": measure}


def candidate_ranks(plan: LayerPlan, limit: int) -> list[int]:
    """Every useful rank, or ``limit`` of them evenly spread (1 and the largest included).

    Returns:
        Sorted ranks.
    """
    if plan.useful <= limit:
        return list(range(1, plan.useful + 1))
    grid = torch.linspace(1, plan.useful, limit).round().long().tolist()
    return sorted(set(grid))


def fisher(plans, kind, budget, ctx):
    """Least total predicted loss increase ``Σ ½ΔᵀFΔ`` within the budget (knapsack).

    Returns:
        ``(ranks, info)`` with the predicted increase per layer.
    """
    op = ctx.fisher(plans)
    options, names = [], []
    for plan in plans:
        limit = ctx.grid if plan.method != "cp" else min(ctx.grid, 12)
        cands = [r for r in candidate_ranks(plan, limit) if plan.cheaper(r, kind) is not None]
        rw, cw = ctx.scales(plans, plan)
        q = layer_quadratic(op, plan.name, truncation_deltas(plan, cands, rw, cw)) if cands \
            else torch.zeros(0)
        opts = [(plan.cost(r, kind), float(v), r) for r, v in zip(cands, q, strict=True)]
        options.append(opts + [(plan.cost(None, kind), 0.0, None)])
        names.append(plan.name)
    picks = knapsack(options, budget)
    ranks: Ranks = {n: options[i][j][2] for i, (n, j) in enumerate(zip(names, picks, strict=True))}
    predicted = {n: options[i][j][1] for i, (n, j) in enumerate(zip(names, picks, strict=True))}
    return ranks, {"predicted_loss_increase": predicted, "curvature": ctx.curvature,
                   "damp": op.damp, "num_grads": ctx.num_grads}
