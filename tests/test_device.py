"""Devices: names are checked up front, the library follows the model, CUDA runs match CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import cli_bad
from woodfisher.device import model_device, resolve_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
needs_no_cuda = pytest.mark.skipif(CUDA, reason="checks the error seen without CUDA")


def test_cpu_and_auto_resolve_on_any_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if CUDA else "cpu")
    assert resolve_device("auto") == resolve_device(None)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", "cuda:-1", ""])
def test_unknown_device_names_the_choices(name):
    with pytest.raises(ValueError, match="choose auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_why_and_what_to_use(name):
    with pytest.raises(ValueError, match="--device cpu") as err:
        resolve_device(name)
    assert name in str(err.value)


@needs_cuda
def test_cuda_index_beyond_the_visible_gpus():
    with pytest.raises(ValueError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_model_device_of_a_model_without_parameters_is_cpu():
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.BatchNorm1d(3)) == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("command", ["train", "evaluate", "prune", "compare", "gradual"])
def test_cli_cuda_without_cuda_is_a_one_line_error(command, tmp_path):
    args = {
        "train": ["train", "--dataset", "digits", "--out", str(tmp_path / "m.pt")],
        "evaluate": ["evaluate", str(tmp_path / "m.pt")],
        "prune": ["prune", str(tmp_path / "m.pt"), "--out", str(tmp_path / "p.pt")],
        "compare": ["compare", str(tmp_path / "m.pt"), "--out", str(tmp_path / "c.json")],
        "gradual": ["gradual", str(tmp_path / "m.pt"), "--out", str(tmp_path / "g.pt")],
    }[command]
    cli_bad([*args, "--device", "cuda"], "built without CUDA", "--device cpu")
    assert list(tmp_path.iterdir()) == []


def _prune_on(device: torch.device):
    from woodfisher.data import synthetic
    from woodfisher.models import build_model
    from woodfisher.pruning import prune

    ds = synthetic(n=256, input_shape=(1, 8, 8), num_classes=4, seed=0)
    torch.manual_seed(0)
    model = build_model("mlpnet-small", (1, 8, 8), 4).double()
    x, y = ds.tensors
    data = [(x[i : i + 64].double(), y[i : i + 64]) for i in range(0, 256, 64)]
    model = copy.deepcopy(model).to(device)
    res = prune(model, data, 0.8, num_grads=128, block_size=64, recompute=2)
    return model, res


@needs_cuda
def test_prune_on_cuda_matches_cpu_in_float64():
    cpu, _ = _prune_on(torch.device("cpu"))
    gpu, res = _prune_on(torch.device("cuda"))
    assert res.sparsity == pytest.approx(0.8, abs=1e-3)
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
        assert b.device.type == "cuda", name
        if name.endswith("_mask"):
            assert torch.equal(a, b.cpu()), name
        else:
            torch.testing.assert_close(a, b.cpu(), rtol=1e-8, atol=1e-10)
