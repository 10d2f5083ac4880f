"""Masks and prune() end to end on tiny models, with a test-local dense curvature."""

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from fake_curvature import fake_build_inverse
from woodfisher.params import flat_masks, flat_weights, select_modules, weight_param
from woodfisher.pruning import METHODS, api, apply_masks, bake, prune


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch):
    monkeypatch.setattr(api, "build_inverse", fake_build_inverse)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def batches(n=4, bs=16, seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(bs, d, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (bs,), generator=g),
        )
        for _ in range(n)
    ]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def loss_on(model, data):
    return api.evaluate_loss(model, data)


# The fake engine stands in for build_inverse, which only the resample path calls.
OPTS = {"num_grads": 32, "block_size": 16, "recompute_by": "resample"}


def test_prune_twice_exact_and_pruned_never_return():
    net, data = mlp(), batches()
    r1 = prune(net, data, 0.5, **OPTS)
    modules = select_modules(net)
    first = ~flat_masks(modules)
    assert r1.sparsity == 0.5 and int(first.sum()) == round(0.5 * 72)
    r2 = prune(net, data, 0.75, **OPTS)
    second = ~flat_masks(modules)
    assert r2.sparsity == 0.75 and int(second.sum()) == 54
    assert (second | ~first).all()  # everything pruned first is still pruned
    assert torch.equal(flat_weights(modules)[second], torch.zeros(54, dtype=torch.float64))
    for m in modules.values():
        assert torch.equal(
            weight_param(m)[m.weight_mask == 0], torch.zeros_like(m.weight[m.weight_mask == 0])
        )


def test_weight_orig_updates_persist_after_forward():
    net = mlp()
    modules = select_modules(net)
    masks = {n: torch.rand(m.weight.shape) > 0.5 for n, m in modules.items()}
    new = {n: torch.randn(m.weight.shape, dtype=torch.float64) for n, m in modules.items()}
    apply_masks(net, modules, masks, new)
    net(torch.randn(2, 6, dtype=torch.float64))
    for n, m in modules.items():
        assert torch.equal(m.weight_orig, new[n] * masks[n])
        assert torch.equal(m.weight, new[n] * masks[n])


def test_apply_masks_rolls_back(monkeypatch):
    net = mlp()
    modules = select_modules(net)
    before = snapshot(net)
    masks = {n: torch.ones(m.weight.shape, dtype=torch.bool) for n, m in modules.items()}
    with pytest.raises(ValueError, match="shape"):
        apply_masks(net, modules, {**masks, "2": torch.ones(2, 2)})
    assert unchanged(net, before)
    calls = []
    real = tprune.custom_from_mask

    def flaky(module, name, mask):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(module, name, mask)

    monkeypatch.setattr(tprune, "custom_from_mask", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        apply_masks(net, modules, masks)
    assert unchanged(net, before)
    assert not any(hasattr(m, "weight_orig") for m in net.modules())
    assert all(len(m._forward_pre_hooks) == 0 for m in net.modules())


def test_bake_gives_plain_module_with_same_outputs():
    net, data = mlp(), batches()
    prune(net, data, 0.6, update="joint", **OPTS)
    x = torch.randn(5, 6, dtype=torch.float64)
    y = net(x)
    bake(net)
    assert not any(hasattr(m, "weight_orig") or hasattr(m, "weight_mask") for m in net.modules())
    assert isinstance(net[0].weight, nn.Parameter)
    assert torch.equal(net(x), y)
    assert set(net.state_dict()) == set(mlp().state_dict())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("update", [None, "none", "independent", "joint"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_every_method_reaches_exact_sparsity(method, update, scope):
    if method == "magnitude" and update in ("independent", "joint"):
        pytest.skip("magnitude allows no OBS update")
    net, data = mlp(), batches()
    res = prune(net, data, 0.4, method, update=update, scope=scope, **OPTS)
    modules = select_modules(net)
    assert int((~flat_masks(modules)).sum()) == round(0.4 * 72)
    if scope == "layerwise":
        assert [lr.sparsity for lr in res.layers] == [round(0.4 * 48) / 48, round(0.4 * 24) / 24]
    json.dumps(res.to_dict())
    assert res.method == method and res.seed == 0
    assert set(res.times) >= {"gradients", "inverse", "selection", "update"}
    assert torch.isfinite(net(data[0][0])).all()


def test_layer_sparsity_override_and_recompute():
    net, data = mlp(), batches()
    res = prune(net, data, 0.5, layer_sparsity={"2": 0.25}, recompute=3, **OPTS)
    assert [lr.sparsity for lr in res.layers] == [0.5, 0.25]
    assert len(res.steps) == 3 and res.steps == sorted(res.steps)
    assert res.options["recompute"] == 3


def test_kfac_joint_falls_back_to_independent():
    net, data = mlp(), batches()
    res = prune(net, data, 0.5, "kfac", update="joint", **OPTS)
    assert res.update == "independent" and res.sparsity == 0.5


def test_damp_auto_picks_from_grid():
    net, data = mlp(), batches(n=6)
    res = prune(net, data, 0.5, damp="auto", **OPTS)
    assert res.damp_search is not None and len(res.damp_search) == 5
    assert res.relative_damp == float(min(res.damp_search, key=res.damp_search.get))
    json.dumps(res.to_dict())


def test_relative_damp_scales_the_default_and_matches_its_absolute_damp():
    data = batches()
    default, relative, absolute = mlp(), mlp(), mlp()
    r0 = prune(default, data, 0.5, recompute=1, **OPTS)
    r1 = prune(relative, data, 0.5, recompute=1, relative_damp=30.0, **OPTS)
    assert r0.relative_damp == 1e-2 and r1.relative_damp == 30.0
    assert r1.damp == pytest.approx(r0.damp * 30.0 / 1e-2, rel=1e-12)
    assert r1.options["relative_damp"] == 30.0 and r0.options["relative_damp"] is None
    r2 = prune(absolute, data, 0.5, recompute=1, damp=r1.damp, **OPTS)
    assert r2.relative_damp is None
    assert unchanged(absolute, snapshot(relative))
    # A large damp moves the choice towards magnitude pruning: a different mask here.
    assert not torch.equal(flat_masks(select_modules(default)),
                           flat_masks(select_modules(relative)))


def test_training_flag_restored():
    net, data = mlp(), batches()
    net.train()
    prune(net, data, 0.3, **OPTS)
    assert all(m.training for m in net.modules())


BAD = [
    ({"sparsity": 1.0}, "1.0"),
    ({"sparsity": -0.1}, "-0.1"),
    ({"method": "random"}, "unknown method 'random'"),
    ({"scope": "row"}, "unknown scope"),
    ({"update": "both"}, "unknown update"),
    ({"method": "magnitude", "update": "joint"}, "no curvature"),
    ({"layers": ["conv*"]}, "matches no"),
    ({"layer_sparsity": {"nope": 0.5}}, "unknown layer"),
    ({"recompute": 0}, "recompute"),
    ({"damp": -1.0}, "damp"),
    ({"relative_damp": 0.0}, "relative_damp must be"),
    ({"relative_damp": float("nan")}, "relative_damp must be"),
    ({"relative_damp": True}, "relative_damp must be"),
    ({"damp": 0.1, "relative_damp": 1.0}, "not both"),
    ({"damp": "auto", "relative_damp": 1.0}, "not both"),
    ({"method": "kfac", "relative_damp": 1.0}, "K-FAC"),
    ({"data": batches(d=5)}, r"inputs float64\(16, 5\)"),
    (
        {
            "data": [
                (
                    torch.full((4, 6), float("nan"), dtype=torch.float64),
                    torch.zeros(4, dtype=torch.long),
                )
            ]
        },
        "not finite",
    ),
    ({"data": []}, "empty"),
    ({"data": iter(batches())}, "re-iterable"),
]


@pytest.mark.parametrize(("change", "match"), BAD)
def test_bad_input_leaves_model_untouched(change, match):
    net = mlp()
    prune(net, batches(), 0.3, **OPTS)  # already pruned: hooks must survive the failure too
    before = snapshot(net)
    kwargs = {"data": batches(), "sparsity": 0.6, **OPTS, **change}
    with pytest.raises(ValueError, match=match):
        prune(net, **kwargs)
    assert unchanged(net, before)


def test_sparsity_below_current_and_no_prunable():
    net = mlp()
    prune(net, batches(), 0.5, **OPTS)
    before = snapshot(net)
    with pytest.raises(ValueError, match="below the current"):
        prune(net, batches(), 0.2, **OPTS)
    assert unchanged(net, before)
    with pytest.raises(ValueError, match="no prunable"):
        prune(nn.Sequential(nn.ReLU()), batches(), 0.5)


def test_failure_in_a_later_step_rolls_back(monkeypatch):
    net, data = mlp(), batches()
    before = snapshot(net)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("engine died")
        return fake_build_inverse(*args)

    monkeypatch.setattr(api, "build_inverse", failing)
    with pytest.raises(RuntimeError):
        prune(net, data, 0.5, recompute=2, **OPTS)
    assert unchanged(net, before)
    assert not any(hasattr(m, "weight_orig") for m in net.modules())


def test_obs_beats_magnitude_on_least_squares():
    # Correlated features on different scales; at the least-squares optimum with homoscedastic
    # noise the empirical Fisher is proportional to the Hessian, so OBS is exact up to scale.
    mse = nn.functional.mse_loss
    g = torch.Generator().manual_seed(0)
    n, d = 512, 8
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ (mix * torch.logspace(-1, 1, d))
    y = X @ torch.randn(d, 1, generator=g, dtype=torch.float64)
    y = y + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1), y).solution
    base = nn.Linear(d, 1).double()
    with torch.no_grad():
        base.weight.copy_(sol[:d].T)
        base.bias.copy_(sol[d])
    data = [(X[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]
    start = api.evaluate_loss(base, data, mse)
    increase = {}
    for method, update in (("magnitude", None), ("woodfisher", None), ("woodfisher", "joint")):
        net = nn.Linear(d, 1).double()
        net.load_state_dict(base.state_dict())
        res = prune(
            net, data, 0.5, method, mse, update=update, num_grads=n, block_size=None, damp=1e-6
        )
        assert res.sparsity == 0.5
        increase[method, update] = api.evaluate_loss(net, data, mse) - start
    assert increase["woodfisher", None] < 0.5 * increase["magnitude", None], increase
    assert increase["woodfisher", "joint"] < 0.1 * increase["magnitude", None], increase
