from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import cli_bad as _bad
from conftest import cli_ok as _ok
from conftest import write_fashion_dir
from woodfisher.cli import app

runner = CliRunner()




@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    _ok(["train", "--dataset", "digits", "--epochs", "1", "--out", str(path), "-q"])
    return path


def test_train_then_evaluate_json(digits_ckpt, tmp_path):
    out = runner.invoke(app, ["evaluate", str(digits_ckpt), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert 0.0 <= data["accuracy"] <= 1.0 and data["loss"] > 0
    assert data["sparsity"] == 0.0 and data["dataset"] == "digits"
    assert [r["name"] for r in data["layers"]] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert data["layers"][0]["shape"] == [300, 64]


def test_train_output_and_evaluate_table(tmp_path):
    path = tmp_path / "m.pt"
    res = _ok(["train", "--model", "mlpnet-small", "--dataset", "digits", "--epochs", "2",
               "--out", str(path), "-q", "--json"])
    data = json.loads(res.stdout)
    assert data["checkpoint"] == str(path) and path.is_file()
    table = _ok(["evaluate", str(path)]).stdout
    assert "accuracy" in table and "fc2.weight" in table
    assert f"{data['accuracy']:.2%}" in table


def test_evaluate_reports_pruned_sparsity(digits_ckpt, tmp_path):
    from torch.nn.utils import prune

    from woodfisher.checkpoint import load_checkpoint, save_checkpoint

    model, info = load_checkpoint(digits_ckpt)
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    path = save_checkpoint(tmp_path / "pruned.pt", model, info["model"], info["dataset"])
    data = json.loads(_ok(["evaluate", str(path), "--json"]).stdout)
    assert data["layers"][0]["sparsity"] == 0.5
    assert data["sparsity"] == pytest.approx(9600 / 50200)


def test_unknown_model_and_dataset(tmp_path):
    out = tmp_path / "x.pt"
    _bad(["train", "--model", "vgg", "--dataset", "digits", "--out", str(out)],
         "unknown model 'vgg'", "mlpnet")
    _bad(["train", "--dataset", "mnist", "--out", str(out)], "unknown dataset 'mnist'", "digits")
    assert not out.exists()


def test_input_shape_not_fitting_model(digits_ckpt, tmp_path):
    fdir = tmp_path / "f"
    write_fashion_dir(fdir)
    _bad(["evaluate", str(digits_ckpt), "--dataset", "fashion-mnist", "--data-dir", str(fdir)],
         "expects input of shape (N, 1, 8, 8)", "(20, 1, 28, 28)")


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    _bad(["evaluate", str(bad)], "not a woodfisher checkpoint")
    t = tmp_path / "t.pt"
    torch.save(torch.ones(2), t)
    _bad(["evaluate", str(t)], "not a woodfisher checkpoint")
    _bad(["evaluate", str(tmp_path / "nope.pt")], "not found")


def test_data_dir_without_files(tmp_path):
    out = tmp_path / "x.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(["train", "--dataset", "fashion-mnist", "--data-dir", str(empty), "--out", str(out)],
         "train-images-idx3-ubyte", "apt-get install dataset-fashion-mnist", "--data-dir")
    assert not out.exists()


def test_unwritable_output(tmp_path):
    target = tmp_path / "missing-dir" / "x.pt"
    _bad(["train", "--dataset", "digits", "--out", str(target)], "does not exist")
    _bad(["train", "--dataset", "digits", "--out", str(tmp_path)], "is a directory")
    afile = tmp_path / "file"
    afile.write_text("")
    _bad(["train", "--dataset", "digits", "--out", str(afile / "x.pt")], "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_train_on_fake_fashion_dir(tmp_path, monkeypatch):
    fdir = tmp_path / "f"
    write_fashion_dir(fdir, gz=True)
    monkeypatch.setenv("WOODFISHER_DATA", str(fdir))
    out = tmp_path / "m.pt"
    data = json.loads(_ok(["train", "--model", "mlpnet-small", "--epochs", "1", "--out",
                           str(out), "-q", "--json"]).stdout)
    assert data["dataset"] == "fashion-mnist" and out.is_file()


def test_demo_falls_back_to_digits_and_reuses(tmp_path):
    # The pruning half of the demo is tested with cheap options in test_demo_prunes_and_plots.
    args = ["demo", "--out-dir", str(tmp_path), "--data-dir", str(tmp_path / "none"),
            "--epochs", "2", "-q", "--json", "--no-prune"]
    first = json.loads(_ok(args).stdout)
    assert first["dataset"] == "digits" and not first["reused"]
    assert first["comparison"] is None
    second = json.loads(_ok(args).stdout)
    assert second["reused"] and second["accuracy"] == first["accuracy"]


def test_demo_prunes_and_plots(tmp_path):
    from woodfisher.demo import DEMO_METHODS, run_demo

    res = run_demo(tmp_path, dataset="digits", epochs=2, sparsities=(0.5, 0.9), progress=False,
                   prune_options={"num_grads": 32, "block_size": 32, "recompute": 1})
    rows = res["comparison"]["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        (m, s) for m in DEMO_METHODS for s in (0.5, 0.9)
    ]
    assert all(r["layers"] and 0 <= r["accuracy"] <= 1 for r in rows)
    assert Path(res["plot"]).stat().st_size > 1000
    assert json.loads(Path(res["report"]).read_text())["rows"] == rows


def test_user_errors_decorator_is_reusable():
    import typer

    from woodfisher.cli import user_errors

    sub = typer.Typer()

    @sub.command()
    @user_errors
    def boom(value: int = 1) -> None:
        raise ValueError(f"value {value} is bad;\nallowed: 0")

    @sub.command()
    def other() -> None:
        pass

    result = runner.invoke(sub, ["boom", "--value", "3"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: value 3 is bad; allowed: 0"
