"""Joint filter pruning and per-layer bit widths as one QUBO (a ``dimod.BinaryQuadraticModel``).

Variables (the paper's, Wang et al. 2025): ``("p", layer, i)`` = 1 prunes filter ``i``;
``("q", layer, k)`` are the bits of the code ``r = Σ_k 2^k q_k`` of bits removed, so a layer
gets ``b = hi − r`` bits (codes above ``hi − lo`` are forbidden by a penalty). The stored size
``Σ_layers f·(F − P)·b`` (``f`` weights per filter, ``F`` filters, ``P`` pruned) must not pass
``budget × 32 × weights``. It is quadratic in (p, q), so a squared penalty on it would be
quartic; two ways keep the problem a QUBO:

- ``constraint="penalty"`` (ours, exact): the pruned count of a layer is also written in binary
  (``C = Σ_j w_j c_j``, tied to the ``p`` by ``(Σ p − C)²``), the products ``c_j q_k`` get
  auxiliary variables (Rosenberg's ``cq − 2cz − 2qz + 3z``), and the size, now linear, meets
  the budget through slack bits: ``(size + slack − budget)²``, in units of ``size_unit`` bits,
  every coefficient rounded up (so a point that meets the rounded budget meets the true one).
- ``constraint="lagrange"`` (the paper's ``−γ·R``): ``γ · size / fp32 size`` is added to the
  objective; the caller searches ``γ`` until solutions meet the budget (:func:`~woodfisher.qubo.
  solve.lagrange_search`). No optimality guarantee for the budget (duality gap).

Codes of three bits need the cubic monomial ``q0 q1 q2`` for an arbitrary cost per width; it is
``u q2`` with an auxiliary ``u = q0 q1`` (Rosenberg penalty again).

**Penalty rule.** Every penalty term is an integer-valued quadratic that is 0 exactly when its
constraint holds and at least 1 otherwise. With ``U`` the objective of any feasible point and
``L`` a lower bound of the objective over all binary points, one weight ``A > U − L`` for all
penalties makes every infeasible point cost more than ``U ≥`` the constrained optimum: the
optima of the QUBO are exactly the feasible optima (checked by brute force in the tests).
``U`` comes from the largest uniform bit width that fits (or the smallest width with every free
filter pruned); ``L`` is 0 for the pruning part (a positive semi-definite form) plus, per layer,
the exact minimum of its quantization part over all 2^(K+1) states of its code bits and ``u``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from woodfisher.qubo.costs import qubo_costs
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> problem = formulate(qubo_costs(net, None, "magnitude", bits=(2, 5)), 0.1, min_keep=0.3)
    >>> problem.filters  # free filters: the strongest one is always kept
    {('p', '0', 1): ('0', 1), ('p', '0', 2): ('0', 2)}
    >>> sorted(problem.bits.values())
    [('0', 0), ('0', 1), ('2', 0), ('2', 1)]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import dimod
import torch

from woodfisher.qubo.costs import Costs

#: Ways of writing the size budget into the QUBO.
CONSTRAINTS = ("penalty", "lagrange")
FP32_BITS = 32

Label = Hashable


@dataclass(frozen=True)
class Decision:
    """A compression plan: the bit width of each layer and the filters it loses.

    Attributes:
        bits: Layer name to bit width.
        pruned: Layer name to pruned filter indices (sorted), for every prunable layer.
    """

    bits: dict[str, int]
    pruned: dict[str, tuple[int, ...]]


def capped_weights(top: int) -> list[int]:
    """Weights ``1, 2, 4, …, rest`` whose subset sums are exactly ``0..top``.

    Example:
        >>> capped_weights(12)
        [1, 2, 4, 5]

    Returns:
        The weights (empty for ``top = 0``).
    """
    out, total, p = [], 0, 1
    while total + p <= top:
        out.append(p)
        total += p
        p *= 2
    if top > total:
        out.append(top - total)
    return out


def encode_int(value: int, weights: Sequence[int]) -> list[int]:
    """Binary digits of ``value`` in the :func:`capped_weights` system.

    Returns:
        One 0/1 per weight.
    """
    bits = [0] * len(weights)
    k = 0
    while k < len(weights) and weights[k] == 1 << k:
        k += 1
    if k < len(weights) and value >= weights[k]:  # the capped last weight
        bits[k] = 1
        value -= weights[k]
    for j in range(k):
        bits[j] = (value >> j) & 1
    return bits


def multilinear(values: Sequence[float], k: int) -> dict[tuple[int, ...], float]:
    """Coefficients of the multilinear polynomial in ``k`` bits that takes ``values[r]`` at code r.

    Returns:
        Subset of bit positions (sorted tuple) to coefficient (Möbius transform).
    """
    out = {}
    for size in range(k + 1):
        for subset in itertools.combinations(range(k), size):
            c = 0.0
            for sub in range(size + 1):
                for t in itertools.combinations(subset, sub):
                    c += (-1) ** (size - sub) * values[sum(1 << j for j in t)]
            out[subset] = c
    return out


@dataclass
class QuboProblem:
    """The QUBO, how its variables map back to the model, and how to check a plan.

    Attributes:
        bqm: The full model: objective (+ ``γ·size`` for ``"lagrange"``) + ``penalty × penalties``.
        objective: The objective alone (predicted loss increase, or the magnitude heuristic).
        penalties: The unweighted penalty terms (0 exactly on consistent, feasible points).
        penalty: The penalty weight ``A``.
        filters: Variable to ``(layer, filter)``.
        bits: Variable to ``(layer, k)`` (bit ``k`` of the code of bits removed).
        costs: The statistics the problem was built from.
        budget: Allowed stored bits as a fraction of the fp32 size.
        constraint: ``"penalty"`` or ``"lagrange"``.
        gamma: The Lagrange weight (``"lagrange"`` only).
        size_unit: Bits per unit of the size in the penalty.
        free: Layer to its free (variable) filters.
        kept: Layer to the filters always kept (``min_keep``).
        info: Counts and bounds behind the penalty rule.
    """

    bqm: dimod.BinaryQuadraticModel
    objective: dimod.BinaryQuadraticModel
    penalties: dimod.BinaryQuadraticModel
    penalty: float
    filters: dict[Label, tuple[str, int]]
    bits: dict[Label, tuple[str, int]]
    costs: Costs
    budget: float
    constraint: str
    gamma: float | None
    size_unit: int
    free: dict[str, tuple[int, ...]]
    kept: dict[str, tuple[int, ...]]
    info: dict[str, object] = field(default_factory=dict)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def fp32_bits(self) -> int:
        """Bits of all selected weights in fp32."""
        return FP32_BITS * sum(layer.weights for layer in self.costs.layers)

    def size_bits(self, decision: Decision) -> int:
        """Stored bits of the kept weights (every weight of a kept filter, at its layer's width).

        Returns:
            The size in bits.
        """
        total = 0
        for layer in self.costs.layers:
            kept = layer.filters - len(decision.pruned.get(layer.name, ()))
            total += layer.per_filter * kept * decision.bits[layer.name]
        return total

    def size_ratio(self, decision: Decision) -> float:
        """Stored bits over fp32 bits.

        Returns:
            The ratio.
        """
        return self.size_bits(decision) / self.fp32_bits

    def feasible(self, decision: Decision) -> bool:
        """Whether ``decision`` meets the budget (exactly, not in rounded units).

        Returns:
            True if it fits.
        """
        return self.size_bits(decision) <= self.budget * self.fp32_bits

    # -- variables ----------------------------------------------------------------------------
    @property
    def code_bits(self) -> int:
        """Bits of each layer's width code."""
        lo, hi = self.costs.bits
        return (hi - lo).bit_length()

    def decode(self, sample: Mapping[Label, int]) -> Decision:
        """The plan a sample stands for (auxiliary and slack variables are ignored).

        Returns:
            The decision; a forbidden code reads as the lowest width.
        """
        lo, hi = self.costs.bits
        bits = {}
        for layer in self.costs.layers:
            r = sum(int(sample[("q", layer.name, k)]) << k for k in range(self.code_bits))
            bits[layer.name] = max(hi - r, lo)
        pruned = {
            name: tuple(i for i in free if sample[("p", name, i)])
            for name, free in self.free.items()
        }
        return Decision(bits, pruned)

    def encode(self, decision: Decision) -> dict[Label, int]:
        """A full sample for ``decision``: consistent auxiliaries, slack taking up the rest.

        Returns:
            Variable to 0/1 for every variable of :attr:`bqm`.

        Raises:
            ValueError: If a width is outside the bit range or a pruned filter is not free.
        """
        lo, hi = self.costs.bits
        sample: dict[Label, int] = {}
        for layer in self.costs.layers:
            b = decision.bits[layer.name]
            if not lo <= b <= hi:
                raise ValueError(f"bits[{layer.name!r}] = {b} is outside {lo}..{hi}")
            r = hi - b
            for k in range(self.code_bits):
                sample[("q", layer.name, k)] = (r >> k) & 1
            if ("u", layer.name) in self.bqm.variables:
                sample[("u", layer.name)] = sample[("q", layer.name, 0)] * sample[
                    ("q", layer.name, 1)
                ]
        for name, free in self.free.items():
            pruned = set(decision.pruned.get(name, ()))
            if not pruned <= set(free):
                raise ValueError(
                    f"filters {sorted(pruned - set(free))} of {name!r} are not free variables"
                )
            for i in free:
                sample[("p", name, i)] = int(i in pruned)
            weights = self.info["count_weights"].get(name, [])
            digits = encode_int(len(pruned), weights)
            for j, v in enumerate(digits):
                sample[("c", name, j)] = v
                for k in range(self.code_bits):
                    sample[("z", name, j, k)] = v * sample[("q", name, k)]
        slack_weights = self.info.get("slack_weights", [])
        if slack_weights:
            room = max(0, int(self.info["budget_units"]) - self.rounded_size(sample))
            for j, v in enumerate(encode_int(min(room, sum(slack_weights)), slack_weights)):
                sample[("s", j)] = v
        return {v: sample.get(v, 0) for v in self.bqm.variables}

    def rounded_size(self, sample: Mapping[Label, int]) -> int:
        """The size in units as the penalty sees it (``"penalty"`` only; 0 otherwise).

        Returns:
            An integer.
        """
        terms = self.info.get("size_terms", {})
        return int(self.info.get("size_constant", 0)) + sum(
            a * int(sample[v]) for v, a in terms.items()
        )

    def energy(self, decision: Decision) -> float:
        """QUBO energy of the consistent sample of ``decision``.

        Returns:
            The energy.
        """
        return float(self.bqm.energy(self.encode(decision)))

    def objective_value(self, decision: Decision) -> float:
        """The objective of ``decision`` (no penalty, no ``γ·size``), from the costs directly.

        Equals :attr:`objective`'s energy at :meth:`encode` ``(decision)`` (a test checks it).

        Returns:
            ``Σ_{i,j pruned} J_ij + Σ_layers quant[b]``.
        """
        lo, _ = self.costs.bits
        slices = self.costs.filter_slices()
        index = [slices[n].start + i for n, idx in decision.pruned.items() for i in idx]
        value = float(self.costs.prune[index][:, index].sum()) if index else 0.0
        for layer in self.costs.layers:
            value += float(self.costs.quant[layer.name][decision.bits[layer.name] - lo])
        return value


def check_budget(budget: float) -> float:
    """Check a size budget.

    Returns:
        It, as a float.

    Raises:
        ValueError: If it is not a number strictly between 0 and 1.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
        math.isfinite(budget) and 0 < budget < 1
    ):
        raise ValueError(
            f"budget must be a fraction of the fp32 size strictly between 0 and 1, got "
            f"{budget!r} (0.1 keeps a tenth of the bits)"
        )
    return float(budget)


def _free_filters(costs: Costs, min_keep: float) -> tuple[dict, dict]:
    """Per prunable layer: the free filters and the ``ceil(min_keep·F)`` costliest, kept."""
    single = costs.single
    free, kept = {}, {}
    for name, sl in costs.filter_slices().items():
        cost = single[sl]
        n = cost.numel()
        keep = min(n, math.ceil(min_keep * n - 1e-9))
        order = torch.argsort(cost, descending=True, stable=True).tolist()
        kept[name] = tuple(sorted(order[:keep]))
        free[name] = tuple(sorted(order[keep:]))
    return free, kept


def _add_rosenberg(bqm: dimod.BinaryQuadraticModel, x: Label, y: Label, z: Label, w: float):
    """``w·(xy − 2xz − 2yz + 3z)``: 0 iff ``z = xy``, else at least ``w``."""
    bqm.add_quadratic(x, y, w)
    bqm.add_quadratic(x, z, -2 * w)
    bqm.add_quadratic(y, z, -2 * w)
    bqm.add_linear(z, 3 * w)


def _states(k: int, with_u: bool):
    """Every assignment of k code bits (and u) as (r, u, q tuple)."""
    for q in itertools.product((0, 1), repeat=k):
        r = sum(b << j for j, b in enumerate(q))
        for u in ((0, 1) if with_u else (None,)):
            yield r, u, q


def _poly_value(poly: Mapping[tuple[int, ...], float], q: Sequence[int], u: int | None) -> float:
    total = 0.0
    for subset, c in poly.items():
        if len(subset) == 3:
            total += c * u * q[2]
        else:
            total += c * math.prod(q[j] for j in subset)
    return total


def _add_poly(
    bqm: dimod.BinaryQuadraticModel, name: str, poly: Mapping[tuple[int, ...], float],
    scale: float = 1.0,
) -> None:
    for subset, c in poly.items():
        if c == 0:
            continue
        labels = [("q", name, j) for j in subset]
        if len(subset) == 0:
            bqm.offset += scale * c
        elif len(subset) == 1:
            bqm.add_linear(labels[0], scale * c)
        elif len(subset) == 2:
            bqm.add_quadratic(labels[0], labels[1], scale * c)
        else:
            bqm.add_quadratic(("u", name), ("q", name, 2), scale * c)


def formulate(
    costs: Costs,
    budget: float,
    *,
    constraint: str = "penalty",
    gamma: float | None = None,
    min_keep: float = 0.25,
    size_unit: int | None = None,
    penalty: float | None = None,
) -> QuboProblem:
    """Write the compression problem for ``costs`` as a QUBO.

    Args:
        costs: From :func:`woodfisher.qubo.costs.qubo_costs`.
        budget: Stored bits of the kept weights as a fraction of their fp32 size, in (0, 1).
        constraint: ``"penalty"`` (exact, slack bits) or ``"lagrange"`` (the paper's ``−γ·R``).
        gamma: Weight of ``size / fp32 size`` for ``"lagrange"`` (required there).
        min_keep: Fraction of each prunable layer's filters that is never pruned (the
            costliest to prune, by their single-filter cost), against layer collapse.
        size_unit: Bits per unit of the size penalty; default the smallest power of two that
            keeps the budget within 2^14 units (1 = exact sizes).
        penalty: The penalty weight ``A``; default the rule in the module docstring.

    Returns:
        The problem.

    Raises:
        ValueError: On a bad budget, constraint, ``gamma``, ``min_keep``, ``size_unit`` or
            ``penalty``, or a budget below the smallest reachable size.
    """
    budget = check_budget(budget)
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; choose from {list(CONSTRAINTS)}")
    if constraint == "lagrange" and (
        gamma is None or not math.isfinite(gamma) or gamma < 0
    ):
        raise ValueError(f"constraint='lagrange' needs a finite gamma >= 0, got {gamma!r}")
    if not 0 <= min_keep <= 1:
        raise ValueError(f"min_keep must be a fraction in [0, 1], got {min_keep!r}")
    if size_unit is not None and (int(size_unit) != size_unit or size_unit < 1):
        raise ValueError(f"size_unit must be a positive integer (bits), got {size_unit!r}")
    if penalty is not None and not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"penalty must be a finite number > 0, got {penalty!r}")
    lo, hi = costs.bits
    K = (hi - lo).bit_length()
    rmax = hi - lo
    free, kept = _free_filters(costs, min_keep)
    layers = costs.layers
    fp32 = FP32_BITS * sum(layer.weights for layer in layers)
    objective = dimod.BinaryQuadraticModel("BINARY")
    penalties = dimod.BinaryQuadraticModel("BINARY")
    filters: dict[Label, tuple[str, int]] = {}
    bit_vars: dict[Label, tuple[str, int]] = {}
    lower = 0.0  # lower bound of the objective over all binary points

    # -- pruning: Σ_{i,j free} J_ij p_i p_j (positive semi-definite, so >= 0) --------------
    labels, index = [], []
    for name, sl in costs.filter_slices().items():
        for i in free[name]:
            labels.append(("p", name, i))
            index.append(sl.start + i)
            filters[("p", name, i)] = (name, i)
    J = costs.prune[index][:, index].double().numpy() if index else None
    for a, la in enumerate(labels):
        objective.add_linear(la, float(J[a, a]))
    for a, b in zip(*[t.tolist() for t in torch.triu_indices(len(labels), len(labels), 1)],
                    strict=True):
        if J[a, b] != 0:
            objective.add_quadratic(labels[a], labels[b], 2 * float(J[a, b]))

    # -- widths: any cost per width is a multilinear polynomial in the K code bits -------
    uses_u = {}
    for layer in layers:
        name = layer.name
        cost = costs.quant[name].double().tolist()  # index b - lo
        values = [cost[hi - min(r, rmax) - lo] for r in range(2**K)]
        forbid = [float(r > rmax) for r in range(2**K)]
        poly, fpoly = multilinear(values, K), multilinear(forbid, K)
        tiny = 1e-12 * max(1e-300, max(abs(v) for v in values))
        if abs(poly.get((0, 1, 2), 0.0)) <= tiny:
            poly.pop((0, 1, 2), None)
        cubic = (0, 1, 2) in poly or fpoly.get((0, 1, 2), 0) != 0
        uses_u[name] = cubic
        for k in range(K):
            bit_vars[("q", name, k)] = (name, k)
            objective.add_variable(("q", name, k))
        _add_poly(objective, name, poly)
        lower += min(_poly_value(poly, q, u) for _, u, q in _states(K, cubic))
        if cubic:
            # Smallest integer Rosenberg weight that keeps the layer's penalty >= 1 off its
            # consistent, allowed states (the forbidden-code polynomial may be negative there).
            for w in itertools.count(1):
                ok = all(
                    (_poly_value(fpoly, q, u) + w * (q[0] * q[1] - 2 * q[0] * u - 2 * q[1] * u
                                                     + 3 * u))
                    >= (0 if (u == q[0] * q[1] and r <= rmax) else 1)
                    for r, u, q in _states(K, True)
                )
                if ok:
                    break
            _add_rosenberg(penalties, ("q", name, 0), ("q", name, 1), ("u", name), float(w))
        _add_poly(penalties, name, fpoly)

    info: dict[str, object] = {"count_weights": {}}
    total_objective = objective.copy()
    if constraint == "lagrange":
        size_part = dimod.BinaryQuadraticModel("BINARY")
        for layer in layers:
            name, f, F = layer.name, layer.per_filter, layer.filters
            c = gamma * f / fp32
            size_part.offset += c * F * hi
            for k in range(K):
                size_part.add_linear(("q", name, k), -c * F * 2**k)
            for i in free.get(name, ()):
                size_part.add_linear(("p", name, i), -c * hi)
                for k in range(K):
                    size_part.add_quadratic(("p", name, i), ("q", name, k), c * 2**k)
            lower += c * F * min(0, hi - (2**K - 1))
        total_objective.update(size_part)
        unit = 1
    else:
        budget_bits = budget * fp32
        unit = size_unit or max(1, 2 ** math.ceil(math.log2(max(budget_bits / 2**14, 1))))
        terms: dict[Label, float] = {}
        constant = 0.0
        for layer in layers:
            name, f, F = layer.name, layer.per_filter, layer.filters
            constant += f * F * hi
            for k in range(K):
                terms[("q", name, k)] = -f * F * 2**k
            if name not in free or not free[name]:
                continue
            weights = capped_weights(len(free[name]))
            info["count_weights"][name] = weights
            link = [(("p", name, i), 1) for i in free[name]]
            link += [(("c", name, j), -w) for j, w in enumerate(weights)]
            penalties.add_linear_equality_constraint(link, 1.0, 0)
            for j, w in enumerate(weights):
                terms[("c", name, j)] = -f * hi * w
                for k in range(K):
                    z = ("z", name, j, k)
                    _add_rosenberg(penalties, ("c", name, j), ("q", name, k), z, 1.0)
                    terms[z] = f * w * 2**k
        units = {v: math.ceil(a / unit) for v, a in terms.items()}
        const_units = math.ceil(constant / unit)
        budget_units = math.floor(budget_bits / unit)
        slack = capped_weights(max(budget_units, 0))
        info.update(size_terms=units, size_constant=const_units, budget_units=budget_units,
                    slack_weights=slack)
        eq = list(units.items()) + [(("s", j), w) for j, w in enumerate(slack)]
        penalties.add_linear_equality_constraint(eq, 1.0, const_units - budget_units)

    problem = QuboProblem(
        bqm=total_objective,  # completed below, once A is known
        objective=objective,
        penalties=penalties,
        penalty=0.0,
        filters=filters,
        bits=bit_vars,
        costs=costs,
        budget=budget,
        constraint=constraint,
        gamma=None if constraint == "penalty" else float(gamma),
        size_unit=int(unit),
        free=free,
        kept=kept,
        info=info,
    )
    problem.bqm = total_objective.copy()
    problem.bqm.update(penalties)  # every variable present, so encode() can list them
    start = feasible_start(problem)
    upper = float(total_objective.energy(problem.encode(start)))
    A = penalty if penalty is not None else (upper - lower) * 1.001 + 1e-9 * max(
        1.0, abs(upper), abs(lower)
    )
    problem.penalty = float(A)
    problem.bqm = total_objective.copy()
    problem.bqm.update(A * penalties)
    info.update(start=start, upper=upper, lower=lower, variables=problem.bqm.num_variables,
                interactions=problem.bqm.num_interactions)
    return problem


def feasible_start(problem: QuboProblem) -> Decision:
    """A plan that meets the budget: the widest uniform width that fits, else the narrowest with
    every free filter pruned (in ``"penalty"`` mode, it also meets the rounded budget).

    Returns:
        The plan.

    Raises:
        ValueError: If even the narrowest width with every free filter pruned does not fit.
    """
    lo, hi = problem.costs.bits
    names = [layer.name for layer in problem.costs.layers]

    def fits(d: Decision) -> bool:
        if not problem.feasible(d):
            return False
        if problem.constraint == "penalty":
            return problem.rounded_size(problem.encode(d)) <= int(problem.info["budget_units"])
        return True

    none = {n: () for n in problem.free}
    for b in range(hi, lo - 1, -1):
        d = Decision(dict.fromkeys(names, b), none)
        if fits(d):
            return d
    d = Decision(dict.fromkeys(names, lo), dict(problem.free))
    if fits(d):
        return d
    smallest = problem.size_ratio(d)
    raise ValueError(
        f"budget {problem.budget:g} is below the smallest size this problem reaches "
        f"({smallest:.4g} of fp32: {lo} bits everywhere and every free filter pruned); raise "
        "the budget, or lower bits or min_keep"
    )
