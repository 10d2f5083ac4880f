"""Disk and file faults: a full disk while writing leaves the previous file intact and says so;
a truncated or foreign resume file and a checkpoint of a newer format are one-line errors."""

from __future__ import annotations

import errno
import json
import os
import random

import pytest
import torch
from typer.testing import CliRunner

import faults
from conftest import assert_same_state
from woodfisher.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    WriteError,
    atomic_save,
    atomic_save_json,
    load_checkpoint,
)
from woodfisher.cli import app
from woodfisher.train import train_and_save


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "dense.pt"
    torch.manual_seed(0)
    train_and_save("mlpnet-small", "digits", out=str(path), epochs=2, progress=False)
    return path


def _disk_full_after(monkeypatch, good: int) -> None:
    """Let ``good`` more fsyncs succeed, then fail every one with ENOSPC (a full disk is seen
    at the latest when the data are flushed)."""
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > good:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("save", [atomic_save, atomic_save_json])
def test_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, save):
    path = tmp_path / "state"
    save({"version": 1}, path)
    before = path.read_bytes()
    _disk_full_after(monkeypatch, 0)
    with pytest.raises(WriteError, match="No space left on device; the previous file is intact"):
        save({"version": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    with pytest.raises(WriteError, match="nothing was written"):
        save({"version": 2}, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_cli_prune_on_a_full_disk_exits_1_with_one_line_and_old_output_intact(
    digits_ckpt, tmp_path, monkeypatch
):
    out = tmp_path / "pruned.pt"
    args = ["prune", str(digits_ckpt), "--method", "magnitude", "--out", str(out), "-q"]
    assert CliRunner().invoke(app, [*args, "--sparsity", "0.5"]).exit_code == 0
    before = out.read_bytes(), out.with_suffix(".json").read_bytes()
    _disk_full_after(monkeypatch, 0)
    res = CliRunner().invoke(app, [*args, "--sparsity", "0.7"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert "No space left on device; the previous file is intact" in res.output
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before


def test_gradual_full_disk_mid_run_keeps_the_last_resume_file_and_resumes_from_it(
    digits_ckpt, tmp_path, monkeypatch
):
    out = tmp_path / "g.pt"
    args = ["gradual", str(digits_ckpt), "--out", str(out), "--method", "magnitude",
            "--epochs", "3", "--train-subset", "256", "--batch-size", "32", "-q"]
    # Each epoch writes the resume file and the JSON log: let epoch 1's two writes through.
    _disk_full_after(monkeypatch, 2)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "previous file is intact" in res.output
    resume = out.with_suffix(".resume.pt")
    assert torch.load(resume, weights_only=True)["next_epoch"] == 1
    monkeypatch.undo()
    res = CliRunner().invoke(app, [*args, "--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["resumed_from"] == 1


def test_truncated_resume_file_is_a_one_line_error_naming_it(digits_ckpt, tmp_path):
    out = tmp_path / "g.pt"
    args = ["gradual", str(digits_ckpt), "--out", str(out), "--method", "magnitude",
            "--epochs", "2", "--train-subset", "128", "--batch-size", "32", "-q"]
    assert CliRunner().invoke(app, args).exit_code == 0
    resume = out.with_suffix(".resume.pt")
    data = resume.read_bytes()
    resume.write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert str(resume) in " ".join(res.output.split()) and "not a gradual resume file" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_checkpoint_of_a_newer_format_is_refused_with_the_version(digits_ckpt, tmp_path):
    payload = torch.load(digits_ckpt, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}.*upgrade"):
        load_checkpoint(newer)
    res = CliRunner().invoke(app, ["evaluate", str(newer)])
    assert res.exit_code == 2 and f"version {FORMAT_VERSION + 1}" in res.output
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(digits_ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a woodfisher checkpoint"):
        load_checkpoint(truncated)


LOWRANK_ARGS = ["--params", "0.5", "--min-weights", "0", "--ranks", "uniform",
                "--finetune", "5", "--lr", "0.05", "-q"]


def test_lowrank_resume_without_a_resume_file_or_out_is_a_one_line_error(digits_ckpt, tmp_path):
    out = tmp_path / "small.pt"
    res = CliRunner().invoke(app, ["lowrank", str(digits_ckpt), *LOWRANK_ARGS, "--resume"])
    assert res.exit_code == 2 and "give --finetune N and the same --out" in res.output
    res = CliRunner().invoke(app, ["lowrank", str(digits_ckpt), *LOWRANK_ARGS, "--resume",
                                   "--out", str(out)])
    assert res.exit_code == 2 and "no resume file at" in res.output
    assert not out.exists()


@pytest.mark.slow  # three fresh processes importing torch: ~15 s idle
def test_lowrank_finetune_sigkill_then_resume_equals_uninterrupted(digits_ckpt, tmp_path):
    """`lowrank --finetune` killed at a random epoch and resumed ends with the weights of an
    uninterrupted run, and its losses equal."""
    ref, cut = tmp_path / "ref.pt", tmp_path / "cut.pt"
    res = CliRunner().invoke(app, ["lowrank", str(digits_ckpt), *LOWRANK_ARGS, "--out", str(ref)])
    assert res.exit_code == 0, res.output
    rng = random.Random(1)
    argv = faults.cli_command("lowrank", str(digits_ckpt), *LOWRANK_ARGS, "--out", str(cut))
    nth = rng.randint(1, 4)  # never the last epoch (5)
    faults.kill_at_event(argv, tmp_path, "epoch_saved", nth, rng)
    assert not cut.exists()
    done = torch.load(cut.with_suffix(".resume.pt"), weights_only=True)["next_epoch"]
    assert nth <= done <= 5  # running on may pass one more save, the last included
    out = faults.run_to_end(argv + ["--resume", "--json"])
    assert json.loads(out.stdout)["finetune"]["resumed_from"] == done
    a, _ = load_checkpoint(ref)
    b, _ = load_checkpoint(cut)
    assert_same_state(a, b)
    la = json.loads(ref.with_suffix(".json").read_text())["finetune"]
    lb = json.loads(cut.with_suffix(".json").read_text())["finetune"]
    assert la["losses"] == lb["losses"] and la["distill"] == lb["distill"]
