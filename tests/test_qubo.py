"""The QUBO formulation against brute force and a dense Fisher; the solvers; bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

dimod = pytest.importorskip("dimod")
pytest.importorskip("dwave.samplers")

from woodfisher.gradients import sample_gradients  # noqa: E402
from woodfisher.quant import quant_scale  # noqa: E402
from woodfisher.qubo import (  # noqa: E402
    Decision,
    Effort,
    EnergyBatch,
    build_qubo,
    fill,
    formulate,
    genetic,
    qubo_costs,
    reinforce,
    repair,
    solve,
)
from woodfisher.qubo.formulation import capped_weights, encode_int, multilinear  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    data = [(torch.randn(32, 2, dtype=torch.float64), torch.randint(0, 2, (32,)))]
    return net, data


def _decisions(problem):
    lo, hi = problem.costs.bits
    names = [layer.name for layer in problem.costs.layers]
    free = problem.free
    for widths in itertools.product(range(lo, hi + 1), repeat=len(names)):
        for choice in itertools.product(*[[(n, s) for s in _subsets(free[n])] for n in free]):
            yield Decision(dict(zip(names, widths, strict=True)), dict(choice))


def _subsets(items):
    return [c for k in range(len(items) + 1) for c in itertools.combinations(items, k)]


def _direct_objective(problem, d):
    """Σ_{i,j pruned} J_ij + Σ quant, from the costs (not from the BQM)."""
    lo, _ = problem.costs.bits
    slices = problem.costs.filter_slices()
    idx = [slices[n].start + i for n, p in d.pruned.items() for i in p]
    J = problem.costs.prune
    value = sum(float(J[i, j]) for i in idx for j in idx)
    return value + sum(float(problem.costs.quant[n][b - lo]) for n, b in d.bits.items())


def _argmin(pairs, tol=1e-9):
    best = min(v for v, _ in pairs)
    return {k for v, k in pairs if v <= best + tol * max(1.0, abs(best))}


CASES = [
    dict(objective="fisher", bits=(2, 3), budget=0.08, constraint="penalty"),
    dict(objective="magnitude", bits=(2, 3), budget=0.08, constraint="penalty"),
    dict(objective="fisher", bits=(1, 5), budget=0.07, constraint="lagrange", gamma=0.05),
    dict(objective="magnitude", bits=(2, 4), budget=0.1, constraint="lagrange", gamma=0.2),
    dict(objective="fisher", bits=(3, 5), budget=0.09, constraint="penalty", size_unit=4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_qubo_optima_are_the_feasible_optima(tiny, case):
    net, data = tiny
    case = dict(case)
    costs = qubo_costs(net, data, case.pop("objective"), bits=case.pop("bits"), num_grads=32)
    problem = formulate(costs, case.pop("budget"), min_keep=0.0,
                        size_unit=case.pop("size_unit", 1), **case)
    assert problem.bqm.num_variables <= 17
    ss = dimod.ExactSolver().sample(problem.bqm)
    low = ss.lowest(rtol=0, atol=1e-9 * max(1.0, abs(float(ss.first.energy))))
    qubo = {str(problem.decode(s)) for s in low.samples()}
    if problem.constraint == "penalty":
        budget_units = problem.info["budget_units"]
        truth = [(_direct_objective(problem, d), str(d)) for d in _decisions(problem)
                 if problem.rounded_size(problem.encode(d)) <= budget_units]
    else:
        truth = [(_direct_objective(problem, d)
                  + problem.gamma * problem.size_ratio(d), str(d)) for d in _decisions(problem)]
    assert qubo == _argmin(truth)
    # with exact units the rounded budget is the true one
    if problem.constraint == "penalty" and problem.size_unit == 1:
        assert {str(d) for d in _decisions(problem) if problem.feasible(d)} == {
            str(d) for d in _decisions(problem)
            if problem.rounded_size(problem.encode(d)) <= problem.info["budget_units"]
        }


def test_a_penalty_below_the_rule_lets_an_infeasible_plan_win(tiny):
    net, data = tiny
    costs = qubo_costs(net, data, "fisher", bits=(2, 3), num_grads=32)
    ruled = formulate(costs, 0.08, min_keep=0.0, size_unit=1)
    weak = formulate(costs, 0.08, min_keep=0.0, size_unit=1, penalty=ruled.penalty * 1e-4)
    best = dimod.ExactSolver().sample(weak.bqm).first.sample
    assert not weak.feasible(weak.decode(best))
    assert ruled.feasible(ruled.decode(dimod.ExactSolver().sample(ruled.bqm).first.sample))


def test_rounded_units_never_admit_an_oversized_plan(tiny):
    net, data = tiny
    costs = qubo_costs(net, data, "magnitude", bits=(2, 5))
    problem = formulate(costs, 0.15, min_keep=0.0, size_unit=4)
    for d in _decisions(problem):
        if problem.rounded_size(problem.encode(d)) <= problem.info["budget_units"]:
            assert problem.feasible(d)


@pytest.mark.parametrize("objective", ["fisher", "magnitude"])
@pytest.mark.parametrize("bits", [(1, 8), (2, 8), (4, 4), (3, 6)])
def test_objective_and_zero_penalty_on_every_plan(tiny, objective, bits):
    net, data = tiny
    costs = qubo_costs(net, data, objective, bits=bits, num_grads=32)
    problem = formulate(costs, 0.2, min_keep=0.0)
    for d in list(_decisions(problem))[::7]:
        sample = problem.encode(d)
        assert problem.decode(sample) == d
        direct = _direct_objective(problem, d)
        assert problem.objective.energy(sample) == pytest.approx(direct, rel=1e-9, abs=1e-12)
        assert problem.objective_value(d) == pytest.approx(direct, rel=1e-9, abs=1e-12)
        pen = problem.penalties.energy(sample)
        if problem.rounded_size(sample) <= problem.info["budget_units"]:
            assert pen == pytest.approx(0, abs=1e-9)
        else:
            assert pen >= 1 - 1e-9


def test_fisher_costs_are_the_dense_second_order_model(tiny):
    net, data = tiny
    costs = qubo_costs(net, data, "fisher", bits=(2, 8), num_grads=32, relative_damp=0.1)
    G = sample_gradients(net, data, num_grads=32)
    damp = costs.options["damp"]
    F = damp * torch.eye(G.shape[1], dtype=torch.float64) + G.T @ G / 32
    w0, w2 = net[0].weight.detach(), net[2].weight.detach()
    deltas = []
    for i in range(3):  # pruning filter i of layer '0': δ = −w_i there, 0 elsewhere
        delta = torch.zeros(G.shape[1], dtype=torch.float64)
        delta[i * 2 : i * 2 + 2] = -w0[i]
        deltas.append(delta)
    D = torch.stack(deltas, 1)
    assert torch.allclose(costs.prune, 0.5 * D.T @ F @ D, rtol=1e-10)
    fd = F.diagonal()[6:].reshape(2, 3)
    for b in (2, 5, 8):
        step = quant_scale(w2, b)
        want = 0.5 * float((fd.sum(1) * step.square()).sum()) / 12
        assert float(costs.quant["2"][b - 2]) == pytest.approx(want, rel=1e-10)


def test_magnitude_costs_are_the_papers_squared_layer_sums():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.Flatten(),
                        nn.Linear(2, 2))
    costs = qubo_costs(net, None, "magnitude", bits=(2, 8), beta=0.5)
    a = torch.cat([net[0].weight.abs().mean((1, 2, 3)), net[2].weight.abs().mean((1, 2, 3))])
    a = a.detach()
    want = torch.block_diag(torch.outer(a[:3], a[:3]), torch.outer(a[3:], a[3:])).double()
    assert torch.allclose(costs.prune, want)
    assert float(costs.quant["0"][0]) == pytest.approx(0.5 * float(a[:3].sum()) ** 2)
    assert float(costs.quant["0"][-1]) == 0


def test_encodings():
    assert capped_weights(0) == [] and capped_weights(7) == [1, 2, 4]
    for top in range(0, 40):
        w = capped_weights(top)
        assert sum(w) == top
        for v in range(top + 1):
            assert sum(d * x for d, x in zip(encode_int(v, w), w, strict=True)) == v
    values = [3.0, -1.0, 4.0, 1.5, 9.0, 2.0, 6.0, 5.0]
    poly = multilinear(values, 3)
    for r in range(8):
        q = [(r >> k) & 1 for k in range(3)]
        got = sum(c * all(q[j] for j in s) for s, c in poly.items())
        assert got == pytest.approx(values[r])


def _random_bqm(n, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, generator=g).tolist()
    J = torch.randn(n, n, generator=g).tolist()
    return dimod.BinaryQuadraticModel(
        dict(enumerate(h)), {(i, j): J[i][j] for i in range(n) for j in range(i + 1, n)},
        0.5, "BINARY",
    )


def test_energy_batch_matches_dimod():
    bqm = _random_bqm(9, 0)
    X = torch.randint(0, 2, (20, 9), generator=torch.Generator().manual_seed(1)).numpy()
    want = bqm.energies((X, list(bqm.variables)))
    assert EnergyBatch(bqm)(X) == pytest.approx(want)


@pytest.mark.parametrize("name", ["sa", "tabu", "ga"])
def test_solvers_find_the_exact_optimum_of_a_small_qubo(name):
    bqm = _random_bqm(12, 3)
    optimum = solve(bqm, "exact").energy
    run = solve(bqm, name, seed=0, effort=Effort(reads=32, sweeps=300, tabu_ms=10))
    assert run.energy == pytest.approx(optimum)
    assert solve(bqm, name, seed=0, effort=Effort(reads=32, sweeps=300, tabu_ms=10)).solver == name


def test_ga_and_rl_respect_the_budget_and_are_seeded():
    bqm = _random_bqm(10, 4)
    a = genetic(bqm, evaluations=500, population=20, seed=1)
    b = genetic(bqm, evaluations=500, population=20, seed=1)
    assert a.info["evaluations"] <= 500 and a.first.energy == b.first.energy
    # a separable problem: REINFORCE must learn every sign
    sep = dimod.BinaryQuadraticModel({i: (-1) ** i for i in range(10)}, {}, 0, "BINARY")
    r = reinforce(sep, evaluations=3000, batch=30, seed=0)
    assert r.info["evaluations"] <= 3000
    assert r.first.energy == -5


def test_repair_and_fill_end_within_budget(tiny):
    net, data = tiny
    costs = qubo_costs(net, data, "fisher", bits=(2, 8), num_grads=32)
    problem = formulate(costs, 0.1, min_keep=0.0)
    too_big = Decision({"0": 8, "2": 8}, {"0": ()})
    fixed = repair(problem, too_big)
    assert problem.feasible(fixed)
    filled = fill(problem, Decision({"0": 2, "2": 2}, {"0": (0, 1, 2)}))
    assert problem.feasible(filled)
    assert problem.objective_value(filled) <= problem.objective_value(
        Decision({"0": 2, "2": 2}, {"0": (0, 1, 2)})
    )


@pytest.mark.parametrize("budget", [0, 1, -0.1, 1.5, float("nan"), True])
def test_bad_budget(tiny, budget):
    net, data = tiny
    with pytest.raises(ValueError, match="budget must be"):
        build_qubo(net, None, budget, objective="magnitude")


@pytest.mark.parametrize("bits", [(0, 8), (2, 17), (8, 2), (1, 16)])
def test_bad_bits(tiny, bits):
    net, _ = tiny
    with pytest.raises(ValueError, match="bits"):
        build_qubo(net, None, 0.1, objective="magnitude", bits=bits)


def test_exact_refuses_a_large_problem_and_foreign_samplers_are_refused():
    with pytest.raises(ValueError, match="at most 22 variables; this problem has 23"):
        solve(_random_bqm(23, 0), "exact")
    with pytest.raises(ValueError, match="dimod.Sampler"):
        solve(_random_bqm(3, 0), object())
    with pytest.raises(ValueError, match="unknown solver"):
        solve(_random_bqm(3, 0), "quantum")
    run = solve(_random_bqm(3, 0), dimod.ExactSolver())
    assert run.solver == "ExactSolver"


def test_budget_below_the_smallest_reachable_size(tiny):
    net, _ = tiny
    with pytest.raises(ValueError, match="below the smallest size"):
        build_qubo(net, None, 0.01, objective="magnitude", bits=(4, 8))


def test_redamped_costs_equal_a_fresh_build(tiny):
    net, data = tiny
    fresh = qubo_costs(net, data, "fisher", num_grads=32, relative_damp=0.3)
    redamped = qubo_costs(net, data, "fisher", num_grads=32, relative_damp=5.0)
    redamped = redamped.with_relative_damp(0.3)
    assert torch.allclose(fresh.prune, redamped.prune)
    assert all(torch.allclose(fresh.quant[n], redamped.quant[n]) for n in fresh.quant)
    with pytest.raises(ValueError, match="only fisher"):
        qubo_costs(net, None, "magnitude").with_relative_damp(1.0)
