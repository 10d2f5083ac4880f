"""WoodTaylor: the paper's step as a baseline, and the safe step's guarantees."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fake_curvature import fake_build_inverse, loop_gradients
from woodfisher.fisher import DenseInverse
from woodfisher.params import flat_masks, flat_weights, select_modules
from woodfisher.pruning import api, obs, prune
from woodfisher.pruning import woodtaylor as wt
from woodfisher.pruning.api import evaluate_loss

OPTS = {"num_grads": 32, "block_size": 16, "recompute": 1}
REAL_BUILD = api.build_inverse


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch):
    monkeypatch.setattr(api, "build_inverse", fake_build_inverse)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def batches(n=6, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_scale_zero_is_woodfisher_exactly():
    data = batches()
    a, b = mlp(), mlp()
    # WoodTaylor resamples (it needs ḡ at each step's weights): compare on that path.
    prune(a, data, 0.5, "woodfisher", recompute_by="resample", **OPTS)
    res = prune(b, data, 0.5, "woodtaylor", taylor={"scale": 0.0}, **OPTS)
    sa, sb = state(a), state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert res.taylor["scales"] == [0.0] and res.taylor["search"] is None


@pytest.mark.parametrize("update", ["joint", "independent"])
def test_quadratic_model_never_worse_than_woodfisher(update):
    # Oracle: the quadratic model q(δ) = ḡᵀδ + ½δᵀFδ evaluated directly with a dense F.
    gen = torch.Generator().manual_seed(1)
    d = 12
    A = torch.randn(d, 20, generator=gen, dtype=torch.float64)
    F = A @ A.T / 20 + 0.1 * torch.eye(d, dtype=torch.float64)
    inv = DenseInverse(F, [(0, 6), (6, 12)])
    Fb = inv.F
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    remove = torch.zeros(d, dtype=torch.bool)
    remove[[1, 4, 7]] = True
    present = torch.ones(d, dtype=torch.bool)
    present[10] = False
    w[10] = 0
    base, n = wt.split_update(update, w, remove, present, inv, g, inv.diag())

    def q(delta):
        return float(g @ delta + 0.5 * delta @ Fb @ delta)

    q_wf = q(base)
    curvature = float(n @ Fb @ n)
    for alpha in (0.0, 0.1, 0.5, 1.0, 1.5, 2.0):
        value = q(base + alpha * n)
        if update == "joint":  # the exact identity holds for the exact constrained step
            assert value == pytest.approx(q_wf - (alpha - alpha**2 / 2) * curvature, abs=1e-9)
            assert value <= q_wf + 1e-12
    # δ(α) is the minimiser with the linear term αḡ: the paper's step at α = 1.
    paper = obs.joint_update(w, remove, inv, g, ~present) if update == "joint" else \
        obs.independent_update(w, remove, inv, g, inv.diag())
    torch.testing.assert_close(base + n, paper)
    # The pinned entries stay pinned whatever α.
    if update == "joint":
        assert torch.all((base + 0.7 * n)[remove | ~present] == -w[remove | ~present])


def test_auto_scale_is_no_worse_than_woodfisher_on_the_held_out_loss():
    data, val = batches(), batches(n=3, seed=5)
    wf_net, wt_net = mlp(), mlp()
    prune(wf_net, data, 0.6, "woodfisher", val_data=val, **OPTS)
    res = prune(wt_net, data, 0.6, "woodtaylor", val_data=val, **OPTS)
    assert evaluate_loss(wt_net, val) <= evaluate_loss(wf_net, val) + 1e-12
    search = res.taylor["search"][0]
    grid = {repr(float(a)) for a in wt.TAYLOR_DEFAULTS["grid"]}
    assert grid <= set(search) and len(search) <= len(grid) + 4  # the grid, then refinement
    assert search["0.0"] == pytest.approx(evaluate_loss(wf_net, val), rel=1e-12)
    assert res.taylor["scales"][0] == float(min(search, key=search.get))
    assert res.options["taylor"]["scale"] == "auto"
    # Same mask as WoodFisher (the saliency ignores ḡ by default).
    assert torch.equal(flat_masks(select_modules(wf_net)), flat_masks(select_modules(wt_net)))


def test_default_held_out_samples_come_after_the_gradients(monkeypatch):
    seen = []
    real = wt.ScaleSearch.choose

    def spy(self, *args, **kwargs):
        seen.append(sum(x.shape[0] for x, _ in self.val))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(wt.ScaleSearch, "choose", spy)
    prune(mlp(), batches(n=6), 0.5, "woodtaylor", **OPTS)  # 96 samples, 32 for the Fisher
    assert seen == [64]
    with pytest.raises(ValueError, match="held-out samples"):
        prune(mlp(), batches(n=2), 0.5, "woodtaylor", **OPTS)
    with pytest.raises(ValueError, match="held-out samples"):  # ḡ takes them all
        prune(mlp(), batches(n=6), 0.5, "woodtaylor", taylor={"grad_samples": 96}, **OPTS)


def test_grad_samples_uses_the_mean_gradient_of_more_samples(monkeypatch):
    grads = []
    real = wt.split_update

    def spy(update, w, remove, present, inv, grad, inv_diag):
        grads.append(grad.clone())
        return real(update, w, remove, present, inv, grad, inv_diag)

    monkeypatch.setattr(wt, "split_update", spy)
    data = batches(n=6)
    net = mlp()
    twin = copy.deepcopy(net)
    oracle = loop_gradients(twin, data, select_modules(twin), 64).mean(0)
    prune(net, data, 0.5, "woodtaylor", taylor={"grad_samples": 64, "scale": 0.5}, **OPTS)
    torch.testing.assert_close(grads[0], oracle)


def test_paper_method_is_the_full_constrained_step_with_the_taylor_saliency():
    data = batches()
    net = mlp()
    modules = select_modules(net)
    curv = fake_build_inverse(api.get_method("woodtaylor-paper"), net, data, modules,
                              {**OPTS, "loss_fn": None, "damp": None, "relative_damp": 1e-2,
                               "samples_per_grad": 1})
    w, g, inv = flat_weights(modules), curv.mean_grad, curv.inv
    sal = obs.woodtaylor_saliency(w, inv.diag(), inv.mul(g), g)
    remove = torch.zeros_like(w, dtype=torch.bool)
    remove[torch.argsort(sal)[: round(0.5 * w.numel())]] = True
    expect = obs.finish_update(w, obs.joint_update(w, remove, inv, g, None), remove)
    prune(net, data, 0.5, "woodtaylor-paper", **OPTS)
    torch.testing.assert_close(flat_weights(select_modules(net)), expect)


def test_bad_taylor_options_leave_the_model_alone():
    net, data = mlp(), batches()
    before = state(net)
    for taylor, match in (({"scale": 3.0}, "in \\[0, 2\\]"), ({"grid": (0.1, 1.0)}, "contain 0"),
                          ({"speed": 1}, "unknown taylor options"),
                          ({"grad_samples": 0}, "grad_samples"), ({"saliency": "yes"}, "saliency")):
        with pytest.raises(ValueError, match=match):
            prune(net, data, 0.5, "woodtaylor", taylor=taylor, **OPTS)
    with pytest.raises(ValueError, match="taylor options are for method='woodtaylor'"):
        prune(net, data, 0.5, "woodfisher", taylor={"scale": 0.1}, **OPTS)
    after = state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_saliency_option_ranks_with_the_first_order_term():
    data, val = batches(), batches(n=2, seed=3)
    a, b = mlp(), mlp()
    prune(a, data, 0.5, "woodtaylor", val_data=val, **OPTS)
    res = prune(b, data, 0.5, "woodtaylor", val_data=val, taylor={"saliency": True}, **OPTS)
    assert res.options["taylor"]["saliency"] is True
    assert not torch.equal(flat_masks(select_modules(a)), flat_masks(select_modules(b)))


def test_woodtaylor_steps_inside_gradual(monkeypatch):
    monkeypatch.setattr(api, "build_inverse", REAL_BUILD)  # the fake's dense d=3440 is slow
    from woodfisher.data import synthetic
    from woodfisher.gradual import GradualConfig, _prune_sample_count, gradual
    from woodfisher.models import build_model

    ds = synthetic(n=256, input_shape=(1, 8, 8), num_classes=4, seed=1)
    torch.manual_seed(0)
    net = build_model("mlpnet-small", (1, 8, 8), num_classes=4)
    cfg = GradualConfig(final_sparsity=0.8, epochs=3, method="woodtaylor", lr=0.02,
                        batch_size=32, prune_options={"num_grads": 32, "block_size": 32})
    # The pruner gets held-out samples for the scale search beyond its 32 gradients.
    assert _prune_sample_count(cfg) == 32 + 1000
    fixed = GradualConfig(**{**cfg.__dict__, "prune_options": {
        "num_grads": 32, "taylor": {"scale": 0.0}}})
    assert _prune_sample_count(fixed) == 32
    res = gradual(net, ds, cfg, progress=False)
    pruned = [r for r in res.history if "pruned_to" in r]
    assert len(pruned) == 2
    assert all(len(r["newton_scales"]) >= 1 for r in pruned)
    assert all(0 <= s <= 2 for r in pruned for s in r["newton_scales"])
    assert res.final["sparsity"] == pytest.approx(0.8, abs=0.01)


def test_patterns_take_woodfishers_step():
    data = batches()
    a, b = mlp(), mlp()
    prune(a, data, None, "woodfisher", pattern="2:4", **OPTS)
    res = prune(b, data, None, "woodtaylor", pattern="2:4", **OPTS)
    sa, sb = state(a), state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert res.taylor["scales"] == [0.0]


def test_cli_prune_woodtaylor_reports_its_scales(tmp_path, monkeypatch):
    import json

    from conftest import cli_ok

    monkeypatch.setattr(api, "build_inverse", REAL_BUILD)
    ckpt = tmp_path / "m.pt"
    cli_ok(["train", "--model", "mlpnet-small", "--dataset", "digits", "--epochs", "3",
            "--out", str(ckpt), "-q"])
    for method in ("woodtaylor", "woodtaylor-paper"):
        report = json.loads(cli_ok(["prune", str(ckpt), "--sparsity", "0.7", "--method", method,
                                    "--num-grads", "64", "--block-size", "64", "--recompute",
                                    "2", "--json", "-q"]).stdout)["prune"]
        assert report["method"] == method and report["sparsity"] == pytest.approx(0.7)
        if method == "woodtaylor":
            assert len(report["taylor"]["scales"]) == 2 and report["taylor"]["search"]
        else:
            assert report["taylor"] is None
