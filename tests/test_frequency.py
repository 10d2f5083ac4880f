"""DCTConv2d and the DCT against scipy, the engine on coefficients (D F Dᵀ), DNS's rule, costs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn
from torch.nn.utils import prune

from woodfisher import fisher_inverse, load_checkpoint, sample_gradients, save_checkpoint
from woodfisher.fisher import exact_empirical_fisher, kfac_inverse
from woodfisher.flops import count_flops
from woodfisher.frequency import (
    DCTConv2d,
    DynamicPruner,
    band_factors,
    band_kept_fractions,
    band_sizes,
    dct2,
    dct_matrix,
    dns_moments,
    frequency_cost,
    hysteresis_mask,
    idct2,
    splice_gradients,
    to_frequency,
    to_spatial,
    update_probability,
)
from woodfisher.frequency.dns import threshold_for_count
from woodfisher.models import build_model, module_from_spec, register_module_type

CONVS = [
    dict(c_in=3, c_out=4, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True),
    dict(c_in=4, c_out=6, k=5, stride=2, padding=2, dilation=1, groups=2, bias=False),
    dict(c_in=2, c_out=3, k=3, stride=1, padding=2, dilation=2, groups=1, bias=True),
]


def _conv(case: dict, dtype=torch.float64) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(case["c_in"], case["c_out"], case["k"], stride=case["stride"],
                     padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                     bias=case["bias"], dtype=dtype)


# --- the transform ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_dct_matches_scipy_and_is_orthonormal(k):
    w = torch.randn(4, 3, k, k, dtype=torch.float64)
    expected = scipy.fft.dctn(w.numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(dct2(w).numpy(), expected, atol=1e-12)
    a = dct_matrix(k, torch.float64)
    torch.testing.assert_close(a @ a.T, torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(idct2(dct2(w)), w)


def test_bands():
    assert band_sizes(3) == [1, 2, 3, 2, 1]
    assert band_sizes(5) == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    f = band_factors(3, 2.0)
    assert f[2, 2] / f[0, 0] == pytest.approx(math.e ** 2)
    assert float(f.log().mean()) == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(band_factors(3, 0.0), torch.ones(3, 3, dtype=torch.float64))


# --- DCTConv2d ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CONVS)
def test_dctconv_equals_conv_and_round_trips(case):
    conv = _conv(case)
    d = DCTConv2d.from_conv2d(conv)
    x = torch.randn(2, case["c_in"], 9, 9, dtype=torch.float64)
    torch.testing.assert_close(d(x), conv(x), atol=1e-12, rtol=0)
    np.testing.assert_allclose(
        d.coefficients.numpy(),
        scipy.fft.dctn(conv.weight.detach().numpy(), norm="ortho", axes=(-2, -1)), atol=1e-12)
    back = d.to_conv2d()
    assert type(back) is nn.Conv2d
    torch.testing.assert_close(back.weight, conv.weight)
    torch.testing.assert_close(back(x), conv(x), atol=1e-12, rtol=0)
    conv32 = _conv(case, torch.float32)
    torch.testing.assert_close(DCTConv2d.from_conv2d(conv32)(x.float()), conv32(x.float()),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CONVS)
def test_coefficient_gradient_is_the_dct_of_the_weight_gradient(case):
    conv = _conv(case)
    d = DCTConv2d.from_conv2d(conv)
    x = torch.randn(3, case["c_in"], 8, 8, dtype=torch.float64)
    target = torch.randn_like(conv(x))
    ((conv(x) - target) ** 2).sum().backward()
    ((d(x) - target) ** 2).sum().backward()
    expected = scipy.fft.dctn(conv.weight.grad.numpy(), norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(d.weight.grad.numpy(), expected, atol=1e-10)


def test_to_frequency_skips_and_reports_why():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, (1, 3)), nn.Conv2d(4, 4, 1),
                        nn.Conv2d(4, 4, 3, groups=4))
    prune.custom_from_mask(net[0], "weight", torch.rand(4, 1, 3, 3) > 0.5)
    x = torch.randn(2, 1, 9, 9)
    before = net(x)
    rep = to_frequency(net, skip="3")
    assert rep["converted"] == ["0"]
    assert rep["skipped"] == {"1": "non-square 1×3 kernel: left spatial",
                              "2": "1×1 kernel: a single coefficient, nothing to gain",
                              "3": "excluded by skip"}
    assert not hasattr(net[0], "weight_mask")  # the spatial mask is baked into the kernel
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=0)
    assert to_frequency(net)["converted"] == ["0", "3"]  # grouped convs work too
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=0)
    assert to_spatial(net) == ["0", "3"]
    assert not any(isinstance(m, DCTConv2d) for m in net.modules())
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="matches no Conv2d"):
        to_frequency(net, layers="fc*")
    with pytest.raises(ValueError, match="needs a square kernel"):
        DCTConv2d(1, 2, (1, 3))


def test_checkpoint_rebuilds_dctconv_with_masks(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=3)
    to_frequency(model)
    prune.custom_from_mask(model.conv2, "weight", torch.rand(32, 16, 3, 3) > 0.7)
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    spec = {"name": "cnn", "input_shape": [1, 8, 8], "num_classes": 3}
    save_checkpoint(tmp_path / "f.pt", model, spec)  # no "modules": recorded by themselves
    loaded, info = load_checkpoint(tmp_path / "f.pt")
    recorded = info["model"]["modules"]
    assert sorted(recorded) == ["conv1", "conv2"]
    assert recorded["conv2"]["type"] == "DCTConv2d"
    assert recorded["conv2"]["module"] == "woodfisher.frequency.layers"
    assert isinstance(loaded.conv2, DCTConv2d)
    assert torch.equal(loaded.conv2.weight_mask, model.conv2.weight_mask)
    assert torch.equal(loaded(x), model(x))
    # Converted back to spatial and saved with the loaded spec: the stale entries are
    # re-described as the plain convs they are now.
    to_spatial(loaded)
    save_checkpoint(tmp_path / "s.pt", loaded, info["model"])
    again, info2 = load_checkpoint(tmp_path / "s.pt")
    assert info2["model"]["modules"]["conv2"]["type"] == "Conv2d"
    assert type(again.conv2) is nn.Conv2d
    torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=0)


def test_checkpoint_loads_dctconv_in_a_fresh_process(tmp_path):
    """Loading must not depend on woodfisher.frequency having been imported already."""
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=3)
    to_frequency(model)
    spec = {"name": "cnn", "input_shape": [1, 8, 8], "num_classes": 3}
    path = save_checkpoint(tmp_path / "f.pt", model, spec)
    code = ("import sys; from woodfisher import load_checkpoint; "
            "m, _ = load_checkpoint(sys.argv[1]); print(type(m.conv2).__name__)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "DCTConv2d"


def test_module_specs_import_only_woodfisher_modules():
    with pytest.raises(ValueError, match="unknown module type 'Evil'"):
        module_from_spec({"type": "Evil", "module": "os", "args": {}})
    with pytest.raises(ValueError, match="failed to import"):
        module_from_spec({"type": "Nope", "module": "woodfisher.no_such_module", "args": {}})
    with pytest.raises(ValueError, match="only woodfisher layer classes"):
        register_module_type(nn.Conv2d, ())


# --- the engine on coefficients: F_C = D F_W Dᵀ ---------------------------------------------

def _pair():
    torch.manual_seed(0)
    spatial = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(3 * 5 * 5, 4)).double()
    freq = nn.Sequential(*[DCTConv2d.from_conv2d(m) if isinstance(m, nn.Conv2d) else m
                           for m in spatial])
    x = torch.randn(12, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    # D acting on the flat conv weight (out, in, k, k): I ⊗ (A ⊗ A), the linear layer untouched.
    a = dct_matrix(3, torch.float64)
    dconv = torch.block_diag(*[torch.kron(a, a)] * 6)
    d = torch.block_diag(dconv, torch.eye(4 * 75, dtype=torch.float64))
    return spatial, freq, (x, y), d


def test_per_sample_gradients_and_fisher_in_the_dct_basis():
    spatial, freq, data, d = _pair()
    gw = sample_gradients(spatial, data, num_grads=12)
    gc = sample_gradients(freq, data, num_grads=12)
    torch.testing.assert_close(gc, gw @ d.T)
    fw = exact_empirical_fisher(spatial, data)
    fc = exact_empirical_fisher(freq, data)
    torch.testing.assert_close(fc, d @ fw @ d.T)
    # The inverse (full block, same relative damp) is D F_W⁻¹ Dᵀ, so its diagonal follows.
    inv_w = fisher_inverse(spatial, [data], num_grads=12, block_size=None, relative_damp=0.1)
    inv_c = fisher_inverse(freq, [data], num_grads=12, block_size=None, relative_damp=0.1)
    dense_w = inv_w.inv.mul(torch.eye(d.shape[0], dtype=torch.float64))
    expected = torch.diagonal(d @ dense_w @ d.T)
    torch.testing.assert_close(inv_c.layout.flatten(inv_c.diag()), expected)


def test_kfac_on_coefficients_is_the_rotated_spatial_kfac():
    spatial, freq, data, d = _pair()
    kw = kfac_inverse(spatial, [data], num_batches=1, damp=1e-2)
    kc = kfac_inverse(freq, [data], num_batches=1, damp=1e-2)
    v = torch.randn(d.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(kc.mul(v), d @ kw.mul(d.T @ v))


# --- DNS's rule -------------------------------------------------------------------------------

def test_hysteresis_boundaries():
    theta = 1.0
    m = torch.tensor([0.9, 0.9001, 1.1, 1.1001, 0.5, 2.0], dtype=torch.float64)
    kept = torch.tensor([1, 1, 0, 0, 0, 1])
    # ≤ 0.9θ is pruned, > 0.9θ stays; a pruned entry needs > 1.1θ to come back.
    assert hysteresis_mask(m, kept, theta).tolist() == [False, True, False, True, False, True]


def test_moments_match_the_caffe_formula():
    w = torch.tensor([[0.5, -1.5, 0.0], [2.0, -0.25, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    vals = np.array([0.5, -1.5, 2.0, 3.0])  # kept and nonzero
    mu = np.abs(vals).mean()
    assert dns_moments(w, mask) == pytest.approx((mu, math.sqrt((vals ** 2).mean() - mu ** 2)))
    assert dns_moments(torch.zeros(3)) == (0.0, 0.0)


def test_update_probability_and_threshold_for_count():
    assert update_probability(0, 1e-4, 1) == 1.0
    assert update_probability(30_000, 1e-4, 2) == pytest.approx(1 / 16)
    s = torch.randn(1000, dtype=torch.float64)
    for keep in (0, 1, 10, 999, 1000):
        assert int((s > threshold_for_count(s, keep)).sum()) == keep
    with pytest.raises(ValueError, match="keep must be"):
        threshold_for_count(s, 1001)


def test_splice_gradients_reach_pruned_entries():
    torch.manual_seed(0)
    conv = DCTConv2d(2, 3, 3, dtype=torch.float64)
    mask = torch.rand(3, 2, 3, 3) > 0.5
    prune.custom_from_mask(conv, "weight", mask)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    # Oracle: a leaf tensor holding the masked coefficients; its gradient at every entry.
    leaf = (conv.weight_orig.detach() * mask).requires_grad_()
    conv._conv_forward(x, idct2(leaf), conv.bias).pow(2).sum().backward()
    with splice_gradients({"c": conv}):
        out = conv(x)
    out.pow(2).sum().backward()
    torch.testing.assert_close(conv.weight_orig.grad, leaf.grad)
    assert (conv.weight_orig.grad[~mask] != 0).all()
    torch.testing.assert_close(out, conv(x))  # same forward value as the masked layer
    conv.weight_orig.grad = None
    conv(x).pow(2).sum().backward()  # outside: pruned entries get nothing
    assert (conv.weight_orig.grad[~mask] == 0).all()


def test_pruner_targets_c_rule_and_splicing():
    for allocation in ("score", "global", "uniform"):
        torch.manual_seed(0)
        a, b = DCTConv2d(4, 8, 3), DCTConv2d(8, 8, 3)
        pruner = DynamicPruner({"a": a, "b": b}, allocation=allocation, band_slope=1.0)
        pruner.update(density=0.2)
        kept = pruner.kept()
        assert sum(kept.values()) == round(0.2 * (288 + 576))
        if allocation == "uniform":
            assert kept == {"a": round(0.2 * 288), "b": round(0.2 * 576)}
        elif allocation == "global":
            assert pruner.layer_c["a"] == pruner.layer_c["b"]
        else:  # one threshold on |c|/λ over both layers
            score = {n: m.weight_orig.detach().abs() / band_factors(3, 1.0).float() for n, m in
                     (("a", a), ("b", b))}
            kept_min = min(float(score[n][pruner.masks()[n]].min()) for n in score)
            pruned_max = max(float(score[n][~pruner.masks()[n]].max()) for n in score)
            assert pruned_max < kept_min
        fractions = band_kept_fractions(a)
        mask = a.weight_mask.mean(dim=(0, 1))
        assert fractions[0] == pytest.approx(float(mask[0, 0]))
        assert fractions[4] == pytest.approx(float(mask[2, 2]))
    prune.remove(a, "weight")
    # Fixed c: exactly DNS's rule with θ = max(μ + cσ, 0).
    pruner = DynamicPruner({"a": a}, c=0.5)
    pruner.update()
    mu, sigma = dns_moments(a.weight_orig)
    expected = a.weight_orig.abs() > 0.9 * max(mu + 0.5 * sigma, 0)
    assert torch.equal(a.weight_mask.bool(), expected)
    # A pruned coefficient that grows past 1.1θ comes back at the next update.
    q = (~expected).nonzero()[0].tolist()
    with torch.no_grad():
        a.weight_orig[tuple(q)] = 1.2 * (mu + 0.5 * sigma)
    pruner.update()
    assert a.weight_mask[tuple(q)] == 1


# --- cost ---------------------------------------------------------------------------------------

def test_cost_hand_count():
    torch.manual_seed(0)
    net = nn.Sequential(DCTConv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 5))
    mask = torch.zeros(4, 2, 3, 3)
    mask[:, :, 0, 0] = 1
    mask[0, 0, 1, 0] = 1
    prune.custom_from_mask(net[0], "weight", mask)
    rep = frequency_cost(net, torch.zeros(3, 2, 7, 7))
    conv, fc = rep["layers"]
    positions = 4 * 4
    assert conv["dense_macs"] == 2 * 4 * 9 * positions
    assert conv["kept"] == 9 and conv["multiply_macs"] == 9 * positions
    assert conv["multiply_macs"] == count_flops(net, torch.zeros(3, 2, 7, 7)).layers[0].nonzero_macs
    # Row DCTs of (7 + 2) padded rows × 4 output columns, k² each; column DCTs k³ per patch.
    assert conv["transform_macs"] == 2 * (9 * 4 * 9 + positions * 27)
    assert conv["spatial_equivalent_macs"] == conv["dense_macs"]  # the kernel is dense
    assert fc["domain"] == "spatial" and fc["multiply_macs"] == 64 * 5
    sel = rep["selected"]
    assert sel["compression"] == pytest.approx(72 / 9)
    assert sel["speedup_multiply_only"] == pytest.approx(72 / 9)
    assert sel["speedup_with_transform"] == pytest.approx(
        conv["dense_macs"] / (conv["multiply_macs"] + conv["transform_macs"]))
    assert rep["model"]["dense_macs"] == conv["dense_macs"] + 320
