"""``woodfisher longtail`` end to end on digits, and its refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import faults
from conftest import cli_bad as _bad
from conftest import cli_ok as _ok
from woodfisher.longtail import Memorization


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lt")
    paths = {name: d / f"{name}.pt" for name in ("dense", "reseed", "big", "pruned", "pruned2")}
    _ok(["train", "--model", "mlpnet-small", "--dataset", "digits", "--epochs", "3",
         "--out", str(paths["dense"]), "-q"])
    _ok(["train", "--model", "mlpnet-small", "--dataset", "digits", "--epochs", "3",
         "--seed", "1", "--out", str(paths["reseed"]), "-q"])
    _ok(["train", "--model", "mlpnet", "--dataset", "digits", "--epochs", "1",
         "--out", str(paths["big"]), "-q"])
    for name, sparsity in (("pruned", "0.7"), ("pruned2", "0.8")):
        _ok(["prune", str(paths["dense"]), "--sparsity", sparsity, "--method", "magnitude",
             "--out", str(paths[name]), "-q"])
    return paths


def test_longtail_writes_report_and_reuses_memorization(ckpts, tmp_path):
    out = tmp_path / "R"
    args = ["longtail", str(ckpts["dense"]), "--compressed", str(ckpts["pruned"]),
            "--compressed", f"{ckpts['pruned']},{ckpts['pruned2']}",
            "--control", str(ckpts["reseed"]), "--memorization", "3", "--epochs", "1",
            "--train-subset", "120", "--test-subset", "60", "--workers", "1",
            "--bootstrap", "20", "--out", str(out), "-q"]
    res = _ok(args)
    assert "magnitude 70%" in res.stdout and "control (dense reseed)" in res.stdout
    for name in ("longtail.json", "mismatch_vs_memorization.png", "class_deltas.png",
                 "exemplars_0.png", "exemplars_1.png", "memorization.pt"):
        assert (out / name).is_file(), name
    report = json.loads((out / "longtail.json").read_text())
    arms = report["analysis"]["arms"]
    assert set(arms) == {"magnitude 70%", "magnitude 70% + magnitude 80%",
                         "control (dense reseed)"}
    assert arms["magnitude 70% + magnitude 80%"]["models"] == 2
    assert report["memorization"]["runs"] == 3 and "proxies" in report
    assert len(list((out / "memorization_runs").glob("run-*.pt"))) == 3
    # A saved estimate is reused; one for other examples is refused.
    saved = ["--memorization", str(out / "memorization.pt")]
    assert args[8:10] == ["--memorization", "3"]
    again = _ok([*args[:8], *saved, *args[10:], "--no-proxies", "--json"])
    data = json.loads(again.stdout)
    assert data["analysis"]["arms"]["magnitude 70%"] == arms["magnitude 70%"]
    other = [*args[:8], *saved, *args[10:]]
    other[other.index("120")] = "100"
    _bad(other, "scores other examples")


def test_longtail_refuses_other_architectures_and_datasets(ckpts, tmp_path):
    from woodfisher.checkpoint import load_checkpoint, save_checkpoint

    base = ["longtail", str(ckpts["dense"]), "--memorization", "2", "--out", str(tmp_path)]
    _bad([*base, "--compressed", str(ckpts["big"])], "same architecture")
    model, info = load_checkpoint(ckpts["pruned"])
    other = tmp_path / "other.pt"
    save_checkpoint(other, model, info["model"], {**info["dataset"], "dataset": "fashion-mnist"})
    _bad([*base, "--compressed", str(other)], "same dataset")
    _bad([*base, "--compressed", str(ckpts["pruned"]), "--control", str(ckpts["big"])],
         "same architecture")


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--memorization", "1"], ">= 2 runs"),
        (["--train-subset", "30"], "too few"),
        (["--bins", "0.5,0.2"], "increase strictly"),
        (["--memorization", "nowhere.pt"], "neither a number of runs"),
        (["--train-subset", "100000"], "exceeds"),
    ],
)
def test_longtail_bad_input(ckpts, tmp_path, extra, fragment):
    args = ["longtail", str(ckpts["dense"]), "--compressed", str(ckpts["pruned"]),
            "--out", str(tmp_path / "R"), "--epochs", "1", "--workers", "1", "-q",
            "--train-subset", "100", *extra]
    _bad(args, fragment)
    assert torch.get_num_threads() >= 1


@pytest.mark.slow  # three fresh processes importing torch, five short training runs each
def test_memorization_killed_mid_run_resumes_to_the_uninterrupted_scores(ckpts, tmp_path):
    """SIGKILL a real `woodfisher longtail` run after a random saved memorization run, run the
    same command again: it reuses the saved runs and ends with the scores of a run never
    killed."""
    def argv(out: Path) -> list[str]:
        return faults.cli_command(
            "longtail", str(ckpts["dense"]), "--compressed", str(ckpts["pruned"]),
            "--memorization", "5", "--epochs", "1", "--train-subset", "120", "--test-subset",
            "60", "--workers", "1", "--bootstrap", "20", "--no-proxies", "--out", str(out),
            "-q")

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    faults.run_to_end(argv(ref))
    rng = random.Random(2)
    nth = rng.randint(1, 4)  # never the last run (5)
    faults.kill_at_event(argv(cut), tmp_path, "memorization_run_saved", nth, rng)
    assert not (cut / "memorization.pt").exists()
    saved = len(list((cut / "memorization_runs").glob("run-*.pt")))
    assert nth <= saved <= 5  # running on may pass one more save, the last included
    faults.run_to_end(argv(cut))
    a = Memorization.load(ref / "memorization.pt")
    b = Memorization.load(cut / "memorization.pt")
    assert torch.equal(a.scores.nan_to_num(9.0), b.scores.nan_to_num(9.0))
    assert torch.equal(a.masks, b.masks)
