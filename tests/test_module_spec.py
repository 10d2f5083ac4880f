"""Replaced submodules survive a checkpoint round trip through their plain-data description."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from woodfisher.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from woodfisher.models import build_model, module_from_spec, module_spec, replace_modules


def _factorised_conv(c_in, c_out, r):
    return nn.Sequential(
        nn.Conv2d(c_in, r, 1, bias=False),
        nn.Conv2d(r, r, 3, stride=2, padding=1, groups=r, bias=False),
        nn.Conv2d(r, c_out, 1),
    )


def test_spec_round_trip_keeps_every_constructor_argument():
    seq = nn.Sequential(_factorised_conv(3, 8, 4), nn.BatchNorm2d(8, eps=1e-3), nn.Identity())
    rebuilt = module_from_spec(module_spec(seq))
    assert repr(rebuilt) == repr(seq)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in seq.parameters()]


def test_unknown_types_are_refused_both_ways():
    with pytest.raises(ValueError, match="cannot describe a ReLU"):
        module_spec(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="unknown module type 'os.system'"):
        module_from_spec({"type": "os.system", "args": {}})
    with pytest.raises(ValueError, match="not a submodule"):
        replace_modules(build_model("cnn", (1, 8, 8)), {"conv9": module_spec(nn.Identity())})


def test_checkpoint_rebuilds_replaced_and_pruned_modules(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 16, 16))
    model.layer2[0].conv1 = _factorised_conv(16, 32, 4)
    model.fc = nn.Sequential(nn.Linear(64, 5, bias=False), nn.Linear(5, 10))
    prune.l1_unstructured(model.fc[0], "weight", amount=0.5)
    model.train()(torch.randn(4, 3, 16, 16))
    spec = {"name": "resnet20", "input_shape": [3, 16, 16], "num_classes": 10,
            "modules": {n: module_spec(model.get_submodule(n)) for n in ("layer2.0.conv1", "fc")}}
    path = save_checkpoint(tmp_path / "f.pt", model, spec)
    loaded, info = load_checkpoint(path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), loaded(x))
    assert hasattr(loaded.fc[0], "weight_mask")
    # Without the description the state dict does not fit the architecture.
    del spec["modules"]
    save_checkpoint(tmp_path / "g.pt", model, spec)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "g.pt")
