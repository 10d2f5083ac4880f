from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune

from woodfisher.data import load_dataset, synthetic
from woodfisher.models import ShapeError, build_model
from woodfisher.train import enforce_masks, evaluate, lr_at, sparsity_report, train


def _fit(seed=0, epochs=3, **kw):
    ds = synthetic(n=192, input_shape=(1, 8, 8), num_classes=4, seed=1)
    torch.manual_seed(seed)
    model = build_model("mlpnet-small", (1, 8, 8), num_classes=4)
    hist = train(model, ds, epochs=epochs, lr=0.05, batch_size=32, seed=seed, progress=False,
                 **kw)
    return model, hist, ds


def test_training_reduces_loss_and_learns():
    ds = synthetic(n=192, input_shape=(1, 8, 8), num_classes=4, seed=1)
    torch.manual_seed(0)
    model = build_model("mlpnet-small", (1, 8, 8), num_classes=4)
    before = evaluate(model, ds)
    hist = train(model, ds, epochs=3, lr=0.05, batch_size=32, progress=False)
    after = evaluate(model, ds)
    assert after["loss"] < 0.5 * before["loss"]
    assert hist["losses"][-1] < hist["losses"][0]
    assert after["accuracy"] > 0.9 and hist["steps"] == 18


def test_digits_quickly():
    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlpnet", splits.input_shape)
    train(model, splits.train, epochs=5, lr=0.05, batch_size=64, progress=False)
    assert evaluate(model, splits.test)["accuracy"] > 0.9


def test_deterministic_per_seed():
    a, ha, _ = _fit(seed=0)
    b, hb, _ = _fit(seed=0)
    c, hc, _ = _fit(seed=1)
    assert ha["losses"] == hb["losses"]
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_accepts_dataloader_and_list_of_batches():
    ds = synthetic(n=64, input_shape=(1, 8, 8), num_classes=4)
    batches = [(ds.tensors[0][i : i + 16], ds.tensors[1][i : i + 16]) for i in range(0, 64, 16)]
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    for data in (batches, loader):
        model = build_model("mlpnet-small", (1, 8, 8), num_classes=4)
        hist = train(model, data, epochs=2, lr=0.05, progress=False)
        assert hist["steps"] == 8
        assert evaluate(model, data)["n"] == 64


def test_masks_kept_during_training():
    torch.manual_seed(0)
    model = build_model("mlpnet-small", (1, 8, 8), num_classes=4)
    masks = {}
    for name in ("fc1", "fc2"):
        layer = getattr(model, name)
        masks[name] = (torch.rand_like(layer.weight) > 0.6).float()
        prune.custom_from_mask(layer, "weight", masks[name])
    ds = synthetic(n=96, input_shape=(1, 8, 8), num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    train(model, ds, epochs=3, lr=0.1, batch_size=16, progress=False, optimizer=opt)
    for name, mask in masks.items():
        layer = getattr(model, name)
        pruned = mask == 0
        assert torch.equal(layer.weight[pruned], torch.zeros(int(pruned.sum())))
        assert torch.equal(layer.weight_orig[pruned], torch.zeros(int(pruned.sum())))
        buf = opt.state[layer.weight_orig]["momentum_buffer"]
        assert torch.equal(buf[pruned], torch.zeros(int(pruned.sum())))
        assert bool((layer.weight[~pruned] != 0).all())  # the rest did train
    report = sparsity_report(model)
    expected = sum(int((m == 0).sum()) for m in masks.values())
    assert report["zeros"] == expected
    fc1_zeros = float((masks["fc1"] == 0).float().mean())
    assert report["layers"][0]["sparsity"] == pytest.approx(fc1_zeros)


def test_enforce_masks_handles_optimizer_state():
    layer = torch.nn.Linear(4, 3)
    prune.custom_from_mask(layer, "weight", torch.tensor([[1.0, 0, 1, 0]] * 3))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    opt.state[layer.weight_orig]["momentum_buffer"] = torch.ones(3, 4)
    with torch.no_grad():
        layer.weight_orig.fill_(2.0)
    enforce_masks(layer, opt)
    assert torch.equal(layer.weight_orig[:, 1], torch.zeros(3))
    assert torch.equal(opt.state[layer.weight_orig]["momentum_buffer"][:, 3], torch.zeros(3))
    assert torch.equal(layer.weight_orig[:, 0], torch.full((3,), 2.0))


def test_sparsity_report_dense_and_conv():
    model = build_model("cnn", (1, 8, 8))
    with torch.no_grad():
        model.conv1.weight[0].zero_()
    report = sparsity_report(model)
    assert [r["name"] for r in report["layers"]] == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert report["layers"][0]["zeros"] == 9
    assert report["numel"] == 16 * 9 + 32 * 16 * 9 + 10 * 512
    assert report["sparsity"] == pytest.approx(9 / report["numel"])


def test_shape_mismatch_in_train_and_evaluate():
    model = build_model("mlpnet", (1, 28, 28))
    ds = synthetic(n=8, input_shape=(1, 8, 8))
    with pytest.raises(ShapeError, match=r"expects input of shape \(N, 1, 28, 28\)"):
        train(model, ds, epochs=1, progress=False)
    with pytest.raises(ShapeError):
        evaluate(model, ds)


def test_bad_hyper_parameters():
    model = build_model("mlpnet-small", (1, 8, 8))
    ds = synthetic(n=8)
    with pytest.raises(ValueError, match="lr must be positive"):
        train(model, ds, epochs=1, lr=0.0)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        train(model, ds, epochs=1, schedule="linear")
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [])


def test_lr_schedules():
    assert lr_at(0, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1) == pytest.approx(0.05)
    assert lr_at(80, 100, 0.1, "step") == pytest.approx(0.001)
    assert lr_at(99, 100, 0.1, "constant") == 0.1
