"""The statistics of the mismatch analysis, as small pure functions on numpy arrays.

Wilson intervals, a rank AUROC (ties averaged) with a stratified bootstrap interval,
Mann–Whitney U, Spearman's ρ, a logistic regression with standard errors (IRLS), Welch's t-test
and the Benjamini–Hochberg correction. scipy does the distributions.

Example:
    >>> lo, hi = wilson(8, 10)
    >>> round(lo, 3), round(hi, 3)
    (0.49, 0.943)
    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as sps
from scipy.special import expit

__all__ = [
    "auroc",
    "auroc_difference_interval",
    "auroc_interval",
    "benjamini_hochberg",
    "logistic_regression",
    "mann_whitney",
    "spearman",
    "welch",
    "wilson",
]


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n``.

    Args:
        k: Successes.
        n: Trials.
        z: Normal quantile (1.96 for 95 %).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``n == 0``.
    """
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count one half).

    Equals ``U / (n₁ n₀)`` of the Mann–Whitney statistic of the positives' scores.

    Args:
        scores: (n,) real scores, higher meaning "more likely positive".
        labels: (n,) booleans or 0/1.

    Returns:
        The AUROC, or NaN if one class is empty.
    """
    labels = np.asarray(labels).astype(bool)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = sps.rankdata(np.asarray(scores, dtype=float))
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc_interval(
    scores: np.ndarray, labels: np.ndarray, reps: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`auroc`, resampling each class separately.

    Args:
        scores: (n,) scores.
        labels: (n,) binary labels.
        reps: Bootstrap replicates.
        seed: Seed of the resampling.
        level: Coverage.

    Returns:
        ``(low, high)``, or NaNs if one class is empty.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    lab = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    values = np.empty(reps)
    for r in range(reps):
        s = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        values[r] = auroc(s, lab)
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def mann_whitney(positives: np.ndarray, negatives: np.ndarray) -> dict[str, float]:
    """Two-sided Mann–Whitney U test of ``positives`` against ``negatives``.

    Args:
        positives: Values of one group (e.g. memorization of mismatched examples).
        negatives: Values of the other.

    Returns:
        ``{"u", "p"}``; NaNs if a group is empty.
    """
    if len(positives) == 0 or len(negatives) == 0:
        return {"u": math.nan, "p": math.nan}
    res = sps.mannwhitneyu(positives, negatives, alternative="two-sided")
    return {"u": float(res.statistic), "p": float(res.pvalue)}


def spearman(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman's rank correlation with its two-sided p-value.

    Args:
        a: (n,) values.
        b: (n,) values.

    Returns:
        ``{"rho", "p"}``; NaNs when either input is constant.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"rho": math.nan, "p": math.nan}
    res = sps.spearmanr(a, b)
    return {"rho": float(res.statistic), "p": float(res.pvalue)}


def logistic_regression(
    X: np.ndarray, y: np.ndarray, names: list[str] | None = None, max_iter: int = 100
) -> dict[str, Any]:
    """Maximum-likelihood logistic regression with an intercept, by Newton's method (IRLS).

    Standard errors come from the inverse of the observed information ``XᵀWX`` at the
    optimum; ``z = coef / se`` and the p-values are two-sided normal (Wald) ones.

    Args:
        X: (n, p) predictors (an intercept is added).
        y: (n,) 0/1 outcomes.
        names: Names of the p predictors.
        max_iter: Newton steps at most.

    Returns:
        ``{"converged", "n", "coef": {name: {"coef", "se", "z", "p"}}}`` with ``intercept``
        among the names; ``converged`` is False (and the coefficients NaN) when one outcome
        is absent or the data are separable.
    """
    X = np.asarray(X, float)
    y = np.asarray(y, float)
    names = list(names or [f"x{i}" for i in range(X.shape[1])])
    A = np.c_[np.ones(len(X)), X]
    labels = ["intercept", *names]
    nan = {k: {"coef": math.nan, "se": math.nan, "z": math.nan, "p": math.nan} for k in labels}
    if y.min() == y.max():
        return {"converged": False, "n": len(y), "coef": nan}
    beta = np.zeros(A.shape[1])
    converged = False
    for _ in range(max_iter):
        eta = A @ beta
        p = expit(eta)
        w = np.clip(p * (1 - p), 1e-12, None)
        info = A.T @ (A * w[:, None])
        try:
            step = np.linalg.solve(info, A.T @ (y - p))
        except np.linalg.LinAlgError:
            break
        beta = beta + step
        if np.abs(step).max() < 1e-10 * (1 + np.abs(beta).max()):
            converged = True
            break
    if not converged or np.abs(beta).max() > 30:  # separation: the MLE runs off to infinity
        return {"converged": False, "n": len(y), "coef": nan}
    p = expit(A @ beta)
    cov = np.linalg.inv(A.T @ (A * (p * (1 - p))[:, None]))
    se = np.sqrt(np.diag(cov))
    z = beta / se
    pv = 2 * sps.norm.sf(np.abs(z))
    return {"converged": True, "n": len(y),
            "coef": {k: {"coef": float(b), "se": float(s), "z": float(zz), "p": float(q)}
                     for k, b, s, zz, q in zip(labels, beta, se, z, pv, strict=True)}}


def welch(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Welch's two-sample t-test (unequal variances), ``b`` against ``a``.

    Args:
        a: One sample (e.g. dense models' normalised recalls), at least 2 values.
        b: The other (compressed models'), at least 2 values.

    Returns:
        ``{"t", "p"}``; NaNs when a sample has fewer than 2 values or both have zero variance.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2 or (np.var(a) == 0 and np.var(b) == 0):
        return {"t": math.nan, "p": math.nan}
    res = sps.ttest_ind(b, a, equal_var=False)
    return {"t": float(res.statistic), "p": float(res.pvalue)}


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaNs stay NaN and are not counted.

    Args:
        p: p-values.

    Returns:
        Adjusted values, same shape.
    """
    p = np.asarray(p, float)
    out = np.full_like(p, math.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = sps.false_discovery_control(p[ok], method="bh")
    return out


def auroc_difference_interval(
    scores: np.ndarray,
    labels_a: np.ndarray,
    labels_b: np.ndarray,
    reps: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval of ``auroc(scores, labels_a) − auroc(scores, labels_b)``.

    Both AUROCs share the examples (the same scores, two outcomes), so the examples are
    resampled jointly.

    Args:
        scores: (n,) scores.
        labels_a: (n,) binary outcome A (e.g. a compressed arm's exemplars).
        labels_b: (n,) binary outcome B (e.g. the reseed control's).
        reps: Bootstrap replicates.
        seed: Seed of the resampling.
        level: Coverage.

    Returns:
        ``(low, high)``; NaNs if an outcome has an empty class.
    """
    scores = np.asarray(scores, float)
    a, b = np.asarray(labels_a, bool), np.asarray(labels_b, bool)
    if math.isnan(auroc(scores, a)) or math.isnan(auroc(scores, b)):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        i = rng.integers(0, len(scores), len(scores))
        d = auroc(scores[i], a[i]) - auroc(scores[i], b[i])
        if not math.isnan(d):
            values.append(d)
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
