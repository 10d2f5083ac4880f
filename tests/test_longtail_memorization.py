"""Feldman–Zhang memorization: the estimator against explicit loops, reproducibility across
workers and resumes, a planted check and bad input."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from woodfisher.data import load_dataset
from woodfisher.longtail import Memorization, estimate, memorization
from woodfisher.longtail.stats import auroc
from woodfisher.models import build_model


@pytest.fixture(scope="module")
def digits():
    s = load_dataset("digits")
    X, y = s.train.tensors
    Xt, yt = s.test.tensors
    return X[:160], y[:160], Xt[:50], yt[:50]


def _loop_estimate(masks, correct):
    K, n = masks.shape
    out = []
    for i in range(n):
        inside = [bool(correct[k, i]) for k in range(K) if masks[k, i]]
        outside = [bool(correct[k, i]) for k in range(K) if not masks[k, i]]
        if not inside or not outside:
            out.append((math.nan, math.nan))
            continue
        a, b = np.mean(inside), np.mean(outside)
        se = math.sqrt(a * (1 - a) / len(inside) + b * (1 - b) / len(outside))
        out.append((a - b, se))
    return out


def test_estimate_and_influence_match_explicit_loops():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 30, generator=g) < 0.7
    masks[:, 0] = True  # example 0 is never held out: undefined
    correct = torch.rand(12, 30, generator=g) < 0.6
    test_correct = torch.rand(12, 7, generator=g) < 0.5
    scores, se = estimate(masks, correct)
    for i, (s, e) in enumerate(_loop_estimate(masks, correct)):
        if math.isnan(s):
            assert math.isnan(float(scores[i]))
        else:
            assert float(scores[i]) == pytest.approx(s) and float(se[i]) == pytest.approx(e)
    mem = Memorization(scores.float(), se.float(), masks, correct, test_correct, {})
    infl, infl_se = mem.influence()
    for i in range(30):
        for j in range(7):
            c = test_correct[:, j]
            expect = float(c[masks[:, i]].float().mean() - c[~masks[:, i]].float().mean())
            assert float(infl[i, j]) == pytest.approx(expect, abs=1e-6, nan_ok=True)
    assert infl_se.shape == (30, 7) and infl[0].isnan().all()


def test_workers_and_resume_give_the_same_result(digits, tmp_path, monkeypatch):
    X, y, Xt, yt = digits
    kw = dict(model="mlpnet-small", epochs=2, test=(Xt, yt), progress=False)
    state = torch.get_rng_state()
    ref = memorization(X, y, runs=4, workers=1, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone
    runs = tmp_path / "runs"
    par = memorization(X, y, runs=4, workers=2, run_dir=runs, **kw)
    for name in ("masks", "train_correct", "test_correct"):
        assert torch.equal(getattr(ref, name), getattr(par, name)), name
    torch.testing.assert_close(ref.scores, par.scores, rtol=0, atol=0, equal_nan=True)
    # An interrupted job: two runs are missing; the rerun trains only those.
    (runs / "run-00001.pt").unlink()
    (runs / "run-00003.pt").unlink()
    log = tmp_path / "events.jsonl"
    monkeypatch.setenv("WOODFISHER_EVENT_LOG", str(log))
    resumed = memorization(X, y, runs=4, workers=1, run_dir=runs, **kw)
    monkeypatch.delenv("WOODFISHER_EVENT_LOG")
    assert resumed.times["trained_now"] == 2
    # Each run saved is announced once the file is there (what a fault harness waits for).
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["run"]) for e in events] == [("memorization_run_saved", 1),
                                                        ("memorization_run_saved", 3)]
    assert all(Path(e["path"]).is_file() for e in events)
    assert torch.equal(resumed.train_correct, ref.train_correct)
    more = memorization(X, y, runs=5, workers=1, run_dir=runs, **kw)
    assert more.times["trained_now"] == 1 and torch.equal(more.masks[:4], ref.masks)
    with pytest.raises(ValueError, match="another job"):
        memorization(X, y, runs=4, workers=1, run_dir=runs, **{**kw, "epochs": 3})


def test_subsets_have_the_asked_size_and_result_round_trips(digits, tmp_path):
    X, y, _, _ = digits
    builder = functools.partial(build_model, "mlpnet-small", (1, 8, 8), 10)
    mem = memorization(X, y, model=builder, runs=3, subset=0.5, epochs=1, workers=1,
                       progress=False)
    assert mem.masks.sum(1).tolist() == [80, 80, 80]
    assert mem.test_correct is None and 0 <= mem.fit <= 1
    with pytest.raises(ValueError, match="test"):
        mem.influence()
    back = Memorization.load(mem.save(tmp_path / "m.pt"))
    assert torch.equal(back.scores.nan_to_num(9), mem.scores.nan_to_num(9))
    assert back.options == mem.options


def _flip(y: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[: int(frac * len(y))]
    y = y.clone()
    y[idx] = (y[idx] + torch.randint(1, 10, (len(idx),), generator=g)) % 10
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[idx] = True
    return y, flipped


def test_planted_flipped_labels_rank_at_the_top():
    X, y = load_dataset("digits").train.tensors
    X, y = X[:300], y[:300]
    noisy, flipped = _flip(y, 0.1, seed=0)
    # Small batches and enough epochs that each run fits (memorizes) its flipped labels.
    mem = memorization(X, noisy, model="mlpnet-small", runs=10, epochs=30, batch_size=32,
                       workers=1, progress=False)
    ok = ~mem.scores.isnan()
    assert auroc(mem.scores[ok].numpy(), flipped[ok].numpy()) > 0.85
    assert mem.scores[flipped & ok].mean() > mem.scores[~flipped & ok].mean() + 0.3


def _local_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"runs": 1}, "runs must be an integer >= 2"),
        ({"model": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3))}, "one logit per"),
        ({"runs": 2.5}, "runs must be"),
        ({"subset": 1.0}, "subset must be a fraction"),
        ({"subset": 0.0}, "subset must be a fraction"),
        ({"epochs": 0}, "epochs"),
        ({"model": "no-such-net"}, "unknown model"),
        ({"model": 3}, "registry name or a callable"),
        ({"model": lambda: nn.Linear(64, 10)}, "does not run on inputs"),
        ({"workers": 2, "model": lambda: _local_net()}, "module level"),
        ({"schedule": "linear"}, "unknown schedule"),
    ],
)
def test_bad_input(digits, kwargs, match):
    X, y, _, _ = digits
    opts = {"model": "mlpnet-small", "runs": 2, "epochs": 1, "workers": 1, "progress": False}
    with pytest.raises(ValueError, match=match):
        memorization(X, y, **{**opts, **kwargs})


def test_bad_tensors(digits):
    X, y, Xt, _ = digits
    with pytest.raises(ValueError, match="same n"):
        memorization(X, y[:-1], runs=2, progress=False)
    with pytest.raises(ValueError, match="integers"):
        memorization(X, y.float(), runs=2, progress=False)
    with pytest.raises(ValueError, match="in and one out"):
        memorization(X[:3], y[:3], runs=2, subset=0.1, progress=False)
    with pytest.raises(ValueError, match="must match"):
        memorization(X, y, runs=2, test=(Xt.flatten(1), y[:50]), progress=False)
