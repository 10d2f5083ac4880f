"""MAC counts against hand counts from the layer formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from woodfisher.flops import count_flops


def test_conv_stride_padding_groups_and_linear_hand_counts():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(8 * 5 * 5, 3))
    rep = count_flops(net, torch.randn(3, 4, 10, 10))
    layers = rep.by_name()
    # output 8×5×5 positions, each a dot product of (4/2)·3·3 inputs
    assert layers["0"].macs == 8 * 5 * 5 * 2 * 9
    assert layers["0"].macs_per_weight == pytest.approx(25)
    assert layers["2"].macs == 200 * 3
    assert rep.total_macs == 8 * 25 * 18 + 600


def test_linear_on_sequences_counts_every_token():
    lin = nn.Linear(6, 5)
    rep = count_flops(lin, torch.randn(2, 7, 6))
    assert rep.layers[0].macs == 7 * 6 * 5
    assert rep.layers[0].macs_per_weight == 7


def test_conv_transpose_and_conv1d_3d():
    tconv = nn.ConvTranspose2d(3, 4, 2, stride=2)
    rep = count_flops(tconv, torch.randn(1, 3, 5, 5))
    assert rep.layers[0].macs == 3 * 25 * 4 * 4  # each input scatters into 4 channels × 2×2
    c1 = nn.Conv1d(2, 3, 3)
    assert count_flops(c1, torch.randn(1, 2, 10)).layers[0].macs == 3 * 8 * 2 * 3
    c3 = nn.Conv3d(1, 2, 2)
    assert count_flops(c3, torch.randn(1, 1, 3, 3, 3)).layers[0].macs == 2 * 8 * 8


def test_masked_weights_skip_their_share_and_shared_layers_count_per_call():
    lin = nn.Linear(4, 4)
    tprune.custom_from_mask(lin, "weight", (torch.arange(16).reshape(4, 4) % 4 == 0).float())
    rep = count_flops(lin, torch.randn(5, 4))
    assert rep.nonzero_macs == 4 and rep.total_macs == 16

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert count_flops(Twice(), torch.randn(2, 3)).total_macs == 18


def test_dict_inputs_and_modes_restored():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, input_ids, mask):
            return self.fc(input_ids * mask)

    m = Kw().train()
    rep = count_flops(m, {"input_ids": torch.randn(4, 3), "mask": torch.ones(4, 3)})
    assert rep.total_macs == 6 and m.training


def test_bad_inputs_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        count_flops(nn.Linear(4, 2), torch.randn(2, 5))
    with pytest.raises(ValueError, match="batched tensor"):
        count_flops(nn.Linear(4, 2), "x")
