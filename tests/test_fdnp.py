"""fdnp(): targets, bands, report, exact resume, second-order criterion, errors; the CLI."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from woodfisher import load_checkpoint
from woodfisher.cli import app
from woodfisher.data import synthetic
from woodfisher.frequency import DCTConv2d, FDNPError, fdnp, prune_oneshot
from woodfisher.frequency.dct import band_index
from woodfisher.models import build_model
from woodfisher.train import train_and_save

SHAPE = (1, 8, 8)
FAST = {"batch_size": 32, "lr": 0.02}


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("cnn", input_shape=SHAPE, num_classes=3)


def _data(n: int = 192):
    return synthetic(n=n, input_shape=SHAPE, num_classes=3, seed=1)


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def _equal_states(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("band_adaptive", [False, True])
def test_target_bands_and_report(band_adaptive):
    model = _model()
    rep = fdnp(model, _data(), compression=5, epochs=2, band_adaptive=band_adaptive,
               progress=False, test_data=_data(64), **FAST)
    assert rep["method"] == ("ba-fdnp" if band_adaptive else "fdnp")
    assert isinstance(model.conv1, DCTConv2d) and isinstance(model.conv2, DCTConv2d)
    numel = 16 * 9 + 32 * 16 * 9
    assert rep["compression"] == pytest.approx(numel / round(numel / 5))
    assert [r["epoch"] for r in rep["history"]] == [1, 2]
    assert rep["history"][-1]["compression"] == pytest.approx(rep["compression"])
    assert rep["history"][0]["mask_updates"] > 0
    # Per-band kept fractions, against a count of the masks.
    bands = band_index(3)
    for row in rep["layers"]:
        mask = model.get_submodule(row["name"]).weight_mask.bool()
        assert row["kept"] == int(mask.sum())
        for b, frac in enumerate(row["bands"]):
            assert frac == pytest.approx(float(mask[..., bands == b].float().mean()))
    total = rep["bands"]["3x3"]
    assert total["sizes"] == [1, 2, 3, 2, 1]
    kept = sum(f * s for f, s in zip(total["kept_fraction"], total["sizes"], strict=True))
    assert kept * (numel // 9) == pytest.approx(numel / rep["compression"])
    # MACs: conv1 runs at 8×8 output positions, conv2 (after a 2×2 max-pool) at 4×4.
    kept1, kept2 = (r["kept"] for r in rep["layers"])
    dense = 16 * 9 * 64 + 32 * 16 * 9 * 16
    assert rep["cost"]["selected"]["speedup_multiply_only"] == pytest.approx(
        dense / (kept1 * 64 + kept2 * 16))
    json.dumps(rep)


def test_band_adaptive_prunes_high_frequencies_harder():
    reps = {}
    for slope in (0.0, 3.0):
        reps[slope] = fdnp(_model(), _data(), compression=4, epochs=1, band_slope=slope,
                           progress=False, **FAST)["bands"]["3x3"]["kept_fraction"]
    assert reps[3.0][-1] < reps[0.0][-1] and reps[3.0][0] >= reps[0.0][0]


def test_spatial_dns_and_fixed_c():
    model = _model()
    rep = fdnp(model, _data(), compression=None, c=0.0, epochs=1, domain="spatial",
               progress=False, **FAST)
    assert rep["method"] == "dns"
    assert type(model.conv1) is torch.nn.Conv2d and hasattr(model.conv1, "weight_mask")
    assert all(r["c"] == 0.0 and "bands" not in r for r in rep["layers"])
    assert 1 < rep["compression"] < 10


def test_pruned_coefficients_come_back():
    model = _model()
    rep = fdnp(model, _data(), compression=4, epochs=2, ramp=0.0, stop=1.0, gamma=0.0,
               progress=False, **FAST)
    assert sum(r["spliced"] for r in rep["history"]) > 0


def test_resume_equals_uninterrupted(tmp_path):
    opts = dict(compression=4, epochs=3, band_adaptive=True, seed=3, progress=False, **FAST)
    ref = _model()
    ref_rep = fdnp(ref, _data(), **opts)

    class Killed(Exception):
        pass

    def kill_after_first(history):
        if len(history) == 1:
            raise Killed

    with pytest.raises(Killed):
        fdnp(_model(), _data(), resume_path=tmp_path / "r.pt", callback=kill_after_first, **opts)
    resumed = _model()
    rep = fdnp(resumed, _data(), resume_path=tmp_path / "r.pt", resume=True, **opts)
    assert rep["resumed_from"] == 1
    _equal_states(ref, resumed)
    assert _strip_times(rep["history"]) == _strip_times(ref_rep["history"])
    with pytest.raises(FDNPError, match="another run or model"):
        fdnp(_model(), _data(), resume_path=tmp_path / "r.pt", resume=True,
             **{**opts, "seed": 4})


def test_woodfisher_criterion_runs_and_hits_the_target():
    rep = fdnp(_model(), _data(), compression=4, epochs=1, criterion="woodfisher",
               fisher_num_grads=32, fisher_block_size=64, progress=False, **FAST)
    assert rep["method"] == "ba-fdnp+woodfisher"
    assert rep["compression"] == pytest.approx(4, rel=0.01)
    assert "fisher_seconds" in rep["history"][0]


def test_oneshot_obs_on_coefficients():
    model = _model()
    x = torch.randn(64, *SHAPE)
    data = [(x[i:i + 16], torch.randint(0, 3, (16,))) for i in range(0, 64, 16)]
    res = prune_oneshot(model, data, 4, method="woodfisher", num_grads=64, block_size=64,
                        recompute=1)
    assert res["layers"] == ["conv1", "conv2"] and isinstance(model.conv2, DCTConv2d)
    assert res["prune"]["sparsity"] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"compression": 1}, "compression must be a finite ratio > 1"),
        ({"compression": -2}, "compression must be a finite ratio > 1"),
        ({"compression": None}, "give a compression target"),
        ({"domain": "time"}, "unknown domain"),
        ({"criterion": "kfac"}, "unknown criterion"),
        ({"ramp": 2.0}, "ramp must be a fraction"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"nonsense": 1}, "bad fdnp option"),
    ],
)
def test_bad_options(kw, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FDNPError, match=match):
        fdnp(model, _data(), **{"compression": 4, **kw}, progress=False)
    assert type(model.conv1) is torch.nn.Conv2d  # untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_model_without_eligible_convs():
    net = build_model("mlpnet-small", input_shape=SHAPE, num_classes=3)
    with pytest.raises(FDNPError, match="no conv of the model can be pruned"):
        fdnp(net, _data(), compression=4, progress=False)


# --- command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "cnn.pt"
    torch.manual_seed(0)
    train_and_save("cnn", "digits", out=str(path), epochs=2, progress=False)
    return path


CLI_ARGS = ["--compression", "4", "--epochs", "3", "--batch-size", "32", "--train-subset", "480",
            "-q"]


def test_cli_fdnp_writes_everything(digits_ckpt, tmp_path):
    out = tmp_path / "f.pt"
    runner = CliRunner()
    res = runner.invoke(app, ["fdnp", str(digits_ckpt), "--out", str(out), "--compression", "6",
                              "--epochs", "2", "--batch-size", "32", "--train-subset", "320",
                              "--band-adaptive", "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["compression"] == pytest.approx(6, rel=0.01)
    log = json.loads(out.with_suffix(".json").read_text())
    assert [r["epoch"] for r in log["history"]] == [1, 2]
    assert log["report"]["layers"][0]["bands"]
    for suffix in (".png", ".bands.png"):
        assert out.with_suffix(suffix).read_bytes()[:4] == b"\x89PNG"
    model, info = load_checkpoint(out)
    assert isinstance(model.conv2, DCTConv2d) and hasattr(model.conv2, "weight_mask")
    ev = runner.invoke(app, ["evaluate", str(out), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["accuracy"] == summary["test_accuracy"]
    table = runner.invoke(app, ["fdnp", str(digits_ckpt), "--out", str(tmp_path / "g.pt"),
                                "--compression", "6", "--epochs", "1", "--train-subset", "64",
                                "--domain", "spatial", "-q"])
    assert table.exit_code == 0, table.output
    assert "dns: kept coefficients per layer" in table.output and "speed-up" in table.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--compression", "0.5"], "compression must be a finite ratio > 1"),
        (["--domain", "time"], "unknown domain"),
        (["--layers", "fc"], "matches no Conv2d"),
    ],
)
def test_cli_bad_input_exit_2(digits_ckpt, tmp_path, args, match):
    res = CliRunner().invoke(app, ["fdnp", str(digits_ckpt), "--out", str(tmp_path / "f.pt"),
                                   "--epochs", "1", "-q", *args])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert not (tmp_path / "f.pt").exists()


@pytest.mark.slow  # two CLI runs and a killed subprocess: about a minute on 2 busy cores
def test_sigkill_then_resume_equals_uninterrupted(digits_ckpt, tmp_path):
    """Kill a real CLI run with SIGKILL mid-way, resume it, compare with an uninterrupted run."""
    ref, cut = tmp_path / "ref.pt", tmp_path / "cut.pt"
    runner = CliRunner()
    res = runner.invoke(app, ["fdnp", str(digits_ckpt), "--out", str(ref), *CLI_ARGS])
    assert res.exit_code == 0, res.output
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "woodfisher.cli", "fdnp", str(digits_ckpt), "--out", str(cut),
         *CLI_ARGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    resume = cut.with_suffix(".resume.pt")
    deadline = time.monotonic() + 120
    while not resume.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resume.exists(), proc.stderr.read().decode() if proc.poll() is not None else ""
    time.sleep(random.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not cut.exists()
    done = torch.load(resume, weights_only=True)["next_epoch"]
    assert 1 <= done < 3
    res = runner.invoke(app, ["fdnp", str(digits_ckpt), "--out", str(cut), *CLI_ARGS,
                              "--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["resumed_from"] == done
    a, _ = load_checkpoint(ref)
    b, _ = load_checkpoint(cut)
    _equal_states(a, b)
    la = json.loads(ref.with_suffix(".json").read_text())["history"]
    lb = json.loads(cut.with_suffix(".json").read_text())["history"]
    assert _strip_times(la) == _strip_times(lb)
