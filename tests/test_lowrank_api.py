"""decompose end to end: checkpoints that reload alone, the CLI, training, sizes."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.utils import prune as tprune

from conftest import cli_bad, cli_ok
from woodfisher.checkpoint import load_checkpoint, save_checkpoint
from woodfisher.data import load_dataset
from woodfisher.lowrank import checkpoint_spec, compose, decompose, factorised_layers
from woodfisher.lowrank.size import size_bits
from woodfisher.lowrank.training import finetune, preset_model, rank_penalty
from woodfisher.models import build_model
from woodfisher.params import select_modules
from woodfisher.train import evaluate, train


@pytest.fixture(scope="module")
def digits_cnn():
    ds = load_dataset("digits")
    torch.manual_seed(0)
    net = build_model("cnn", ds.input_shape)
    train(net, ds.train, epochs=2, progress=False)
    return net, ds


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_checkpoint_reloads_the_factorised_model_alone(tmp_path, digits_cnn, method):
    net, ds = digits_cnn
    small = decompose(net, params=0.5, method=method, min_weights=0)
    tprune.l1_unstructured(small.get_submodule("conv2.1"), "weight", amount=0.5)
    spec = {"name": "cnn", "input_shape": list(ds.input_shape), "num_classes": 10}
    save_checkpoint(tmp_path / "s.pt", small, checkpoint_spec(small, spec))
    loaded, info = load_checkpoint(tmp_path / "s.pt")
    x = ds.test.tensors[0][:16]
    assert torch.equal(small.eval()(x), loaded(x))
    assert info["model"]["lowrank"]["conv2"]["method"] == ("svd" if method == "svd" else method)
    assert set(factorised_layers(loaded)) == set(factorised_layers(small))


def test_finetune_recovers_accuracy_and_distils_exactly_at_full_rank(digits_cnn):
    net, ds = digits_cnn
    small = decompose(net, params=0.25, ranks="uniform", min_weights=0)
    part = torch.utils.data.TensorDataset(*(t[:480] for t in ds.train.tensors))
    before = evaluate(small, part)["accuracy"]
    hist = finetune(small, net, part, epochs=2, lr=0.02, batch_size=32)
    assert evaluate(small, part)["accuracy"] > before + 0.05
    assert hist["losses"][-1] < hist["losses"][0]
    # A full-rank factorisation computes what the teacher does: nothing to distil (an MLP, as
    # BatchNorm in training mode would see batch statistics the teacher does not).
    mlp = build_model("mlpnet-small", ds.input_shape)
    full = decompose(mlp, ranks={"fc1": 40, "fc2": 20, "fc3": 10}, min_weights=0,
                     keep_classifier=False)
    batch = [(ds.train.tensors[0][:64], ds.train.tensors[1][:64])]
    h = finetune(full, mlp, batch, epochs=1, lr=1e-12)
    assert h["distill"][0] < 1e-9
    assert h["ce"][0] == pytest.approx(evaluate(mlp, batch)["loss"], rel=1e-5)


def test_rank_penalty_and_preset(digits_cnn):
    net, ds = digits_cnn
    mods = select_modules(net)
    p = rank_penalty(mods, "erank")
    p.backward()
    assert all(m.weight.grad is not None for m in mods.values())
    assert 0 < float(p) <= len(mods)
    net.zero_grad()
    small = decompose(net, params=0.5, min_weights=0)
    fresh = build_model("cnn", ds.input_shape)
    scratch = preset_model(small, fresh)
    assert [q.shape for q in scratch.parameters()] == [q.shape for q in small.parameters()]
    assert not torch.equal(compose(scratch.conv2), compose(small.conv2))


def test_size_counts_masks_and_bits(digits_cnn):
    net, _ = digits_cnn
    small = decompose(net, params=0.5, min_weights=0, keep_classifier=False)
    full = size_bits(small)
    tprune.l1_unstructured(small.fc[0], "weight", amount=0.5)
    pruned = size_bits(small)
    n = small.fc[0].weight.numel()
    assert pruned["mask_bits"] == n
    assert pruned["bits"] == full["bits"] - 32 * (n // 2) + n
    assert size_bits(small, 8)["weight_bits"] < full["weight_bits"] / 3


def test_cli_lowrank_writes_a_reloadable_checkpoint(tmp_path, digits_cnn):
    net, ds = digits_cnn
    ckpt = tmp_path / "cnn.pt"
    save_checkpoint(ckpt, net, {"name": "cnn", "input_shape": list(ds.input_shape),
                                "num_classes": 10}, {"dataset": "digits", **ds.normalisation})
    out = tmp_path / "small.pt"
    res = cli_ok(["lowrank", str(ckpt), "--params", "0.4", "--ranks", "fisher", "--finetune",
                  "1", "--min-weights", "0", "--num-samples", "300", "--bits", "8",
                  "--train-subset", "200", "--out", str(out), "-q", "--json"])
    report = json.loads(res.stdout)
    assert report["lowrank"]["budget"]["achieved"] <= 0.4
    assert {"decomposed", "finetuned", "quantized", "size"} <= set(report)
    loaded, _ = load_checkpoint(out)
    assert evaluate(loaded, ds.test)["accuracy"] == pytest.approx(report["final"]["accuracy"])
    assert json.loads((tmp_path / "small.json").read_text())["seed"] == 0
    cli_bad(["lowrank", str(ckpt), "--params", "0.001", "--min-weights", "0"], "cannot be met")
    cli_bad(["lowrank", str(ckpt), "--ranks", "magic"], "unknown rank rule")
    cli_bad(["lowrank", str(ckpt), "--bits", "0"], "--bits must be")
    assert not out.with_name("x.pt").exists()
