"""fdnp(): targets, bands, report, exact resume, second-order criterion, errors; the CLI."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from typer.testing import CliRunner

import faults
from conftest import assert_same_state
from woodfisher import events, load_checkpoint
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


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    opts = dict(compression=4, epochs=3, band_adaptive=True, seed=3, progress=False, **FAST)
    ref = _model()
    ref_rep = fdnp(ref, _data(), **opts)

    class Killed(Exception):
        pass

    def kill_after_first(history):
        if len(history) == 1:
            raise Killed

    log = tmp_path / "events.jsonl"
    monkeypatch.setenv(events.LOG_ENV, str(log))
    with pytest.raises(Killed):
        fdnp(_model(), _data(), resume_path=tmp_path / "r.pt", callback=kill_after_first, **opts)
    # Killed inside the callback: the resume file is written but the epoch is not announced.
    assert not log.exists()
    resumed = _model()
    rep = fdnp(resumed, _data(), resume_path=tmp_path / "r.pt", resume=True, **opts)
    assert rep["resumed_from"] == 1
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["epoch"], e["resume"]) for e in seen] == [
        ("epoch_saved", n, str(tmp_path / "r.pt")) for n in (2, 3)]
    assert_same_state(ref, resumed)
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


EPOCHS = 5  # of the killed CLI run: kills after epochs 1..3 leave it mid-run
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


@pytest.mark.slow  # an uninterrupted CLI run and up to four fresh processes: a minute or more
def test_sigkill_then_resume_equals_uninterrupted(digits_ckpt, tmp_path):
    """Kill a real CLI run with SIGKILL at random saved epochs (never the last), resume each
    time, and compare with an uninterrupted run: weights and masks bit-identical, histories
    equal but timings. The kill waits for the job's own events, not for wall time."""
    ref, cut = tmp_path / "ref.pt", tmp_path / "cut.pt"
    args = [*CLI_ARGS[:2], "--epochs", str(EPOCHS), *CLI_ARGS[4:]]
    runner = CliRunner()
    res = runner.invoke(app, ["fdnp", str(digits_ckpt), "--out", str(ref), *args])
    assert res.exit_code == 0, res.output
    rng = random.Random(0)
    argv = faults.cli_command("fdnp", str(digits_ckpt), "--out", str(cut), *args)
    done = 0
    while done < EPOCHS - 2:
        # The kill lands at the nth event or up to one epoch later: before the last epoch ends.
        nth = rng.randint(1, EPOCHS - 2 - done)
        faults.kill_at_event(argv + (["--resume"] if done else []), tmp_path, "epoch_saved",
                             nth, rng)
        assert not cut.exists()
        now = torch.load(cut.with_suffix(".resume.pt"), weights_only=True)["next_epoch"]
        assert done < now < EPOCHS
        done = now
    out = faults.run_to_end(argv + ["--resume", "--json"])
    assert json.loads(out.stdout)["resumed_from"] == done
    a, _ = load_checkpoint(ref)
    b, _ = load_checkpoint(cut)
    assert_same_state(a, b)
    la = json.loads(ref.with_suffix(".json").read_text())["history"]
    lb = json.loads(cut.with_suffix(".json").read_text())["history"]
    assert _strip_times(la) == _strip_times(lb)
