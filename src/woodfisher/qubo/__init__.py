"""Joint filter pruning and quantization as a QUBO (Wang et al., FGCS 2025), solved by annealing.

:func:`build_qubo` writes the problem as a ``dimod.BinaryQuadraticModel`` (one variable per
filter, a binary code of bits removed per layer, the size budget as an exact penalty or the
paper's ``−γ·size`` term), with the paper's magnitude objective or ours, the second-order loss
model ``½ E[δᵀFδ]`` from the WoodFisher engine's gradients; :func:`solve` runs a dimod sampler
or the paper's GA/RL baselines on it; :func:`compress` does everything and changes the model.
Needs the ``qubo`` extra (dimod, dwave-samplers); ``import woodfisher`` does not import it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> data = [(torch.randn(64, 8), torch.randint(0, 3, (64,)))]
    >>> problem = build_qubo(net, data, 0.15, objective="fisher", num_grads=64)
    >>> sorted({kind for kind, *_ in problem.bqm.variables})  # filters, code bits, auxiliaries
    ['c', 'p', 'q', 's', 'u', 'z']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from woodfisher.qubo.apply import (
    QUANTIZERS,
    apply_plan,
    compress,
    layer_report,
    plan_masks,
    plan_modules,
    silence_channels,
)
from woodfisher.qubo.costs import OBJECTIVES, Costs, LayerCosts, qubo_costs
from woodfisher.qubo.formulation import (
    CONSTRAINTS,
    Decision,
    QuboProblem,
    feasible_start,
    formulate,
)
from woodfisher.qubo.search import EnergyBatch, genetic, reinforce
from woodfisher.qubo.solve import (
    EXACT_MAX_VARIABLES,
    SOLVERS,
    Effort,
    Run,
    best_decision,
    fill,
    lagrange_search,
    repair,
    solve,
)

__all__ = [
    "build_qubo",
    "qubo_costs",
    "formulate",
    "compress",
    "solve",
    "lagrange_search",
    "best_decision",
    "repair",
    "fill",
    "feasible_start",
    "apply_plan",
    "plan_masks",
    "plan_modules",
    "silence_channels",
    "layer_report",
    "genetic",
    "reinforce",
    "EnergyBatch",
    "Costs",
    "LayerCosts",
    "Decision",
    "QuboProblem",
    "Effort",
    "Run",
    "OBJECTIVES",
    "CONSTRAINTS",
    "QUANTIZERS",
    "SOLVERS",
    "EXACT_MAX_VARIABLES",
]


def build_qubo(
    model: nn.Module,
    data: Iterable | None,
    budget: float,
    objective: str = "fisher",
    *,
    constraint: str = "penalty",
    gamma: float | None = None,
    bits: Sequence[int] = (2, 8),
    min_keep: float = 0.25,
    size_unit: int | None = None,
    penalty: float | None = None,
    **cost_options: object,
) -> QuboProblem:
    """The QUBO of pruning ``model``'s filters and choosing its bit widths within ``budget``.

    Args:
        model: The network (not changed).
        data: Batches of ``(inputs, targets)`` (``"fisher"`` only).
        budget: Stored bits of the kept weights over their fp32 bits, in (0, 1).
        objective: ``"fisher"`` (ours) or ``"magnitude"`` (the paper's heuristic).
        constraint: ``"penalty"`` (exact) or ``"lagrange"`` (needs ``gamma``).
        gamma: Weight of the relative size for ``"lagrange"``.
        bits: Lowest and highest bit width.
        min_keep: Fraction of each prunable layer's filters never pruned.
        size_unit: Bits per unit of the size penalty (default automatic; 1 = exact).
        penalty: Penalty weight (default: the rule of :mod:`woodfisher.qubo.formulation`).
        **cost_options: Passed to :func:`qubo_costs` (``layers``, ``skip``, ``no_prune``,
            ``beta``, ``num_grads``, ``relative_damp``, ``seed``, ``progress``).

    Returns:
        The problem: ``.bqm`` (a ``dimod.BinaryQuadraticModel``), ``.filters`` (variable →
        (layer, filter)), ``.bits`` (variable → (layer, code bit)), ``.decode``, ``.encode``.
    """
    costs = qubo_costs(model, data, objective, bits=bits, **cost_options)
    return formulate(costs, budget, constraint=constraint, gamma=gamma, min_keep=min_keep,
                     size_unit=size_unit, penalty=penalty)
