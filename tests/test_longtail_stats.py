"""Statistics of the long-tail analysis against scipy, scikit-learn, autograd and hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from woodfisher.longtail import stats


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 250), (1, 1)])
def test_wilson_matches_scipy(k, n):
    lo, hi = stats.wilson(k, n)
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ci.low, abs=1e-6) and hi == pytest.approx(ci.high, abs=1e-6)


def test_wilson_of_nothing_is_nan():
    assert all(math.isnan(v) for v in stats.wilson(0, 0))


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.2 + 0.1 * scores
    assert stats.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_auroc_is_mann_whitney_u_over_pairs():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.5, 1, 40), rng.normal(0, 1, 70)
    u = stats.mann_whitney(pos, neg)["u"]
    labels = np.r_[np.ones(40, bool), np.zeros(70, bool)]
    assert stats.auroc(np.r_[pos, neg], labels) == pytest.approx(u / (40 * 70))


def test_auroc_interval_brackets_the_estimate_and_one_class_is_nan():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=200)
    labels = scores + rng.normal(size=200) > 1
    lo, hi = stats.auroc_interval(scores, labels, reps=300, seed=0)
    assert lo < stats.auroc(scores, labels) < hi
    assert all(math.isnan(v) for v in stats.auroc_interval(scores, np.zeros(200), reps=10))
    assert math.isnan(stats.auroc(scores, np.ones(200)))


def test_auroc_difference_interval_sees_a_real_difference():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=400)
    strong = scores + 0.3 * rng.normal(size=400) > 1
    weak = rng.random(400) < 0.15
    lo, hi = stats.auroc_difference_interval(scores, strong, weak, reps=300)
    assert lo > 0 and hi < 1


def _nll(beta: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    eta = A @ beta
    return (torch.nn.functional.softplus(eta) - y * eta).sum()


def test_logistic_regression_matches_sklearn_and_autograd_standard_errors():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(500, 2))
    p = 1 / (1 + np.exp(-(-0.5 + 1.2 * X[:, 0] - 0.7 * X[:, 1])))
    y = (rng.random(500) < p).astype(float)
    res = stats.logistic_regression(X, y, ["a", "b"])
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(X, y)
    assert res["converged"]
    got = [res["coef"][k]["coef"] for k in ("intercept", "a", "b")]
    np.testing.assert_allclose(got, [ref.intercept_[0], *ref.coef_[0]], atol=1e-4)
    A = torch.tensor(np.c_[np.ones(500), X])
    H = torch.autograd.functional.hessian(
        lambda b: _nll(b, A, torch.tensor(y)), torch.tensor(got, dtype=torch.float64))
    se = torch.linalg.inv(H).diagonal().sqrt().numpy()
    np.testing.assert_allclose([res["coef"][k]["se"] for k in ("intercept", "a", "b")], se,
                               rtol=1e-4)
    z = res["coef"]["a"]["z"]
    assert res["coef"]["a"]["p"] == pytest.approx(2 * sps.norm.sf(abs(z)))


def test_logistic_regression_reports_separation_and_single_outcome():
    X = np.linspace(-1, 1, 50)[:, None]
    assert not stats.logistic_regression(X, (X[:, 0] > 0).astype(float))["converged"]
    flat = stats.logistic_regression(X, np.zeros(50))
    assert not flat["converged"] and math.isnan(flat["coef"]["x0"]["coef"])


def test_welch_matches_the_formula():
    a, b = np.array([0.1, 0.3, 0.2, 0.25]), np.array([-0.2, 0.0, -0.1])
    t = (b.mean() - a.mean()) / math.sqrt(a.var(ddof=1) / 4 + b.var(ddof=1) / 3)
    assert stats.welch(a, b)["t"] == pytest.approx(t)
    assert math.isnan(stats.welch(a, b[:1])["p"])


def test_benjamini_hochberg_by_hand():
    q = stats.benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2, math.nan]))
    np.testing.assert_allclose(q[:4], [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert math.isnan(q[4])


def test_spearman_constant_input_is_nan():
    assert math.isnan(stats.spearman(np.ones(10), np.arange(10))["rho"])
    assert stats.spearman(np.arange(10), np.arange(10) ** 3)["rho"] == pytest.approx(1.0)
