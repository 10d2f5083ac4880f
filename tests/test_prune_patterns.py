"""prune(pattern=..., target=...) end to end, with a dense-inverse oracle for the curvature."""

import copy

import pytest
import torch
from torch import nn

import woodfisher.pruning.api as api
from fake_curvature import fake_build_inverse
from woodfisher import count_flops, prune
from woodfisher.models import build_model
from woodfisher.params import effective_weight


@pytest.fixture(autouse=True)
def dense_oracle(monkeypatch):
    monkeypatch.setattr(api, "build_inverse", fake_build_inverse)


def data_for(shape, classes=3, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return [(x[i : i + 16], torch.randint(0, classes, (16,), generator=g)) for i in range(0, n, 16)]


def mlp(widths=(8, 12, 8, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_nm_mask_holds_in_every_fitting_layer_and_skips_the_rest():
    net = mlp((8, 12, 6, 3))  # layer 4 has 6 inputs: does not fit 2:4
    res = prune(net, data_for((8,)), None, pattern="2:4", num_grads=24)
    assert res.structure["skipped"] == {"4": "input width 6 is not a multiple of M=4"}
    for name in ("0", "2"):
        runs = (effective_weight(net.get_submodule(name)) != 0).reshape(-1, 4)
        assert (runs.sum(1) == 2).all()
    assert (effective_weight(net[4]) != 0).all()
    assert res.structure["nm_satisfied"] and res.steps[-1] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["magnitude", "kfac", "woodfisher",
                                    "woodtaylor"])
def test_blocks_go_whole_for_every_method(method):
    net = mlp()
    prune(net, data_for((8,)), 0.5, method=method, pattern="block:2x2", num_grads=24)
    for mod in (net[0], net[2], net[4]):
        if mod.weight.shape[0] % 2:
            continue
        w = effective_weight(mod)
        tiles = (w != 0).reshape(w.shape[0] // 2, 2, -1, 2).permute(0, 2, 1, 3).reshape(-1, 4)
        assert ((tiles.sum(1) == 0) | (tiles.sum(1) == 4)).all()


def test_one_channel_is_the_brute_force_choice_and_update():
    net = mlp((5, 4, 3, 3), seed=1)
    data = data_for((5,), n=32)
    before = copy.deepcopy(net)
    # 5 % of the weights: exactly one channel goes, in one step, with whole-layer blocks.
    res = prune(net, data, 0.05, pattern="channels", recompute=1, num_grads=32,
                block_size=None, damp=1e-2)
    modules = {"0": before[0], "2": before[2], "4": before[4]}
    from fake_curvature import loop_gradients

    G = loop_gradients(before, data, modules, 32)
    Fm = 1e-2 * torch.eye(G.shape[1], dtype=torch.float64) + G.T @ G / G.shape[0]
    Fm = torch.block_diag(Fm[:20, :20], Fm[20:32, 20:32], Fm[32:, 32:])
    w = torch.cat([m.weight.detach().reshape(-1) for m in modules.values()]).double()
    off = {"0": 0, "2": 20, "4": 32}
    cands = []
    for j in range(4):  # channel j of layer 0: Q = column j of layer 2, dead = row j of layer 0
        cands.append((torch.arange(3) * 4 + j + off["2"], torch.arange(5) + 5 * j))
    for j in range(3):  # channel j of layer 2: Q = column j of layer 4, dead = row j of layer 2
        cands.append((torch.arange(3) * 3 + j + off["4"], torch.arange(4) + 4 * j + off["2"]))
    best = None
    for Q, dead in cands:
        fixed = torch.cat([Q, dead])
        R = torch.tensor([i for i in range(w.numel()) if i not in set(fixed.tolist())])
        delta = torch.zeros_like(w)
        delta[Q] = -w[Q]
        delta[R] = -torch.linalg.solve(Fm[R][:, R], Fm[R][:, fixed] @ delta[fixed])
        score = 0.5 * delta @ Fm @ delta / fixed.numel()
        if best is None or score < best[0]:
            best = (score, Q, dead, w + delta)
    _, Q, dead, expected = best
    expected[dead] = 0.0
    got = torch.cat([effective_weight(m).reshape(-1) for m in (net[0], net[2], net[4])]).double()
    assert torch.allclose(got, expected, atol=1e-5)
    assert res.structure["groups"][0]["compensated_in"] == "2"


@pytest.mark.slow
def test_channels_zero_bias_and_batchnorm_and_keep_residuals():
    net = build_model("resnet20", (1, 8, 8), 3)
    res = prune(net, data_for((1, 8, 8)), 0.3, pattern="channels", target="flops",
                method="magnitude")
    skipped = res.structure["skipped"]
    assert "layer1.0.conv2" in skipped and "Add" in skipped["layer1.0.conv2"]
    rows = {r["layer"]: r for r in res.structure["groups"]}
    assert rows["layer2.1.conv1"]["compensated_in"] == "layer2.1.conv2"
    for blk in (net.layer1[0], net.layer2[1], net.layer3[2]):
        gone = effective_weight(blk.conv1).reshape(blk.conv1.out_channels, -1).abs().sum(1) == 0
        assert (blk.bn1.weight[gone] == 0).all() and (blk.bn1.bias[gone] == 0).all()
        assert (effective_weight(blk.conv2)[:, gone] == 0).all()
    # The FLOP counter, run on the pruned model, confirms the removed fraction.
    rep = count_flops(net, torch.randn(2, 1, 8, 8))
    removed = 1 - rep.nonzero_macs / rep.total_macs
    assert removed == pytest.approx(res.structure["flops"]["removed_fraction"], abs=1e-3)
    assert 0.3 <= removed < 0.36


def test_flops_target_prefers_cheap_weights_per_mac():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 3))
    res = prune(net, data_for((1, 6, 6)), 0.5, pattern="unstructured", target="flops",
                method="magnitude")
    rep = count_flops(net, torch.randn(1, 1, 6, 6))
    assert 1 - rep.nonzero_macs / rep.total_macs >= 0.5
    assert res.target == "flops" and res.structure["flops"]["removed_fraction"] >= 0.5


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(sparsity=0.9, pattern="2:4"), "at most 0.5"),
    (dict(sparsity=0.5, pattern="3:2"), "1 <= N < M"),
    (dict(sparsity=0.5, pattern="block:0x4"), "positive sides"),
    (dict(sparsity=None, pattern="2:3", layers=["0"]), "does not fit layer '0'"),
    (dict(sparsity=None, pattern="4:5"), "fits no selected layer"),
    (dict(sparsity=None, pattern="2:4", target="flops"), "target='params'"),
    (dict(sparsity=0.5, pattern="2:4", layer_sparsity={"0": 0.5}), "unstructured pattern only"),
    (dict(sparsity=0.5, target="macs"), "unknown target"),
    (dict(sparsity=None, pattern="channels"), "sparsity is required"),
    (dict(sparsity=0.5, pattern="channels", layers=["4"]), "fits no selected layer"),
])
def test_bad_input_is_one_line_and_leaves_model_untouched(kwargs, fragment):
    net = mlp((8, 12, 8, 3))
    state = copy.deepcopy(net.state_dict())
    s = kwargs.pop("sparsity")
    with pytest.raises(ValueError, match=fragment) as err:
        prune(net, data_for((8,)), s, **kwargs)
    assert "\n" not in str(err.value)
    assert set(net.state_dict()) == set(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_gradual_keeps_the_nm_pattern_at_every_step():
    from woodfisher.data import synthetic
    from woodfisher.gradual import GradualConfig, gradual

    ds = synthetic(n=128, input_shape=(1, 8, 8), num_classes=3)
    torch.manual_seed(0)
    net = build_model("mlpnet-small", (1, 8, 8), 3)  # inputs 64, 40, 20: all fit 2:4
    seen = []

    def check(history):
        zeros = [(effective_weight(m) == 0).reshape(-1, 4).sum(1) for m in
                 (net.fc1, net.fc2, net.fc3)]
        seen.append(max(int(z.max()) for z in zeros))
        assert seen[-1] <= 2  # no run ever passes M - N zeros

    cfg = GradualConfig(final_sparsity=0.5, initial_sparsity=0.25, epochs=3, method="magnitude",
                        lr=0.05, prune_options={"pattern": "2:4"})
    res = gradual(net, ds, cfg, progress=False, callback=check)
    assert [round(r["sparsity"], 2) for r in res.history][-1] == 0.5
    for m in (net.fc1, net.fc2, net.fc3):
        assert ((effective_weight(m) != 0).reshape(-1, 4).sum(1) == 2).all()
