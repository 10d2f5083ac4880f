"""``woodfisher storage``: table, JSON and PNG; bad input exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_bad, cli_ok


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    cli_ok(["train", "--model", "mlpnet-small", "--dataset", "digits", "--epochs", "3",
            "--out", str(path), "-q"])
    return path


def test_storage_writes_table_json_and_png(small_ckpt, tmp_path):
    out = tmp_path / "s.json"
    res = cli_ok(["storage", str(small_ckpt), "--strategy", "sign,adaptive,fisher",
                  "--cells", "1,1.5", "--trials", "2", "--fisher-grads", "64",
                  "--out", str(out), "-q"])
    assert "digital" in res.stdout and "skipped naive" in res.stdout
    report = json.loads(out.read_text())
    got = {(r["strategy"], r["cells"]) for r in report["results"]}
    assert got == {("naive", 1.0), ("sign", 1.0), ("sign+adaptive", 1.0),
                   ("sign+adaptive+fisher", 1.0), ("sign+adaptive+fisher", 1.5)}
    assert report["digital"]["fp32"]["cells_per_weight"] == 36.0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_storage_json_without_ladder(small_ckpt, tmp_path):
    res = cli_ok(["storage", str(small_ckpt), "--strategy", "pair", "--no-ladder",
                  "--cells", "2", "--trials", "1", "--channel", "gaussian:snr=40",
                  "--out", str(tmp_path / "p.json"), "--json", "-q"])
    report = json.loads(res.stdout)
    assert [r["strategy"] for r in report["results"]] == ["pair"]
    assert report["channel"]["name"] == "gaussian"


@pytest.mark.parametrize("args, fragment", [
    (["--strategy", "sign,wobble"], "unknown strategy token"),
    (["--cells", "0.5"], "cells must be >= 1"),
    (["--cells", "1.5", "--strategy", "sign", "--no-ladder"], "no strategy/cells combination"),
    (["--trials", "0"], "trials"),
    (["--channel", "table:/nonexistent.csv"], "cannot read channel table"),
])
def test_storage_bad_input(small_ckpt, tmp_path, args, fragment):
    out = tmp_path / "bad.json"
    cli_bad(["storage", str(small_ckpt), *args, "--out", str(out), "-q"], fragment)
    assert not out.exists() and not out.with_suffix(".png").exists()
