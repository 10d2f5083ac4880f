"""Uniform fake quantization: grid, error bound, zeros, storage count."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from woodfisher.params import select_modules
from woodfisher.quant import check_bits, fake_quantize, fake_quantize_model, storage_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_values_lie_on_the_channel_grid_within_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 20, dtype=torch.float64)
    q = fake_quantize(w, bits)
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().amax(1, keepdim=True) / qmax
    levels = q / step
    assert torch.allclose(levels, levels.round(), atol=1e-9)
    assert (levels.abs() <= qmax + 1e-9).all()
    assert ((q - w).abs() <= step / 2 + 1e-12).all()
    # the largest magnitude of each channel is represented exactly
    idx = w.abs().argmax(1)
    assert torch.allclose(q[torch.arange(6), idx], w[torch.arange(6), idx])


def test_zeros_stay_zero_and_one_bit_is_sign_times_mean_magnitude():
    w = torch.tensor([[0.0, 1.0, -3.0], [0.5, 0.0, 0.0]])
    q1 = fake_quantize(w, 1)
    assert torch.equal(q1, torch.tensor([[0.0, 2.0, -2.0], [0.5, 0.0, 0.0]]))
    assert (fake_quantize(w, 4)[w == 0] == 0).all()


def test_conv_channels_along_axis_0_and_per_tensor():
    w = torch.randn(4, 3, 3, 3)
    q = fake_quantize(w, 4)
    for c in range(4):
        assert torch.allclose(q[c], fake_quantize(w[c].reshape(1, -1), 4).reshape(3, 3, 3))
    qt = fake_quantize(w, 4, axis=None)
    assert len(torch.unique((qt / (w.abs().max() / 7)).round())) <= 15


def test_storage_bits_and_model_in_place_keeps_masks():
    lin = nn.Linear(4, 3)
    tprune.custom_from_mask(lin, "weight", torch.tensor([[1, 0, 1, 1]] * 3).float())
    rep = fake_quantize_model({"fc": lin}, 2)
    assert rep["fc"] == {"bits": 2, "storage_bits": 9 * 2 + 3 * 32}
    assert (lin.weight[:, 1] == 0).all() and (lin.weight_orig[:, 1] == 0).all()
    assert storage_bits(torch.zeros(2, 2), 8) == 64


def test_selected_targets_of_a_pruned_model_quantize_like_modules():
    # select_modules gives Targets (read-only stand-ins); the result must be the modules'
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        tprune.custom_from_mask(net[0], "weight", torch.tensor([[1, 0, 1, 1]] * 3).float())
    fake_quantize_model(select_modules(nets[0]), 3)
    fake_quantize_model({"0": nets[1][0], "2": nets[1][2]}, 3)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (nets[0][0].weight[:, 1] == 0).all()
    assert torch.equal(nets[0][0].weight, fake_quantize(nets[0][0].weight, 3))


@pytest.mark.parametrize("bad", [0, 17, 2.5, True])
def test_bad_bit_widths(bad):
    with pytest.raises(ValueError, match="1..16"):
        check_bits(bad)
    with pytest.raises(ValueError, match="unknown module"):
        fake_quantize_model({"a": nn.Linear(2, 2)}, {"b": 4})
