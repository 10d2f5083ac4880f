"""Budgets, rank rules and the RENE search: against brute force, count_flops and fmul."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from woodfisher.curvature import fisher_inverse
from woodfisher.data import synthetic
from woodfisher.flops import count_flops
from woodfisher.lowrank import RANK_RULES, decompose
from woodfisher.lowrank.budget import knapsack, plan_layers
from woodfisher.lowrank.rene import _refine, rank_loss, search
from woodfisher.lowrank.rules import layer_quadratic, truncation_deltas
from woodfisher.models import build_model
from woodfisher.train import train


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 3),
    )


@pytest.fixture(scope="module")
def trained():
    ds = synthetic(n=240, input_shape=(2, 8, 8), num_classes=3, seed=0)
    net = _net()
    train(net, ds, epochs=3, lr=0.05, batch_size=40, progress=False)
    x, y = ds.tensors
    return net, [(x[i:i + 60], y[i:i + 60]) for i in range(0, 240, 60)]


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    options = [[(int(c), float(v), j) for j, (c, v) in enumerate(zip(
        torch.randint(1, 30, (4,), generator=g), torch.rand(4, generator=g), strict=True))]
        for _ in range(4)]
    budget = 60
    best = min((sum(o[i][1] for o, i in zip(options, pick, strict=True)), pick)
               for pick in itertools.product(range(4), repeat=4)
               if sum(o[i][0] for o, i in zip(options, pick, strict=True)) <= budget)
    picks = knapsack(options, budget, resolution=budget)
    fine = knapsack(options, budget)  # the default resolution: fractional units
    assert sum(o[i][1] for o, i in zip(options, fine, strict=True)) == pytest.approx(best[0])
    assert sum(o[i][0] for o, i in zip(options, picks, strict=True)) <= budget
    assert sum(o[i][1] for o, i in zip(options, picks, strict=True)) == pytest.approx(best[0])


def test_macs_of_the_plan_match_count_flops_of_the_built_model(trained):
    net, data = trained
    example = torch.zeros(1, 2, 8, 8)
    for method in ("svd", "tucker2", "cp"):
        small = decompose(net, params=0.4, method=method, ranks="uniform", min_weights=0,
                          data=data, keep_classifier=False)
        counted = count_flops(small, example).by_name()
        for row in small.lowrank["layers"]:
            stages = [v.macs for k, v in counted.items() if k.startswith(row["name"] + ".")]
            assert sum(stages) == row["macs"], (method, row)
            built = sum(m.weight.numel() for m in small.get_submodule(row["name"]))
            assert built == row["params"]


@pytest.mark.parametrize("rule", sorted(RANK_RULES))
@pytest.mark.parametrize("kind", ["params", "flops"])
def test_every_rule_meets_the_budget(trained, rule, kind):
    net, data = trained
    small = decompose(net, **{kind: 0.35}, method="tucker2", ranks=rule, data=data,
                      min_weights=0, rene={"iters": 4, "warmup": 2}, num_grads=64)
    rep = small.lowrank
    assert rep["budget"]["achieved"] <= 0.35 and rep["budget"]["achieved"] > 0.2
    assert rep["params_fraction" if kind == "params" else "flops_fraction"] <= 0.35


def test_fisher_rule_predicts_with_the_engine_fisher(trained):
    net, data = trained
    plans, _ = plan_layers(net, "tucker2", torch.zeros(1, 2, 8, 8), min_weights=0,
                           keep_classifier=False)
    modules = {p.name: p.module for p in plans}
    for method in ("diagonal", "woodfisher"):
        op = fisher_inverse(net, data, method, params=modules, num_grads=64, block_size=50)
        plan = plans[1]
        deltas = truncation_deltas(plan, [1, 4, 9])
        got = layer_quadratic(op, plan.name, deltas)
        i = op.layout.names.index(plan.name)
        full = torch.zeros(op.layout.d, 3, dtype=torch.float64)
        full[op.layout.offsets[i]:op.layout.offsets[i] + op.layout.sizes[i]] = \
            deltas.reshape(3, -1).T
        oracle = torch.stack([0.5 * full[:, j] @ op.fmul(full[:, j].clone()).double()
                              for j in range(3)])
        assert torch.allclose(got, oracle, rtol=1e-6)
        assert got[0] > got[1] > got[2] > 0  # more components, smaller predicted increase


def test_fisher_beats_uniform_on_predicted_loss_and_keeps_the_input(trained):
    net, data = trained
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = decompose(net, params=0.3, ranks="fisher", data=data, min_weights=0, num_grads=64)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert small is not net and small.lowrank["rule"]["predicted_loss_increase"]


def test_rene_search_picks_from_its_grids(trained):
    net, data = trained
    plans, _ = plan_layers(net, "svd", torch.zeros(1, 2, 8, 8), min_weights=0)
    ranks, info = search(net, plans, data, {"iters": 3, "warmup": 1, "steps": 4})
    for p in plans:
        assert ranks[p.name] in info["rounds"][-1]["grids"][p.name]
        assert 1 <= ranks[p.name] <= p.useful
    assert _refine(200, 100, 10, 800) == (list(range(150, 251, 10)), 10)
    assert _refine(7, 2, 10, 16) == ([7], 0)
    assert float(rank_loss([torch.tensor([1.0, 0.0])], [[4, 8]], 0.4, 0.8)) == \
        pytest.approx(0.4 * 0.5 ** 0.8)


def test_bad_budgets_and_ranks_are_clear_errors(trained):
    net, data = trained
    with pytest.raises(ValueError, match=r"cannot be met.*choose params >="):
        decompose(net, params=0.001, min_weights=0, data=data)
    with pytest.raises(ValueError, match="exactly one budget"):
        decompose(net, params=0.3, flops=0.3)
    with pytest.raises(ValueError, match="unknown rank rule"):
        decompose(net, params=0.3, ranks="magic")
    with pytest.raises(ValueError, match=r"rank of layer 0 must be an integer in 1\.\.12"):
        decompose(net, ranks={"0": 40}, min_weights=0, data=data)
    with pytest.raises(ValueError, match="needs data"):
        decompose(build_model("mlpnet", (1, 8, 8)), params=0.3, ranks="rene")
    with pytest.raises(ValueError, match="input shape"):
        decompose(net, params=0.3)
    small = decompose(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                                    nn.Linear(4 * 36, 8)), params=0.5,
                      data=[(torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long))],
                      min_weights=0, keep_classifier=False)
    assert small.lowrank["skipped"][0]["reason"].startswith("grouped convolution")
    default = decompose(net, params=0.5, min_weights=0, data=data)
    assert default.lowrank["skipped"][-1]["name"] == "7"
    assert default.lowrank["skipped"][-1]["reason"].startswith("classifier")
    one = decompose(net, params=0.5, layers=["0"], min_weights=0, data=data)
    assert [r["name"] for r in one.lowrank["layers"]] == ["0"]
