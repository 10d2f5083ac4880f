"""Quantization-aware fine-tuning: quantized forward, straight-through gradient, masks kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from woodfisher import train
from woodfisher.params import select_modules
from woodfisher.pruning.masks import apply_masks
from woodfisher.quant import fake_quantize, fake_quantize_model, quant_aware


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    mask = torch.ones(6, 5)
    mask[1] = 0
    apply_masks(net, {"0": net[0]}, {"0": mask})
    return net


def test_forward_is_the_quantized_model_and_gradient_passes_straight_through():
    net = _net()
    bits = {"0": 3, "2": 2}
    mods = {"0": net[0], "2": net[2]}
    ref = copy.deepcopy(net)
    fake_quantize_model({"0": ref[0], "2": ref[2]}, bits)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with quant_aware(mods, bits):
        out = net(x)
        assert torch.allclose(out, ref(x), atol=1e-6)
        nn.functional.cross_entropy(out, y).backward()
        got = net[2].parametrizations.weight.original.grad
    nn.functional.cross_entropy(ref(x), y).backward()
    assert torch.allclose(got, ref[2].weight.grad, atol=1e-6)


@pytest.mark.parametrize("selection", ["modules", "targets"])
def test_training_inside_keeps_masks_and_ends_on_the_grid(selection):
    net = _net()
    bits = {"0": 3, "2": 2}
    data = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(4)]
    # select_modules gives Targets (not modules): they must work as the modules do
    mods = select_modules(net) if selection == "targets" else {"0": net[0], "2": net[2]}
    with quant_aware(mods, bits):
        train(net, data, epochs=1, lr=0.1, progress=False)
    assert not any("parametrizations" in n for n, _ in net.named_parameters())
    assert (net[0].weight[1] == 0).all() and (net[0].weight_orig[1] == 0).all()
    for i, b in bits.items():
        w = net[int(i)].weight.detach()
        assert torch.equal(w, fake_quantize(w, b))


def test_bad_names_and_bits():
    net = _net()
    with pytest.raises(ValueError, match="unknown module"), quant_aware({"0": net[0]}, {"x": 4}):
        pass
    with pytest.raises(ValueError, match="1..16"), quant_aware({"0": net[0]}, {"0": 0}):
        pass
