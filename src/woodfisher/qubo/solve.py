"""Solve a QUBO with any dimod sampler, pick the best plan that fits, and search ``γ``.

``SOLVERS`` names the built-in choices: ``exact`` (dimod's brute force, the certificate, at most
:data:`EXACT_MAX_VARIABLES` variables), ``sa`` (dwave-samplers' simulated annealing), ``tabu``,
``steepest`` (greedy descent from random starts), ``ga`` and ``rl`` (the paper's classical
baselines, :mod:`woodfisher.qubo.search`). A real annealer or a hybrid solver plugs in as a
``dimod.Sampler`` object (its ``sample`` is called with the BQM alone).

Example:
    >>> import dimod
    >>> bqm = dimod.BinaryQuadraticModel({"a": -1, "b": -1}, {("a", "b"): 3}, 0, "BINARY")
    >>> run = solve(bqm, "exact")
    >>> run.energy, run.solver
    (-1.0, 'exact')
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dimod

from woodfisher.qubo.formulation import Decision, QuboProblem, feasible_start, formulate
from woodfisher.qubo.search import genetic, reinforce

#: Most variables ``exact`` takes (2^22 states, about 100 MB of samples).
EXACT_MAX_VARIABLES = 22


@dataclass
class Effort:
    """How hard each solver works (one budget for all, see :mod:`woodfisher.qubo.search`).

    Attributes:
        reads: Independent runs (SA, tabu, steepest) or the population/batch (GA, RL).
        sweeps: SA sweeps per read; GA and RL get ``reads × sweeps`` energy evaluations.
        tabu_ms: Tabu search time per read, in milliseconds.
    """

    reads: int = 64
    sweeps: int = 1000
    tabu_ms: int = 20

    def __post_init__(self) -> None:
        for name in ("reads", "sweeps", "tabu_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _exact(bqm, seed, effort):
    del seed, effort
    n = bqm.num_variables
    if n > EXACT_MAX_VARIABLES:
        raise ValueError(
            f"solver 'exact' enumerates 2^n states and takes at most {EXACT_MAX_VARIABLES} "
            f"variables; this problem has {n}: use 'sa' or 'tabu'"
        )
    ss = dimod.ExactSolver().sample(bqm)
    return ss.truncate(1)


def _sa(bqm, seed, effort):
    from dwave.samplers import SimulatedAnnealingSampler

    return SimulatedAnnealingSampler().sample(
        bqm, num_reads=effort.reads, num_sweeps=effort.sweeps, seed=seed
    )


def _tabu(bqm, seed, effort):
    from dwave.samplers import TabuSampler

    return TabuSampler().sample(
        bqm, num_reads=effort.reads, timeout=effort.tabu_ms, seed=seed
    )


def _steepest(bqm, seed, effort):
    import numpy as np
    from dwave.samplers import SteepestDescentSolver

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 2, size=(effort.reads, bqm.num_variables), dtype=np.int8)
    return SteepestDescentSolver().sample(
        bqm, initial_states=(starts, list(bqm.variables)), seed=seed
    )


def _ga(bqm, seed, effort):
    return genetic(bqm, evaluations=effort.reads * effort.sweeps, population=effort.reads,
                   seed=seed)


def _rl(bqm, seed, effort):
    return reinforce(bqm, evaluations=effort.reads * effort.sweeps, batch=effort.reads,
                     seed=seed)


#: Solver name to ``fn(bqm, seed, effort) -> dimod.SampleSet``.
SOLVERS: dict[str, Callable[..., dimod.SampleSet]] = {
    "exact": _exact,
    "sa": _sa,
    "tabu": _tabu,
    "steepest": _steepest,
    "ga": _ga,
    "rl": _rl,
}


@dataclass
class Run:
    """One solver run.

    Attributes:
        solver: Its name (or the sampler's class name).
        sampleset: What it returned.
        energy: Lowest energy found.
        time_s: Wall time of the run.
        seed: The seed it got.
    """

    solver: str
    sampleset: dimod.SampleSet
    energy: float
    time_s: float
    seed: int
    info: dict[str, object] = field(default_factory=dict)


def check_solver(solver: str | dimod.Sampler) -> str:
    """Name of ``solver``.

    Returns:
        A name from :data:`SOLVERS`, or the sampler's class name.

    Raises:
        ValueError: If it is neither a known name nor a ``dimod.Sampler``.
    """
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)} or pass "
                             "a dimod.Sampler")
        return solver
    if isinstance(solver, dimod.Sampler):
        return type(solver).__name__
    raise ValueError(
        f"solver must be one of {sorted(SOLVERS)} or a dimod.Sampler instance, got "
        f"{type(solver).__name__}"
    )


def solve(
    bqm: dimod.BinaryQuadraticModel,
    solver: str | dimod.Sampler = "sa",
    *,
    seed: int = 0,
    effort: Effort | None = None,
) -> Run:
    """Run one solver on ``bqm``.

    Args:
        bqm: The QUBO.
        solver: A name from :data:`SOLVERS` or a ``dimod.Sampler`` instance.
        seed: Seed of the solver's randomness (ignored by ``exact`` and foreign samplers).
        effort: The budget (default :class:`Effort`'s).

    Returns:
        The run.

    Raises:
        ValueError: On an unknown solver, or a problem too large for ``exact``.
    """
    name = check_solver(solver)
    effort = effort or Effort()
    t0 = time.perf_counter()
    if isinstance(solver, str):
        ss = SOLVERS[solver](bqm, seed, effort)
    else:
        ss = solver.sample(bqm)
    elapsed = time.perf_counter() - t0
    return Run(name, ss, float(ss.first.energy), elapsed, seed)


def best_decision(problem: QuboProblem, sampleset: dimod.SampleSet) -> tuple[Decision, dict]:
    """The lowest-energy sample whose plan fits the budget, else the lowest repaired.

    Returns:
        ``(decision, info)`` with ``energy`` (of that sample), ``feasible_samples`` (fraction of
        distinct samples that fit) and ``repaired``.
    """
    agg = sampleset.aggregate()
    order = agg.record.energy.argsort(kind="stable")
    variables = list(agg.variables)
    fits, first = 0, None
    for i in order:
        sample = dict(zip(variables, agg.record.sample[i].tolist(), strict=True))
        decision = problem.decode(sample)
        if problem.feasible(decision):
            fits += 1
            if first is None:
                first = (decision, float(agg.record.energy[i]))
    info = {"feasible_samples": fits / max(len(agg), 1), "repaired": first is None}
    if first is not None:
        info["energy"] = first[1]
        return first[0], info
    sample = dict(zip(variables, agg.record.sample[order[0]].tolist(), strict=True))
    decision = repair(problem, problem.decode(sample))
    info["energy"] = problem.energy(decision)
    return decision, info


def repair(problem: QuboProblem, decision: Decision) -> Decision:
    """Shrink ``decision`` until it fits: each step takes the cheapest move per bit saved.

    A move lowers one layer's width by one bit or prunes one more free filter of a layer (the
    one whose single-filter cost is lowest). Costs are the objective's.

    Returns:
        A plan that fits the budget.
    """
    lo, _ = problem.costs.bits
    single = problem.costs.single
    slices = problem.costs.filter_slices()
    current = decision
    while not problem.feasible(current):
        base_obj, base_size = problem.objective_value(current), problem.size_bits(current)
        moves = []
        for name, b in current.bits.items():
            if b > lo:
                moves.append(Decision({**current.bits, name: b - 1}, current.pruned))
        for name, free in problem.free.items():
            left = [i for i in free if i not in current.pruned[name]]
            if left:
                i = min(left, key=lambda j: float(single[slices[name].start + j]))
                pruned = tuple(sorted((*current.pruned[name], i)))
                moves.append(Decision(current.bits, {**current.pruned, name: pruned}))
        if not moves:
            return feasible_start(problem)
        scores = [
            (problem.objective_value(m) - base_obj) / max(base_size - problem.size_bits(m), 1)
            for m in moves
        ]
        current = moves[min(range(len(moves)), key=scores.__getitem__)]
    return current


def _moves_up(problem: QuboProblem, decision: Decision) -> list[Decision]:
    """Plans one step larger: one more bit for a layer, or one pruned filter back."""
    _, hi = problem.costs.bits
    single = problem.costs.single
    slices = problem.costs.filter_slices()
    moves = []
    for name, b in decision.bits.items():
        if b < hi:
            moves.append(Decision({**decision.bits, name: b + 1}, decision.pruned))
    for name, pruned in decision.pruned.items():
        if pruned:
            i = max(pruned, key=lambda j: float(single[slices[name].start + j]))
            rest = tuple(j for j in pruned if j != i)
            moves.append(Decision(decision.bits, {**decision.pruned, name: rest}))
    return moves


def fill(problem: QuboProblem, decision: Decision) -> Decision:
    """Spend budget left over: take the move up that lowers the objective most per bit added,
    while one fits and lowers it (ours; the Lagrange route stops short of the budget).

    Returns:
        A plan that fits and whose objective is no higher than ``decision``'s.
    """
    current = decision
    value = problem.objective_value(current)
    while True:
        size = problem.size_bits(current)
        best, best_gain = None, 0.0
        for move in _moves_up(problem, current):
            if not problem.feasible(move):
                continue
            gain = (value - problem.objective_value(move)) / max(problem.size_bits(move) - size, 1)
            if gain > best_gain:
                best, best_gain = move, gain
        if best is None:
            return current
        current, value = best, problem.objective_value(best)


def lagrange_search(
    costs,
    budget: float,
    solver: str | dimod.Sampler = "sa",
    *,
    seed: int = 0,
    effort: Effort | None = None,
    steps: int = 8,
    **options: object,
) -> tuple[QuboProblem, Run, Decision, list[dict]]:
    """The paper's route: find ``γ`` whose solutions fit, by doubling then bisection (log scale).

    Each ``γ`` is one solve; the plan kept is the best objective among the plans that fit.

    Args:
        costs: From :func:`woodfisher.qubo.costs.qubo_costs`.
        budget: The size budget.
        solver: As for :func:`solve`.
        seed: Solver seed.
        effort: Solver budget per ``γ``.
        steps: Bisection steps after a fitting ``γ`` is found.
        **options: Passed to :func:`woodfisher.qubo.formulation.formulate`.

    Returns:
        ``(problem, run, decision, trace)`` at the chosen ``γ``; ``trace`` lists every ``γ``
        tried with its size ratio and objective.

    Raises:
        ValueError: If no ``γ`` up to 2^40 times the start gives a plan that fits.
    """
    probe = formulate(costs, budget, constraint="lagrange", gamma=0.0, **options)
    scale = max(abs(float(probe.info["upper"])), 1e-30)
    trace: list[dict] = []
    best: tuple | None = None

    def attempt(gamma: float) -> bool:
        nonlocal best
        problem = formulate(costs, budget, constraint="lagrange", gamma=gamma, **options)
        run = solve(problem.bqm, solver, seed=seed, effort=effort)
        decision, _ = best_decision_any(problem, run.sampleset)
        fits = problem.feasible(decision)
        value = problem.objective_value(decision)
        trace.append({"gamma": gamma, "size_ratio": problem.size_ratio(decision),
                      "objective": value, "fits": fits, "time_s": run.time_s})
        if fits and (best is None or value < best[3]):
            best = (problem, run, decision, value)
        return fits

    lo_g, hi_g = 0.0, scale
    if not attempt(0.0):
        for _ in range(40):
            if attempt(hi_g):
                break
            lo_g, hi_g = hi_g, hi_g * 2
        else:
            raise ValueError(f"no gamma up to {hi_g:g} gives a plan within budget {budget:g}")
        for _ in range(steps):
            mid = math.sqrt(max(lo_g, hi_g / 64) * hi_g)
            if attempt(mid):
                hi_g = mid
            else:
                lo_g = mid
    problem, run, decision, _ = best
    return problem, run, decision, trace


def best_decision_any(problem: QuboProblem, sampleset: dimod.SampleSet) -> tuple[Decision, float]:
    """The plan of the lowest-energy sample, fitting or not.

    Returns:
        ``(decision, energy)``.
    """
    first = sampleset.first
    return problem.decode(first.sample), float(first.energy)
