"""Gradual pruning: schedule, masks, momentum, resume (in-process and after SIGKILL), errors."""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from typer.testing import CliRunner

import faults
from conftest import assert_same_state
from woodfisher.checkpoint import load_checkpoint
from woodfisher.cli import app
from woodfisher.data import synthetic
from woodfisher.gradual import (
    GRADUAL_RELATIVE_DAMP,
    GradualConfig,
    GradualError,
    gradual,
)
from woodfisher.models import build_model
from woodfisher.params import flat_masks, select_modules
from woodfisher.pruning import prune, pruning_steps
from woodfisher.resume import ordered_params
from woodfisher.train import masked_parameters, train, train_and_save

SHAPE = (1, 8, 8)
WF = {"num_grads": 32, "block_size": 32}


def _data():
    return synthetic(n=256, input_shape=SHAPE, num_classes=4, seed=1)


@functools.cache
def _trained_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(name, SHAPE, num_classes=4)
    train(model, _data(), epochs=2, lr=0.05, batch_size=32, progress=False)
    return model.state_dict()


def _model(name: str = "mlpnet-small"):
    """A fresh copy of the same briefly trained model (trained once per test session)."""
    model = build_model(name, SHAPE, num_classes=4)
    model.load_state_dict(_trained_state(name))
    return model


def _cfg(**kw):
    base = {"final_sparsity": 0.9, "epochs": 4, "method": "magnitude", "lr": 0.02,
            "batch_size": 32}
    return GradualConfig(**{**base, **kw})


def _strip_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in history]


@pytest.mark.parametrize(("method", "options"), [("magnitude", {}), ("woodfisher", WF)])
def test_schedule_masks_and_momentum_after_every_epoch(tmp_path, method, options):
    model, resume = _model(), tmp_path / "r.pt"
    cfg = _cfg(method=method, prune_options=options, epochs=5, initial_sparsity=0.4)
    modules = select_modules(model)
    d = flat_masks(modules).numel()
    expected = pruning_steps(0.4, 0.9, 0, cfg.last_prune_epoch(), 1)
    seen = []

    def check(history):
        row = history[-1]
        epoch = row["epoch"] - 1
        target = [s for e, s in expected.items() if e <= epoch][-1]
        assert int((~flat_masks(modules)).sum()) == round(target * d)
        if epoch in expected:
            assert row["pruned_to"] == expected[epoch]
        for _, orig, mask in masked_parameters(model):
            assert torch.all(orig[mask == 0] == 0)
        # The momentum as saved for resume: indices follow the canonical parameter order.
        state = torch.load(resume, weights_only=True)
        names = sorted(
            (n for n, _ in model.named_parameters()), key=lambda n: n.removesuffix("_orig")
        )
        params = dict(model.named_parameters())
        for i, name in enumerate(names):
            mask = getattr(_owner(model, name), "weight_mask", None)
            if name.endswith("weight_orig"):
                buf = state["optimizer"]["state"][i]["momentum_buffer"]
                assert buf.shape == params[name].shape
                assert torch.all(buf[mask == 0] == 0), name
                assert (buf != 0).any()
        seen.append(epoch)

    res = gradual(model, _data(), cfg, resume_path=resume, progress=False, callback=check)
    assert seen == list(range(5))
    assert [r["sparsity"] for r in res.history][-1] == round(0.9 * d) / d


@pytest.mark.parametrize(
    ("method", "options", "relative"),
    [
        ("woodfisher", WF, GRADUAL_RELATIVE_DAMP),
        ("woodfisher", {**WF, "relative_damp": 0.5}, 0.5),
        ("woodfisher", {**WF, "damp": 1e-3}, None),
        ("diag-fisher", {"num_grads": 32}, 1e-2),
        ("magnitude", {}, None),
    ],
)
def test_pruning_steps_use_the_gradual_damp_unless_told(method, options, relative):
    cfg = _cfg(method=method, prune_options=options, epochs=3)
    res = gradual(_model(), _data(), cfg, progress=False)
    steps = [r for r in res.history if "pruned_to" in r]
    assert steps and all(r["relative_damp"] == relative for r in steps)
    if "damp" in options:
        assert all(r["damp"] == options["damp"] for r in steps)


def test_fingerprint_and_pruner_options_carry_the_effective_damp():
    model = _model()
    default = _cfg(method="woodfisher", prune_options=WF)
    explicit = _cfg(method="woodfisher", prune_options={**WF, "relative_damp": 0.5})
    assert default.fingerprint(model) != explicit.fingerprint(model)
    assert default.pruner_options()["relative_damp"] == GRADUAL_RELATIVE_DAMP
    assert "relative_damp" not in _cfg(prune_options={}).pruner_options()
    taylor = _cfg(method="woodtaylor", prune_options=WF).pruner_options()
    assert taylor["relative_damp"] == GRADUAL_RELATIVE_DAMP


def _owner(model, name):
    return model.get_submodule(name.rpartition(".")[0])


def test_prune_keeps_parameter_objects_so_the_optimizer_stays_valid():
    model = _model()
    before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(ordered_params(model), lr=0.1, momentum=0.9)
    prune(model, [next(iter(torch.utils.data.DataLoader(_data(), batch_size=64)))], 0.5,
          method="woodfisher", **WF)
    after = dict(model.named_parameters())
    assert after["fc1.weight_orig"] is before["fc1.weight"]
    assert after["fc1.bias"] is before["fc1.bias"]
    assert [p for g in opt.param_groups for p in g["params"]] == ordered_params(model)


@pytest.mark.parametrize(("method", "options"), [("magnitude", {}), ("woodfisher", WF)])
def test_resume_equals_uninterrupted(tmp_path, method, options):
    cfg = _cfg(method=method, prune_options=options, epochs=4)
    ref = _model()
    full = gradual(ref, _data(), cfg, test_data=_data(), progress=False)

    class Stop(Exception):
        pass

    def stop_after_2(history):
        if len(history) == 2:
            raise Stop

    part = _model()
    with pytest.raises(Stop):
        gradual(part, _data(), cfg, resume_path=tmp_path / "r.pt", progress=False,
                callback=stop_after_2)
    fresh = _model()
    res = gradual(fresh, _data(), cfg, test_data=_data(), resume_path=tmp_path / "r.pt",
                  resume=True, progress=False)
    assert res.resumed_from == 2
    assert_same_state(fresh, ref)
    for (_, a, ma), (_, b, mb) in zip(masked_parameters(fresh), masked_parameters(ref),
                                      strict=True):
        assert torch.equal(ma, mb) and torch.equal(a, b)
    assert _strip_times(res.history)[2:] == _strip_times(full.history)[2:]
    assert res.final["test_accuracy"] == full.final["test_accuracy"]


def test_batchnorm_model_trains_in_train_mode(tmp_path):
    model = _model("cnn")
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    res = gradual(model, _data(), _cfg(epochs=2), progress=False)
    assert not torch.equal(bn.running_mean, before)
    assert not model.training
    assert res.final["sparsity"] == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"final_sparsity": 0.3, "initial_sparsity": 0.5}, "below the initial"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"epochs": 3, "end": 3}, "< epochs"),
        ({"method": "nope"}, "unknown method"),
        ({"prune_options": {"seed": 1}}, "unknown prune options"),
        ({"lr": float("nan")}, "lr must be"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(GradualError, match=match):
        gradual(_model(), _data(), _cfg(**kw), progress=False)


def test_bad_resume_files(tmp_path):
    resume = tmp_path / "r.pt"
    gradual(_model(), _data(), _cfg(epochs=2), resume_path=resume, progress=False)
    with pytest.raises(GradualError, match="another run or model"):
        gradual(_model(), _data(), _cfg(epochs=2, seed=1), resume_path=resume, resume=True,
                progress=False)
    other = _model()
    with torch.no_grad():
        other.fc1.weight.add_(1e-3)
    with pytest.raises(GradualError, match="another run or model"):
        gradual(other, _data(), _cfg(epochs=2), resume_path=resume, resume=True,
                progress=False)
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(GradualError, match="not a gradual resume file"):
        gradual(_model(), _data(), _cfg(), resume_path=tmp_path / "x.pt", resume=True,
                progress=False)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(GradualError, match="not a gradual resume file"):
        gradual(_model(), _data(), _cfg(), resume_path=tmp_path / "junk.pt", resume=True,
                progress=False)
    with pytest.raises(GradualError, match="no resume file"):
        gradual(_model(), _data(), _cfg(), resume_path=tmp_path / "none.pt", resume=True,
                progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_resume_file(tmp_path):
    resume, calls = tmp_path / "r.pt", {"n": 0}
    per_epoch = 256 // 32

    def loss_fn(out, y):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] > per_epoch + 3 else loss

    # prune() calls the loss too, so count only fine-tuning batches: magnitude needs none.
    with pytest.raises(GradualError, match="non-finite fine-tuning loss.*epoch 2"):
        gradual(_model(), _data(), _cfg(), loss_fn=loss_fn, resume_path=resume, progress=False)
    state = torch.load(resume, weights_only=True)
    assert state["next_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# --- command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "dense.pt"
    torch.manual_seed(0)
    train_and_save("mlpnet-small", "digits", out=str(path), epochs=3, progress=False)
    return path


GRADUAL_ARGS = ["--sparsity", "0.9", "--epochs", "6", "--method", "magnitude", "--lr", "0.02",
                "--batch-size", "16", "--train-subset", "640", "-q"]


def test_cli_gradual_writes_everything(digits_ckpt, tmp_path):
    out = tmp_path / "g.pt"
    runner = CliRunner()
    res = runner.invoke(app, ["gradual", "--checkpoint", str(digits_ckpt), "--out", str(out),
                              "--sparsity", "0.8", "--epochs", "2", "--method", "woodfisher",
                              "--num-grads", "32", "--block-size", "32",
                              "--relative-damp", "0.5", "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["pruned_sparsity"] == pytest.approx(0.8, abs=1e-3)
    log = json.loads(out.with_suffix(".json").read_text())
    assert [r["epoch"] for r in log["history"]] == [1, 2]
    assert log["history"][0]["relative_damp"] == 0.5
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert out.with_suffix(".resume.pt").is_file()
    ev = runner.invoke(app, ["evaluate", str(out), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert json.loads(ev.stdout)["accuracy"] == summary["accuracy"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--sparsity", "0.3", "--initial-sparsity", "0.5"], "below the initial"),
        (["--epochs", "0"], "epochs must be"),
        (["--lr", "1e30", "--epochs", "1"], "non-finite fine-tuning loss"),
        (["--damp", "x"], "--damp must be"),
        (["--damp", "0.1", "--relative-damp", "1"], "not both"),
        (["--relative-damp", "-1"], "relative_damp must be"),
    ],
)
def test_cli_bad_input_exit_2(digits_ckpt, tmp_path, args, match):
    res = CliRunner().invoke(app, ["gradual", str(digits_ckpt), "--out",
                                   str(tmp_path / "g.pt"), "--method", "magnitude", "-q", *args])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert not (tmp_path / "g.pt").exists()


def test_cli_resume_mismatch_and_foreign_file_exit_2(digits_ckpt, tmp_path):
    out = tmp_path / "g.pt"
    runner = CliRunner()
    base = ["gradual", str(digits_ckpt), "--out", str(out), "--method", "magnitude", "-q",
            "--epochs", "2"]
    assert runner.invoke(app, base).exit_code == 0
    res = runner.invoke(app, [*base, "--seed", "3", "--resume"])
    assert res.exit_code == 2 and "another run or model" in res.output
    # A checkpoint where the resume file should be.
    out.with_suffix(".resume.pt").write_bytes(digits_ckpt.read_bytes())
    res = runner.invoke(app, [*base, "--resume"])
    assert res.exit_code == 2 and "not a gradual resume file" in res.output


@pytest.mark.slow  # four fresh processes, each importing torch: ~20 s idle, minutes when busy
@pytest.mark.parametrize("method", ["magnitude", "woodfisher"])
def test_sigkill_three_times_then_resume_equals_uninterrupted(digits_ckpt, tmp_path, method):
    """Kill a real CLI run with SIGKILL at three random events, resume each time, and compare
    with an uninterrupted run: weights and masks bit-identical, histories equal but timings."""
    ref, cut = tmp_path / "ref.pt", tmp_path / "cut.pt"
    args = [a if a != "magnitude" else method for a in GRADUAL_ARGS]
    if method == "woodfisher":
        args += ["--num-grads", "32", "--block-size", "64"]
    res = CliRunner().invoke(app, ["gradual", str(digits_ckpt), "--out", str(ref), *args])
    assert res.exit_code == 0, res.output
    rng = random.Random(0)
    argv = faults.cli_command("gradual", str(digits_ckpt), "--out", str(cut), *args)
    done = 0
    for _ in range(3):
        # Never the last epoch (6): the kill must land mid-run.
        nth = rng.randint(1, 5 - done)
        faults.kill_at_event(argv + (["--resume"] if done else []), tmp_path, "epoch_saved",
                             nth, rng)
        assert not cut.exists()
        now = torch.load(cut.with_suffix(".resume.pt"), weights_only=True)["next_epoch"]
        # Letting it run on past event nth can take it through the next epoch's save (the 6th
        # and last included), where it waits at the gate before writing its outputs.
        assert done < now <= 6
        done = now
        if done >= 5:
            break
    out = faults.run_to_end(argv + ["--resume", "--json"])
    assert json.loads(out.stdout)["resumed_from"] == done
    a, _ = load_checkpoint(ref)
    b, _ = load_checkpoint(cut)
    assert_same_state(a, b)
    la = json.loads(ref.with_suffix(".json").read_text())["history"]
    lb = json.loads(cut.with_suffix(".json").read_text())["history"]
    assert _strip_times(la) == _strip_times(lb)
