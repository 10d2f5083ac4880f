from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune

from conftest import assert_same_state
from woodfisher.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from woodfisher.data import load_dataset
from woodfisher.models import build_model
from woodfisher.train import evaluate


def _spec(name, shape=(1, 8, 8), **kw):
    return {"name": name, "input_shape": list(shape), "num_classes": 10, "kwargs": kw}


@pytest.mark.parametrize(
    "name, shape, kw",
    [
        ("mlpnet", (1, 8, 8), {}),
        ("cnn", (1, 8, 8), {}),
        ("resnet20", (3, 16, 16), {"shortcut": "B"}),
    ],
)
def test_round_trip(tmp_path, name, shape, kw):
    torch.manual_seed(0)
    model = build_model(name, shape, **kw)
    model.train()(torch.randn(4, *shape))  # move BatchNorm running statistics
    path = save_checkpoint(tmp_path / "m.pt", model, _spec(name, shape, **kw),
                           {"dataset": "digits", "mean": 0.5, "std": 0.25},
                           {"epochs": 3, "seed": 0, "accuracy": 0.9})
    loaded, info = load_checkpoint(path)
    assert_same_state(model, loaded)
    assert info["model"]["name"] == name and info["model"]["kwargs"] == kw
    assert info["dataset"] == {"dataset": "digits", "mean": 0.5, "std": 0.25}
    assert info["meta"]["epochs"] == 3 and "torch" in info["meta"]["versions"]
    x = torch.randn(2, *shape)
    assert torch.equal(model.eval()(x), loaded(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp files left


def test_round_trip_keeps_prune_masks(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlpnet", (1, 8, 8))
    mask = (torch.rand_like(model.fc1.weight) > 0.7).float()
    prune.custom_from_mask(model.fc1, "weight", mask)
    prune.l1_unstructured(model.fc2, "weight", amount=0.5)
    with torch.no_grad():
        model.fc1.weight_orig.add_(1.0)  # make weight_orig differ from the effective weight
    path = save_checkpoint(tmp_path / "p.pt", model, _spec("mlpnet"))
    assert "fc1.weight_orig" in torch.load(path, weights_only=True)["state_dict"]
    loaded, _ = load_checkpoint(path)
    assert_same_state(model, loaded)
    assert torch.equal(loaded.fc1.weight_mask, mask)
    assert prune.is_pruned(loaded)
    # the effective weight is right without a forward pass, and after one
    assert torch.equal(loaded.fc1.weight, model.fc1.weight_orig * mask)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert int((loaded.fc2.weight == 0).sum()) == model.fc2.weight.numel() // 2


def test_real_model_accuracy_survives(tmp_path):
    from woodfisher.train import train

    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlpnet-small", splits.input_shape)
    train(model, splits.train, epochs=3, lr=0.05, batch_size=64, progress=False)
    before = evaluate(model, splits.test)
    save_checkpoint(tmp_path / "m.pt", model, _spec("mlpnet-small"))
    after = evaluate(load_checkpoint(tmp_path / "m.pt")[0], splits.test)
    assert before == after


def _expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, ValueError)
    for f in fragments:
        assert f in msg
    return msg


def test_not_a_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a torch file")
    _expect_error(garbage, "not a woodfisher checkpoint")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    _expect_error(tensor, "not a woodfisher checkpoint", "Tensor")
    plain_sd = tmp_path / "sd.pt"
    torch.save(build_model("mlpnet").state_dict(), plain_sd)
    _expect_error(plain_sd, "not a woodfisher checkpoint")
    _expect_error(tmp_path / "missing.pt", "not found")


def test_missing_keys_and_mismatched_spec(tmp_path):
    model = build_model("mlpnet", (1, 8, 8))
    path = save_checkpoint(tmp_path / "m.pt", model, _spec("mlpnet"))
    payload = torch.load(path, weights_only=True)
    del payload["model"]["num_classes"]
    torch.save(payload, tmp_path / "nokey.pt")
    _expect_error(tmp_path / "nokey.pt", "lacks keys", "model.num_classes")
    payload = torch.load(path, weights_only=True)
    payload["model"]["input_shape"] = [1, 28, 28]
    torch.save(payload, tmp_path / "shape.pt")
    _expect_error(tmp_path / "shape.pt", "does not match its model spec")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "woodfisher-checkpoint", "x": Evil()}, path)
    _expect_error(path, "weights_only=True")


def test_save_rejects_bad_spec_and_dir(tmp_path):
    model = build_model("mlpnet-small")
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path / "m.pt", model, {"name": "mlpnet-small"})
    with pytest.raises(ValueError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "m.pt", model, _spec("mlpnet-small"))
