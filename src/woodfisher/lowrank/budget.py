"""Which layers take part, what each rank costs, and how a rank assignment meets a budget.

A budget is a fraction of the selected layers' dense weights (``params``) or of their dense
multiply-accumulates (``flops``). A layer's rank is an integer or ``None`` (keep it dense, at its
dense cost); a rank whose factorised layer is not cheaper than the dense one is never chosen.
MACs come from :func:`woodfisher.count_flops`: one pass over a rank-1 shell of each layer gives
the output positions of each stage, and a stage's MACs are its weights times its positions.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> plans, skipped = plan_layers(net, "svd", torch.zeros(1, 1, 8, 8), min_weights=0,
    ...                              keep_classifier=False)
    >>> [(p.name, p.dense_params, p.params(4), p.macs(4)) for p in plans]
    [('1', 2048, 384, 384), ('3', 320, 168, 168)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from woodfisher.lowrank.layers import (
    max_rank,
    method_for,
    shell,
    skip_reason,
    stage_params,
    useful_max_rank,
)

__all__ = ["BUDGETS", "LayerPlan", "fit_scale", "knapsack", "plan_layers", "total_cost"]

BUDGETS = ("params", "flops")

Ranks = dict[str, int | None]


@dataclass
class LayerPlan:
    """One selected layer: its module, decomposition and costs.

    Attributes:
        name: Module name.
        module: The dense module.
        method: The decomposition it gets (``"svd"`` for Linear and 1×1 convolutions).
        dense_params: Weights of the dense layer.
        dense_macs: MACs of the dense layer per example.
        positions: Output positions of each factorised stage (MACs per weight).
        max_rank: Largest allowed rank.
        useful: Largest rank with fewer weights than the dense layer.
        input_shape: Shape of one example's input to the layer.
    """

    name: str
    module: nn.Module
    method: str
    dense_params: int
    dense_macs: int
    positions: list[float]
    max_rank: int
    useful: int
    input_shape: tuple[int, ...]
    measures: dict[str, float] = field(default_factory=dict)

    def params(self, rank: int | None) -> int:
        """Weights at ``rank`` (None: dense).

        Returns:
            The count.
        """
        if rank is None:
            return self.dense_params
        return sum(stage_params(self.module, self.method, rank))

    def macs(self, rank: int | None) -> int:
        """MACs per example at ``rank`` (None: dense).

        Returns:
            The count.
        """
        if rank is None:
            return self.dense_macs
        parts = stage_params(self.module, self.method, rank)
        return round(sum(p * q for p, q in zip(parts, self.positions, strict=True)))

    def cost(self, rank: int | None, kind: str) -> int:
        """``params`` or ``macs`` at ``rank``.

        Returns:
            The cost.
        """
        return self.params(rank) if kind == "params" else self.macs(rank)

    def cheaper(self, rank: int | None, kind: str) -> int | None:
        """``rank``, or None where the factorised layer would cost as much as the dense one.

        Returns:
            The rank to use.
        """
        if rank is None or rank > self.useful or self.cost(rank, kind) >= self.cost(None, kind):
            return None
        return rank


def _input_shapes(model: nn.Module, modules: dict[str, nn.Module], example: torch.Tensor):
    shapes: dict[str, tuple[int, ...]] = {}
    names = {m: n for n, m in modules.items()}

    def hook(mod, args, out):
        shapes.setdefault(names[mod], tuple(args[0].shape[1:]))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return shapes


def plan_layers(
    model: nn.Module,
    method: str,
    example: torch.Tensor,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    min_weights: int = 512,
    keep_classifier: bool = True,
) -> tuple[list[LayerPlan], list[dict[str, str]]]:
    """Select the layers to factorise and work out their costs.

    Args:
        model: The dense model.
        method: ``"svd"``, ``"tucker2"`` or ``"cp"`` for convolutions.
        example: One batch of inputs (shapes only matter).
        layers: ``fnmatch`` patterns of modules (default: every Linear/Conv).
        skip: Patterns to leave out.
        min_weights: Layers with fewer weights stay dense (RENE's code uses 512).
        keep_classifier: Keep the last selected layer called in the forward pass (the
            classifier) dense, as RENE's code does.

    Returns:
        ``(plans, skipped)``: one plan per factorisable layer, and ``{"name", "reason"}`` for
        each selected layer left dense.

    Raises:
        ValueError: If no layer can be factorised (the message lists why).
    """
    from woodfisher.flops import count_flops
    from woodfisher.params import select_layers

    method_for(nn.Linear(1, 1), method)  # validates the name
    modules = select_layers(model, layers, skip)
    # Every Linear/Conv is hooked, so that the classifier is the model's last layer even when
    # only some layers are selected.
    shapes = _input_shapes(model, select_layers(model), example)
    dense = count_flops(model, example[:1]).by_name()
    last = next(reversed(shapes), None)
    plans, skipped = [], []
    for name, mod in modules.items():
        reason = skip_reason(mod)
        if reason is None and keep_classifier and name == last:
            reason = "classifier (kept dense, as RENE does; keep_classifier=False to factorise)"
        if reason is None and name not in shapes:
            reason = "not called in the forward pass"
        if reason is None and mod.weight.numel() < min_weights:
            reason = f"too small ({mod.weight.numel()} weights < min_weights={min_weights})"
        useful = useful_max_rank(mod, method) if reason is None else 0
        if reason is None and useful < 1:
            reason = "too small to gain (rank 1 has at least the dense layer's weights)"
        if reason:
            skipped.append({"name": name, "reason": reason})
            continue
        stages = count_flops(shell(mod, method, 1), torch.zeros(1, *shapes[name]))
        plans.append(LayerPlan(
            name=name,
            module=mod,
            method=method_for(mod, method),
            dense_params=mod.weight.numel(),
            dense_macs=dense[name].macs,
            positions=[layer.macs_per_weight for layer in stages.layers],
            max_rank=max_rank(mod, method),
            useful=useful,
            input_shape=shapes[name],
        ))
    if not plans:
        why = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
        raise ValueError(f"no layer can be factorised ({why}); lower min_weights or select layers")
    return plans, skipped


def total_cost(plans: Sequence[LayerPlan], ranks: Ranks, kind: str) -> int:
    """Sum of the layers' costs at ``ranks``.

    Returns:
        Weights or MACs.
    """
    return sum(p.cost(ranks.get(p.name), kind) for p in plans)


def _min_assignment(plans: Sequence[LayerPlan], kind: str) -> Ranks:
    return {p.name: p.cheaper(1, kind) for p in plans}


def check_reachable(plans: Sequence[LayerPlan], kind: str, fraction: float) -> int:
    """The budget in absolute units, after checking that some assignment meets it.

    Returns:
        ``fraction`` × the dense cost of the plans.

    Raises:
        ValueError: If ``fraction`` is outside (0, 1] or below what rank 1 everywhere reaches.
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"{kind} must be a fraction in (0, 1], got {fraction!r}")
    dense = total_cost(plans, {}, kind)
    least = total_cost(plans, _min_assignment(plans, kind), kind)
    if least > fraction * dense:
        lowest = math.ceil(1000 * least / dense) / 1000
        raise ValueError(
            f"budget {kind}={fraction:g} cannot be met: the smallest assignment (rank 1 in every "
            f"factorised layer) keeps {least / dense:.4f} of the selected layers' {kind}; choose "
            f"{kind} >= {lowest:g}, or skip layers that cannot shrink"
        )
    return int(math.floor(fraction * dense))


def fit_scale(
    plans: Sequence[LayerPlan],
    ranks_at: Callable[[float], Ranks],
    budget: int,
    kind: str,
    lo: float = 0.0,
    hi: float = 1.0,
    iters: int = 60,
) -> tuple[Ranks, float]:
    """The ranks at the largest scale ``c`` in ``[lo, hi]`` whose cost stays within ``budget``.

    ``ranks_at(c)`` must give ranks that grow with ``c``; ranks not cheaper than dense become
    None (dense) and a layer is never left below rank 1, so the minimum assignment is used when
    no ``c`` fits.

    Returns:
        ``(ranks, c)``.
    """
    def at(c: float) -> Ranks:
        raw = ranks_at(c)
        return {p.name: p.cheaper(max(1, min(raw[p.name], p.max_rank)), kind)
                if raw.get(p.name) is not None else None for p in plans}

    best, best_c = _min_assignment(plans, kind), lo
    top = hi
    if total_cost(plans, at(hi), kind) <= budget:
        return at(hi), hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ranks = at(mid)
        if total_cost(plans, ranks, kind) <= budget:
            best, best_c, lo = ranks, mid, mid
        else:
            hi = mid
    return _fill(plans, at, best, best_c, top, budget, kind, iters), best_c


def _fill(plans, at, ranks: Ranks, c: float, top: float, budget: int, kind: str, iters: int):
    """Spend what the single scale leaves: grow layers in the order the scale would.

    One scale moves every layer at once, so the layer that jumps first past the budget blocks
    the others; here each layer's next step (the smallest scale at which its rank grows) is
    taken in scale order whenever it still fits.
    """
    ranks = dict(ranks)
    for _ in range(len(plans) * 4):
        steps = []
        for p in plans:
            cur = ranks[p.name]
            if cur is None or at(top)[p.name] == cur:
                continue
            lo, hi = c, top
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                if at(mid)[p.name] == cur:
                    lo = mid
                else:
                    hi = mid
            steps.append((hi, p.name, at(hi)[p.name]))
        grown = False
        for _, name, rank in sorted(steps, key=lambda s: s[0]):
            trial = {**ranks, name: rank}
            if total_cost(plans, trial, kind) <= budget:
                ranks, grown = trial, True
        if not grown:
            break
    return ranks


def knapsack(
    options: Sequence[Sequence[tuple[int, float, int | None]]],
    budget: int,
    resolution: int = 4000,
) -> list[int]:
    """Multiple-choice knapsack: one option per layer, least total value within the budget.

    Costs are rounded up to ``budget / resolution`` units, so the result never exceeds the
    budget (and is optimal up to that rounding).

    Args:
        options: Per layer, ``(cost, value, rank)`` choices.
        budget: Total cost allowed.
        resolution: Number of cost units the budget is cut into.

    Returns:
        The index of the chosen option in each layer.

    Raises:
        ValueError: If no combination fits.

    Example:
        >>> knapsack([[(1, 5.0, 1), (3, 1.0, 2)], [(1, 4.0, 1), (3, 0.5, 2)]], budget=4)
        [1, 0]
    """
    unit = max(budget / resolution, 1e-12)
    nb = int(math.floor(budget / unit + 1e-9)) + 1
    inf = np.inf
    best = np.full(nb, inf)
    best[0] = 0.0
    choice = []
    for opts in options:
        new = np.full(nb, inf)
        arg = np.full(nb, -1, dtype=np.int64)
        for j, (cost, value, _) in enumerate(opts):
            c = math.ceil(cost / unit - 1e-9)
            if c >= nb:
                continue
            cand = np.full(nb, inf)
            cand[c:] = best[: nb - c] + value
            better = cand < new
            new[better], arg[better] = cand[better], j
        best = new
        choice.append(arg)
    if not np.isfinite(best).any():
        raise ValueError("no rank assignment fits the budget")
    b = int(np.argmin(best))
    picks = []
    for layer in range(len(options) - 1, -1, -1):
        j = int(choice[layer][b])
        picks.append(j)
        b -= math.ceil(options[layer][j][0] / unit - 1e-9)
    return picks[::-1]
