"""Mismatch analysis and proxies against hand-built predictions, explicit loops and dense
oracles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from woodfisher.gradients import sample_gradients
from woodfisher.longtail import (
    Memorization,
    analyze_predictions,
    disagreement_frequency,
    exemplars,
    margins,
    mismatch_analysis,
    modal,
    rank_agreement,
    self_influence,
    self_influences,
)
from woodfisher.longtail.mismatch import check_bins
from woodfisher.longtail.report import summary_table, to_json, write_report
from woodfisher.longtail.stats import benjamini_hochberg, wilson


def test_modal_breaks_ties_to_the_smaller_label():
    preds = torch.tensor([[1, 2, 0], [2, 1, 0], [0, 0, 2]])
    assert modal(preds, 3).tolist() == [0, 0, 0]
    assert modal(torch.tensor([[1, 2], [2, 1]]), 3).tolist() == [1, 1]


def test_exemplars_and_disagreement_frequency_by_hand():
    dense = torch.tensor([[0, 1, 2, 2], [0, 1, 2, 1]])
    comp = torch.tensor([[0, 2, 2, 1], [1, 2, 2, 1], [0, 2, 0, 1]])
    assert exemplars(dense, comp, 3).tolist() == [False, True, False, False]  # tie 1|2 -> 1
    # pairs (c0, d0), (c1, d1), (c2, d0)
    assert disagreement_frequency(dense, comp).tolist() == pytest.approx(
        [1 / 3, 1.0, 1 / 3, 2 / 3])


def _planted(seed: int = 0):
    """Train labels; memorization in all four bins; an arm that loses exactly mem >= 0.5."""
    g = torch.Generator().manual_seed(seed)
    mem = torch.cat([torch.zeros(100), torch.full((40,), 0.1), torch.full((30,), 0.3),
                     torch.full((30,), 0.7)])
    n = len(mem)
    y = torch.randint(0, 10, (n,), generator=g)
    yt = torch.randint(0, 10, (60,), generator=g)
    dense = y.repeat(3, 1)
    arm = dense.clone()
    arm[:, mem >= 0.5] = (y[mem >= 0.5] + 1) % 10
    control = dense.clone()
    control[:, torch.randperm(n, generator=g)[:20]] = 9 - y[torch.randperm(n, generator=g)[:20]]
    noise = lambda p: torch.where(torch.rand(p.shape, generator=g) < 0.1,  # noqa: E731
                                  torch.randint(0, 10, p.shape, generator=g), p)
    dense_t = noise(yt.repeat(3, 1))
    arm_t = noise(yt.repeat(3, 1))
    arm_t[:, yt == 2] = noise(torch.full_like(arm_t[:, yt == 2], 3))
    margin = torch.linspace(0, 1, n)
    return mem, y, yt, (dense, dense_t), (arm, arm_t), (control, noise(yt.repeat(3, 1))), margin


def test_analysis_recovers_a_planted_memorization_effect():
    mem, y, yt, dense, arm, control, margin = _planted()
    a = analyze_predictions(dense, {"arm": arm}, y, yt, mem, margin, control=control,
                            bootstrap=200)
    m = a["arms"]["arm"]["memorization"]
    assert [b["rate"] for b in m["bins"]] == [0.0, 0.0, 0.0, 1.0]
    assert [b["n"] for b in m["bins"]] == [100, 40, 30, 30]
    assert m["bins"][3]["ci"] == list(wilson(30, 30))
    assert m["auroc"] == 1.0 and m["mann_whitney"]["p"] < 1e-10
    assert a["arms"]["arm"]["exemplars"]["train"]["count"] == 30
    assert a["arms"]["arm"]["train"]["disagreement"]["mean"] == pytest.approx(30 / 200)
    ctrl = a["arms"]["control (dense reseed)"]["memorization"]
    assert ctrl["auroc"] < 0.8
    vs = a["arms"]["arm"]["vs_control"]
    assert vs["auroc_difference"] > 0.2 and vs["auroc_difference_ci"][0] > 0
    json.dumps(to_json(a), allow_nan=False)  # the report is strict JSON


def test_per_class_welch_and_bh_match_explicit_loops():
    mem, y, yt, dense, arm, control, margin = _planted(seed=1)
    a = analyze_predictions(dense, {"arm": arm}, y, yt, mem, margin, bootstrap=10,
                            num_classes=10)
    rows = a["arms"]["arm"]["per_class"]

    def normalised(preds, k):
        return [float((p[yt == k] == k).float().mean() - (p == yt).float().mean())
                for p in preds]

    ps = []
    for k in range(10):
        d, c = normalised(dense[1], k), normalised(arm[1], k)
        ref = sps.ttest_ind(c, d, equal_var=False)
        ps.append(ref.pvalue)
        assert rows[k]["t"] == pytest.approx(ref.statistic, nan_ok=True)
        assert rows[k]["normalised_delta"] == pytest.approx(np.mean(c) - np.mean(d))
    np.testing.assert_allclose([r["q"] for r in rows], benjamini_hochberg(np.array(ps)), rtol=1e-4)
    assert rows[2]["delta"] < -0.5  # the arm predicts class 2 as 3


def test_bins_and_shapes_are_checked():
    mem, y, yt, dense, arm, control, margin = _planted()
    with pytest.raises(ValueError, match="too few"):
        check_bins([0.05, 0.25, 0.5], 39)
    with pytest.raises(ValueError, match="increase strictly"):
        check_bins([0.5, 0.25], 1000)
    with pytest.raises(ValueError, match="too few"):
        analyze_predictions((dense[0][:, :20], dense[1]), {"a": (arm[0][:, :20], arm[1])},
                            y[:20], yt, mem[:20], margin[:20])
    with pytest.raises(ValueError, match="cover"):
        analyze_predictions(dense, {"a": (arm[0][:, :-1], arm[1])}, y, yt, mem, margin)
    with pytest.raises(ValueError, match="one value per training example"):
        analyze_predictions(dense, {"a": arm}, y, yt, mem[:-1], margin)


@pytest.fixture(scope="module")
def tiny():
    from torch.utils.data import TensorDataset

    from woodfisher.data import load_dataset
    from woodfisher.models import build_model
    from woodfisher.train import train

    s = load_dataset("digits")
    X, y = s.train.tensors
    Xt, yt = s.test.tensors
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = build_model("mlpnet-small", (1, 8, 8), 10)
        train(m, TensorDataset(X[:300], y[:300]), epochs=3, seed=seed, progress=False)
        models.append(m)
    return X[:300], y[:300], Xt[:80], yt[:80], models


def test_mismatch_analysis_on_models_with_a_memorization_result(tiny, tmp_path):
    X, y, Xt, yt, models = tiny
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 300, generator=g) < 0.7
    mem = Memorization(torch.rand(300, generator=g), torch.zeros(300), masks,
                       torch.rand(6, 300, generator=g) < 0.8, torch.rand(6, 80, generator=g) < 0.8,
                       {})
    pruned = []
    for m in models[:2]:
        p = type(m)((1, 8, 8), 10, hidden=(40, 20))
        p.load_state_dict(m.state_dict())
        with torch.no_grad():
            p.fc1.weight.mul_(torch.rand(p.fc1.weight.shape, generator=g) > 0.6)
        pruned.append(p)
    a = mismatch_analysis(models[:2], {"pruned": pruned}, (X, y), (Xt, yt), mem,
                          control=models[2:], bootstrap=50)
    assert set(a["arms"]) == {"pruned", "control (dense reseed)"}
    assert "test_scores" in a["arms"]["pruned"]
    expect = (modal(torch.stack([p(X).argmax(1) for p in pruned]), 10)
              != modal(torch.stack([m(X).argmax(1) for m in models[:2]]), 10))
    assert a["arms"]["pruned"]["exemplars"]["train"]["count"] == int(expect.sum())
    assert str(summary_table(a).title).startswith("mismatches")
    paths = write_report(a, tmp_path / "r", X, y, "digits")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert json.loads(paths["json"].read_text())["analysis"]["arms"]["pruned"]["models"] == 2


# ---------------------------------------------------------------------------- proxies


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(50, 1, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    return net, X, y


def _loop_grads(net, X, y):
    rows = []
    for i in range(len(X)):
        net.zero_grad()
        nn.functional.cross_entropy(net(X[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([net[1].weight.grad.flatten(), net[3].weight.grad.flatten()]))
    return torch.stack(rows)


def test_self_influence_matches_dense_oracles(small_net):
    net, X, y = small_net
    G = _loop_grads(net, X, y)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:30]
    Gf = sample_gradients(net, (X[order], y[order]), num_grads=30)
    F = Gf.T @ Gf / 30
    damp = 1e-2 * F.diagonal().mean()
    full = self_influence(net, X, y, "woodfisher", num_grads=30, block_size=None, chunk_size=7)
    expect = (G * torch.linalg.solve(F + damp * torch.eye(len(F), dtype=F.dtype), G.T).T).sum(1)
    torch.testing.assert_close(full, expect)
    diag = self_influence(net, X, y, "diagonal", num_grads=30)
    torch.testing.assert_close(diag, (G.pow(2) / (F.diagonal() + damp)).sum(1))
    torch.testing.assert_close(self_influence(net, X, y, "identity"), G.pow(2).sum(1))
    both = self_influences(net, X, y, ("identity", "diagonal"), num_grads=30, chunk_size=9)
    torch.testing.assert_close(both["diagonal"], diag)
    with pytest.raises(ValueError, match="unknown self-influence method"):
        self_influence(net, X, y, "hessian")


def test_margins_by_hand(small_net):
    net, X, y = small_net
    out = margins(net, X, y)
    logits = net(X).detach()
    for i in range(5):
        others = [float(logits[i, c]) for c in range(3) if c != int(y[i])]
        assert float(out["margin"][i]) == pytest.approx(float(logits[i, y[i]]) - max(others))
    assert out["prediction"].tolist() == logits.argmax(1).tolist()


def test_rank_agreement_with_ties_at_zero():
    scores = torch.cat([torch.zeros(90), torch.linspace(0.1, 0.9, 10), torch.tensor([math.nan])])
    perfect = torch.nan_to_num(scores, nan=0.0)
    res = rank_agreement({"perfect": perfect, "reversed": -perfect}, scores)
    assert res["perfect"]["auroc_top"] == 1.0 and res["perfect"]["top_count"] <= 10
    assert res["perfect"]["spearman"] == pytest.approx(1.0)
    assert res["reversed"]["auroc_top"] == 0.0
    with pytest.raises(ValueError, match="top"):
        rank_agreement({"p": perfect}, scores, top=1.5)
