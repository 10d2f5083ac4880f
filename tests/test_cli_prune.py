"""The prune and compare commands, end to end on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import cli_bad as _bad
from conftest import cli_ok as _ok
from woodfisher.checkpoint import load_checkpoint

runner = CliRunner()
FAST = ["--num-grads", "64", "--block-size", "64", "-q"]




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    _ok(["train", "--model", "mlpnet-small", "--dataset", "digits", "--epochs", "20",
         "--out", str(path), "-q"])
    return path


def test_prune_writes_checkpoint_report_and_evaluate_agrees(ckpt, tmp_path):
    out = tmp_path / "pruned.pt"
    res = _ok(["prune", str(ckpt), "--sparsity", "0.8", "--out", str(out), "--json", *FAST])
    report = json.loads(res.stdout)
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-9)
    assert report["prune"]["update"] == "joint" and len(report["prune"]["steps"]) > 1
    assert json.loads(out.with_suffix(".json").read_text())["after"] == report["after"]
    ev = json.loads(_ok(["evaluate", str(out), "--json"]).stdout)
    assert ev["accuracy"] == report["after"]["accuracy"]
    assert ev["sparsity"] == pytest.approx(0.8, abs=1e-4)
    model, info = load_checkpoint(out)
    assert hasattr(model.fc1, "weight_mask") and info["meta"]["pruning"]["method"] == "woodfisher"


def test_prune_relative_damp_reaches_the_report(ckpt):
    res = _ok(["prune", str(ckpt), "--sparsity", "0.5", "--relative-damp", "5", "--json",
               "--recompute", "1", *FAST])
    report = json.loads(res.stdout)["prune"]
    assert report["relative_damp"] == 5.0 and report["options"]["relative_damp"] == 5.0
    assert report["damp"] > 0


def test_prune_table_names_layers_and_accuracy(ckpt):
    res = _ok(["prune", str(ckpt), "--sparsity", "0.5", "--recompute", "1", *FAST])
    assert "fc1" in res.stdout and "accuracy" in res.stdout and "50.00%" in res.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sparsity", "1.0"], "sparsity"),
        (["--method", "optimal"], "unknown method 'optimal'"),
        (["--damp", "lots"], "--damp"),
        (["--damp", "auto", "--relative-damp", "1"], "not both"),
        (["--relative-damp", "0"], "relative_damp must be"),
        (["--method", "kfac", "--relative-damp", "1"], "K-FAC"),
        (["--recompute", "many"], "--recompute"),
        (["--update", "sideways"], "update"),
        (["--scope", "planet"], "scope"),
    ],
)
def test_prune_bad_options_exit_2_without_output(ckpt, tmp_path, args, fragment):
    out = tmp_path / "p.pt"
    _bad(["prune", str(ckpt), "--out", str(out), *args, *FAST], fragment)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_prune_bad_files_exit_2(ckpt, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _bad(["prune", str(junk), *FAST], "not a woodfisher checkpoint")
    _bad(["prune", str(ckpt), "--out", str(tmp_path / "missing" / "p.pt"), *FAST],
         "does not exist")


def test_compare_writes_json_and_png_and_woodfisher_beats_magnitude(ckpt, tmp_path):
    out = tmp_path / "cmp.json"
    res = _ok(["compare", str(ckpt), "--methods", "magnitude,woodfisher",
               "--sparsities", "0.8,0.9", "--out", str(out), *FAST])
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    acc = {(r["method"], r["sparsity"]): r["accuracy"] for r in report["rows"]}
    assert set(acc) == {(m, s) for m in ("magnitude", "woodfisher") for s in (0.8, 0.9)}
    assert acc[("woodfisher", 0.9)] > acc[("magnitude", 0.9)]
    assert "woodfisher" in res.stdout and "90%" in res.stdout


def test_compare_relative_damp_reaches_ef_methods_and_kfac_keeps_its_own(ckpt, tmp_path):
    out = tmp_path / "cmp.json"
    _ok(["compare", str(ckpt), "--methods", "kfac,diag-fisher", "--sparsities", "0.5",
         "--relative-damp", "3", "--recompute", "1", "--out", str(out), *FAST])
    report = json.loads(out.read_text())
    assert report["options"]["relative_damp"] == 3.0
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["diag-fisher"]["relative_damp"] == 3.0
    assert rows["kfac"]["relative_damp"] is None and rows["kfac"]["damp"] == 1e-3


def test_compare_bad_sparsities_exit_2(ckpt, tmp_path):
    _bad(["compare", str(ckpt), "--sparsities", "0.5,abc", "--out", str(tmp_path / "c.json")],
         "--sparsities")
    _bad(["compare", str(ckpt), "--sparsities", "1.5", "--out", str(tmp_path / "c.json")],
         "sparsity")
