"""shrink (outputs equal the masked model's), export round trips, latency forms, CLI."""

import copy
import json

import pytest
import torch
from torch import nn

from conftest import cli_bad, cli_ok
from woodfisher.checkpoint import save_checkpoint
from woodfisher.export import (
    decode_tensor,
    encode_tensor,
    load_export,
    save_compressed,
    save_dense,
    save_shrunk,
)
from woodfisher.latency import latency_report, to_csr_linear
from woodfisher.models import build_model
from woodfisher.pruning.masks import apply_masks
from woodfisher.shrink import apply_kept_channels, kept_channels, shrink


def randomise_bn(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net


def kill_channels(net, producer, consumer, idx, bn=None):
    """Mask a producer's rows (with BN entries) and the consumer's input columns."""
    prod, cons = net.get_submodule(producer), net.get_submodule(consumer)
    rows = torch.ones_like(prod.weight, dtype=torch.bool)
    rows[idx] = False
    cols = torch.ones_like(cons.weight, dtype=torch.bool)
    if isinstance(cons, nn.Linear) and not isinstance(prod, nn.Linear):
        per = cons.in_features // prod.out_channels
        for j in idx:
            cols[:, j * per : (j + 1) * per] = False
    else:
        cols[:, idx] = False
    apply_masks(net, {producer: prod, consumer: cons}, {producer: rows, consumer: cols})
    if bn is not None:
        with torch.no_grad():
            net.get_submodule(bn).weight[idx] = 0
            net.get_submodule(bn).bias[idx] = 0


CASES = {
    "mlpnet": [("fc1", "fc2", [0, 5, 7], None), ("fc2", "fc3", [1, 2], None)],
    "cnn": [("conv1", "conv2", [3, 4], "bn1"), ("conv2", "fc", [0, 9, 31], "bn2")],
    "resnet20": [("layer1.0.conv1", "layer1.0.conv2", [1, 2], "layer1.0.bn1"),
                 ("layer3.2.conv1", "layer3.2.conv2", list(range(40)), "layer3.2.bn1")],
}


@pytest.mark.parametrize("name", list(CASES))
def test_shrunk_outputs_equal_masked_and_reload(name):
    torch.manual_seed(0)
    net = randomise_bn(build_model(name, (1, 8, 8), 3)).eval()
    for producer, consumer, idx, bn in CASES[name]:
        kill_channels(net, producer, consumer, idx, bn)
    x = torch.randn(5, 1, 8, 8)
    before = copy.deepcopy(net.state_dict())
    small = shrink(net, x).eval()
    assert torch.allclose(small(x), net(x), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    for producer, _, idx, _ in CASES[name]:
        mod = net.get_submodule(producer)
        out = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        assert kept_channels(small)[producer] == [j for j in range(out) if j not in idx]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # untouched
    if name == "cnn":
        fresh = apply_kept_channels(build_model(name, (1, 8, 8), 3), kept_channels(small), x)
        fresh.load_state_dict(small.state_dict())
        assert torch.equal(fresh.eval()(x), small(x))


def test_shrink_refuses_residual_and_dense_models():
    net = randomise_bn(build_model("resnet20", (1, 8, 8), 3)).eval()
    with torch.no_grad():  # a residual channel: zero, but tied to the other blocks by the adds
        net.layer1[0].conv2.weight[3] = 0
    with pytest.raises(ValueError, match="nothing to shrink.*tied to others.*layer1.0.conv2"):
        shrink(net, torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="nothing to shrink"):
        shrink(build_model("mlpnet", (1, 4, 4), 3), torch.randn(2, 1, 4, 4))


@pytest.mark.parametrize("case", ["unstructured", "nm", "dense", "rows", "int"])
def test_encodings_round_trip_bit_exact(case):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 16, generator=g)
    if case == "unstructured":
        t[torch.rand(6, 16, generator=g) < 0.9] = 0
    elif case == "nm":
        t.reshape(-1, 4)[:, 1::2] = 0  # 2:4
    elif case == "rows":
        t = torch.randn(64, 3, 3, 3, generator=g)
        t[::2] = 0
    elif case == "int":
        t = torch.arange(10)
    parts, info = encode_tensor(t, (2, 4))
    back = decode_tensor(parts, info)
    assert torch.equal(back, t) and back.dtype == t.dtype
    if case == "nm":
        assert info["encoding"] == "nm"
        stored = sum(p.numel() * p.element_size() for p in parts.values())
        assert stored == 6 * 8 * 4 + 6 * 8 // 4  # half the values, 2 bits per kept value
    if case == "dense":
        assert info["encoding"] == "raw"


def test_exports_restore_the_exact_model(tmp_path):
    torch.manual_seed(0)
    net = randomise_bn(build_model("cnn", (1, 8, 8), 3)).eval()
    kill_channels(net, "conv2", "fc", [1, 2, 3], "bn2")
    spec = {"name": "cnn", "input_shape": [1, 8, 8], "num_classes": 3}
    x = torch.randn(4, 1, 8, 8)
    for save, name in ((save_dense, "d"), (save_compressed, "c")):
        back, info = load_export(save(net, spec, tmp_path / f"{name}.safetensors"))
        assert torch.equal(back(x), net(x))
    small = shrink(net, x)
    back, info = load_export(save_shrunk(small, spec, tmp_path / "s.safetensors"))
    assert info["kind"] == "shrunk" and torch.equal(back(x), small.eval()(x))
    with pytest.raises(ValueError, match="not found"):
        load_export(tmp_path / "missing.safetensors")


def test_csr_form_and_latency_report_structure():
    torch.manual_seed(0)
    net = build_model("mlpnet-small", (1, 4, 4), 3).eval()
    with torch.no_grad():
        net.fc1.weight[net.fc1.weight.abs() < 0.2] = 0
    x = torch.randn(3, 1, 4, 4)
    assert torch.allclose(to_csr_linear(net)(x), net(x), atol=1e-6)
    rep = latency_report(net, (1, 4, 4), batch_sizes=(1, 4), min_time=0.0)
    assert set(rep["forms"]) == {"dense", "csr"} and rep["threads"] >= 1
    assert rep["semi_structured"]["available"] in (True, False) and rep["semi_structured"]["reason"]


def test_cli_prune_channels_shrink_export_and_latency(tmp_path):
    from woodfisher.data import load_dataset
    from woodfisher.train import train

    splits = load_dataset("digits")
    torch.manual_seed(0)
    net = build_model("mlpnet-small", splits.input_shape, splits.num_classes)
    train(net, splits.train, epochs=1, progress=False)
    ckpt = tmp_path / "dense.pt"
    spec = {"name": "mlpnet-small", "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes}
    save_checkpoint(ckpt, net, spec, {"dataset": "digits", **splits.normalisation})
    out = tmp_path / "p.pt"
    res = cli_ok(["prune", str(ckpt), "--pattern", "channels", "--target", "flops", "--sparsity",
                  "0.5", "--method", "magnitude", "--shrink", "--out", str(out), "--json", "-q"])
    report = json.loads(res.stdout)
    assert report["prune"]["structure"]["flops"]["removed_fraction"] >= 0.5
    assert report["shrink"]["macs"] <= 0.5 * report["shrink"]["dense_macs"] + 1
    assert (tmp_path / "p.shrunk.safetensors").is_file()
    res = cli_ok(["export", str(out), "--format", "safetensors", "--out",
                  str(tmp_path / "e.safetensors"), "--json"])
    exp = json.loads(res.stdout)
    assert set(exp["bytes"]) == {"masked", "dense", "compressed", "shrunk"}
    assert exp["bytes"]["shrunk"] < exp["bytes"]["dense"]
    assert max(exp["max_output_difference"].values()) < 1e-5
    res = cli_ok(["evaluate", str(tmp_path / "e.compressed.safetensors"), "--latency", "--json"])
    lat = json.loads(res.stdout)["latency"]
    assert {"dense", "shrunk"} <= set(lat["forms"])
    cli_bad(["prune", str(ckpt), "--pattern", "3:2"], "1 <= N < M")
    cli_bad(["prune", str(ckpt), "--pattern", "2:4", "--sparsity", "0.9"], "at most 0.5")
    cli_bad(["export", str(out), "--format", "onnx"], "unknown --format")
