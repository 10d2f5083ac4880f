"""Which examples compressed models lose: mismatches against the dense models, and why.

A *mismatch* (Dam et al.) is an input that a dense and a compressed model classify differently.
With several models per side, a *compression-identified exemplar* (CIE; Hooker et al. 2019/2020)
is an input whose modal prediction over the compressed population differs from the modal
prediction over the dense population (correctness does not enter; ties go to the smaller
label). With one model per side the two coincide.

For each compressed arm (a population of models) :func:`analyze_predictions` reports, on train
and test: disagreement and flip-to-wrong rates of each compressed model against its dense
parent (``compressed[j]`` against ``dense[j mod len(dense)]``), CIE counts, and on the training
set, against memorization: CIE rates per memorization bin with Wilson intervals, Mann–Whitney U
and the AUROC of memorization for CIE membership (with a bootstrap interval), Spearman's ρ
between memorization and each example's disagreement frequency, and a logistic regression of
CIE membership on memorization and the dense models' mean margin (memorization and a low margin
go together, so the memorization coefficient is the part the margin does not explain). Per-class
test recall changes follow Hooker et al.: each model's recall of a class minus its own top-1,
dense against compressed by Welch's t-test, Benjamini–Hochberg across classes. A *control* arm
of dense models trained from other seeds goes through the same analysis, so that seed noise on
hard examples is not taken for a compression effect.

Example:
    >>> y = torch.tensor([0, 1, 1, 2])
    >>> dense = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 2], [0, 1, 1, 1]])
    >>> comp = torch.tensor([[0, 2, 1, 2], [0, 2, 2, 2], [0, 1, 2, 2]])
    >>> exemplars(dense, comp).tolist()
    [False, True, True, False]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from woodfisher.longtail import stats
from woodfisher.longtail.memorization import Memorization

__all__ = [
    "MEMORIZATION_BINS",
    "analyze_predictions",
    "check_bins",
    "disagreement_frequency",
    "exemplars",
    "mismatch_analysis",
    "modal",
    "predict",
]

#: Cut points of the memorization bins: [<0.05], [0.05, 0.25), [0.25, 0.5), [0.5, 1].
MEMORIZATION_BINS = (0.05, 0.25, 0.5)
#: Fewest examples per bin, on average, that the binned rates need.
MIN_PER_BIN = 10


@torch.no_grad()
def predict(models: Sequence[nn.Module], X: Tensor, batch_size: int = 2048) -> Tensor:
    """Predicted labels of each model on each example.

    Args:
        models: The models (set to eval mode).
        X: (n, ...) inputs.
        batch_size: Examples per forward pass.

    Returns:
        (len(models), n) int64.
    """
    rows = []
    for model in models:
        model.eval()
        rows.append(torch.cat([model(X[s : s + batch_size]).argmax(1)
                               for s in range(0, len(X), batch_size)]))
    return torch.stack(rows)


def modal(predictions: Tensor, num_classes: int | None = None) -> Tensor:
    """The most frequent label of each column (ties: the smallest label).

    Args:
        predictions: (M, n) labels.
        num_classes: Number of classes (default: largest label + 1).

    Returns:
        (n,) int64.
    """
    c = int(num_classes or int(predictions.max()) + 1)
    counts = torch.zeros(c, predictions.shape[1], dtype=torch.int64)
    counts.scatter_add_(0, predictions, torch.ones_like(predictions))
    return counts.argmax(0)


def exemplars(dense: Tensor, compressed: Tensor, num_classes: int | None = None) -> Tensor:
    """Compression-identified exemplars: the populations' modal predictions differ.

    Args:
        dense: (M_d, n) dense models' labels.
        compressed: (M_c, n) compressed models' labels.
        num_classes: Number of classes.

    Returns:
        (n,) bool.
    """
    c = num_classes or int(max(dense.max(), compressed.max())) + 1
    return modal(dense, c) != modal(compressed, c)


def disagreement_frequency(dense: Tensor, compressed: Tensor) -> Tensor:
    """Per example, the fraction of pairs ``(compressed[j], dense[j mod M_d])`` that disagree.

    Args:
        dense: (M_d, n) labels.
        compressed: (M_c, n) labels.

    Returns:
        (n,) float64 in [0, 1].
    """
    parents = dense[torch.arange(len(compressed)) % len(dense)]
    return (parents != compressed).double().mean(0)


def check_bins(cuts: Sequence[float], n: int) -> list[tuple[float, float]]:
    """Validate memorization bin cut points against the number of scored examples.

    Args:
        cuts: Increasing cut points inside (-1, 1).
        n: Examples with a memorization score.

    Returns:
        The bins as ``(low, high)`` pairs, the outer ones open (±inf).

    Raises:
        ValueError: If the cuts are not increasing inside (-1, 1), or ``n`` is below
            ``MIN_PER_BIN`` examples per bin.
    """
    cuts = [float(c) for c in cuts]
    if not cuts or any(not -1 < c < 1 for c in cuts) or any(
        b <= a for a, b in zip(cuts[:-1], cuts[1:], strict=False)
    ):
        raise ValueError(f"memorization bin cut points must increase strictly inside (-1, 1), "
                         f"got {cuts}; the default is {list(MEMORIZATION_BINS)}")
    edges = [-math.inf, *cuts, math.inf]
    bins = list(zip(edges[:-1], edges[1:], strict=True))
    if n < MIN_PER_BIN * len(bins):
        raise ValueError(f"{n} scored examples are too few for {len(bins)} memorization bins; "
                         f"need at least {MIN_PER_BIN * len(bins)} ({MIN_PER_BIN} per bin): "
                         "score more training examples or pass fewer cut points")
    return bins


def _rates(pred: Tensor, ref: Tensor, y: Tensor) -> dict[str, Any]:
    """Per model: disagreement with its parent and flips from right to wrong."""
    parents = ref[torch.arange(len(pred)) % len(ref)]
    dis = (pred != parents).double().mean(1)
    flip = ((parents == y) & (pred != y)).double().mean(1)
    acc = (pred == y).double().mean(1)

    def summary(v: Tensor) -> dict[str, Any]:
        return {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
                "per_model": [float(x) for x in v]}

    return {"accuracy": summary(acc), "disagreement": summary(dis),
            "flip_to_wrong": summary(flip)}


def _cie(dense: Tensor, pred: Tensor, y: Tensor, c: int) -> tuple[Tensor, dict[str, Any]]:
    cie = exemplars(dense, pred, c)
    wrong = cie & (modal(pred, c) != y)
    hist_d = torch.zeros(c, dense.shape[1]).scatter_add_(0, dense, torch.ones(dense.shape))
    hist_c = torch.zeros(c, pred.shape[1]).scatter_add_(0, pred, torch.ones(pred.shape))
    taxicab = 0.5 * (hist_d / len(dense) - hist_c / len(pred)).abs().sum(0)
    return cie, {"count": int(cie.sum()), "rate": float(cie.double().mean()),
                 "compressed_mode_wrong": int(wrong.sum()),
                 "taxicab_mean": float(taxicab.mean())}


def _against_memorization(
    mem: np.ndarray, cie: np.ndarray, freq: np.ndarray, margin: np.ndarray,
    bins: list[tuple[float, float]], bootstrap: int, seed: int,
) -> dict[str, Any]:
    rows = []
    for lo, hi in bins:
        inside = (mem >= lo) & (mem < hi)
        k, n = int(cie[inside].sum()), int(inside.sum())
        ci = stats.wilson(k, n)
        rows.append({"low": lo, "high": hi, "n": n, "exemplars": k,
                     "rate": k / n if n else math.nan, "ci": list(ci),
                     "disagreement": float(freq[inside].mean()) if n else math.nan})
    z = lambda v: (v - v.mean()) / (v.std() or 1.0)  # noqa: E731
    logit = stats.logistic_regression(np.c_[z(mem), z(margin)], cie.astype(float),
                                      ["memorization", "dense_margin"])
    return {
        "bins": rows,
        "mean_memorization": {"exemplars": float(mem[cie].mean()) if cie.any() else math.nan,
                              "others": float(mem[~cie].mean()) if (~cie).any() else math.nan},
        "mann_whitney": stats.mann_whitney(mem[cie], mem[~cie]),
        "auroc": stats.auroc(mem, cie),
        "auroc_ci": list(stats.auroc_interval(mem, cie, reps=bootstrap, seed=seed)),
        "spearman_disagreement": stats.spearman(mem, freq),
        "logistic": logit,
    }


def _per_class(dense: Tensor, pred: Tensor, y: Tensor, c: int) -> list[dict[str, Any]]:
    def recalls(p: Tensor) -> np.ndarray:
        out = np.zeros((len(p), c))
        for k in range(c):
            sel = y == k
            out[:, k] = (p[:, sel] == k).double().mean(1).numpy() if sel.any() else math.nan
        return out

    rd, rc = recalls(dense), recalls(pred)
    nd = rd - (dense == y).double().mean(1).numpy()[:, None]
    nc = rc - (pred == y).double().mean(1).numpy()[:, None]
    tests = [stats.welch(nd[:, k], nc[:, k]) for k in range(c)]
    q = stats.benjamini_hochberg(np.array([t["p"] for t in tests]))
    return [{"class": k, "dense_recall": float(rd[:, k].mean()), "recall": float(rc[:, k].mean()),
             "delta": float(rc[:, k].mean() - rd[:, k].mean()),
             "normalised_delta": float(nc[:, k].mean() - nd[:, k].mean()),
             "t": tests[k]["t"], "p": tests[k]["p"], "q": float(q[k]),
             "significant": bool(q[k] < 0.05)} for k in range(c)]


def analyze_predictions(
    dense: tuple[Tensor, Tensor],
    arms: Mapping[str, tuple[Tensor, Tensor]],
    y_train: Tensor,
    y_test: Tensor,
    memorization: Tensor,
    dense_margin: Tensor,
    *,
    control: tuple[Tensor, Tensor] | None = None,
    test_scores: Tensor | None = None,
    bins: Sequence[float] = MEMORIZATION_BINS,
    num_classes: int | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The mismatch analysis from predicted labels (see the module docstring).

    Args:
        dense: ``(train, test)`` labels of the dense population, (M_d, n) and (M_d, n_test).
        arms: Arm name to ``(train, test)`` labels of its compressed models.
        y_train: (n,) training labels (the examples ``memorization`` scores).
        y_test: (n_test,) test labels.
        memorization: (n,) memorization scores (NaN: left out of the memorization statistics).
        dense_margin: (n,) the dense models' mean margin on the training examples.
        control: ``(train, test)`` labels of dense models from other seeds: analysed as an arm
            named ``"control (dense reseed)"``.
        test_scores: Optional (n_test,) long-tail score of test examples (e.g. the largest
            influence of any training example): the same tests on the test set.
        bins: Memorization bin cut points.
        num_classes: Number of classes (default: from the labels).
        bootstrap: Bootstrap replicates of the AUROC intervals.
        seed: Seed of the bootstrap.

    Returns:
        ``{"bins", "examples", "arms": {name: {...}}, "control_name"}``; each arm holds
        ``train``/``test`` rates, ``exemplars``, ``memorization`` statistics, ``per_class``
        rows and, with a control, ``vs_control`` (AUROC difference with a bootstrap interval);
        ``arrays`` holds per-example exemplar masks and modal labels (left out of JSON).

    Raises:
        ValueError: On mismatched shapes, an empty population or too few examples for the bins.
    """
    mem = np.asarray(memorization, float)
    ok = ~np.isnan(mem)
    edges = check_bins(bins, int(ok.sum()))
    n, n_test = len(y_train), len(y_test)
    all_arms = dict(arms)
    control_name = "control (dense reseed)"
    if control is not None:
        all_arms[control_name] = control
    for name, (tr, te) in {"dense": dense, **all_arms}.items():
        if tr.ndim != 2 or te.ndim != 2 or len(tr) == 0 or len(tr) != len(te):
            raise ValueError(f"{name}: predictions must be (M, n) with M >= 1 models on train "
                             f"and test, got {tuple(tr.shape)} and {tuple(te.shape)}")
        if tr.shape[1] != n or te.shape[1] != n_test:
            raise ValueError(f"{name}: predictions cover {tr.shape[1]} train / {te.shape[1]} "
                             f"test examples; the labels have {n} / {n_test}")
    if len(mem) != n or len(dense_margin) != n:
        raise ValueError(f"memorization ({len(mem)}) and dense_margin ({len(dense_margin)}) "
                         f"must have one value per training example ({n})")
    c = int(num_classes or max(int(y_train.max()), int(y_test.max()),
                               *(int(t.max()) for p in all_arms.values() for t in p),
                               int(dense[0].max()), int(dense[1].max())) + 1)
    margin = np.asarray(dense_margin, float)
    out_arms: dict[str, Any] = {}
    cie_train: dict[str, np.ndarray] = {}
    cie_test: dict[str, np.ndarray] = {}
    for i, (name, (tr, te)) in enumerate(all_arms.items()):
        ctr, cie_tr = _cie(dense[0], tr, y_train, c)
        cte, cie_te = _cie(dense[1], te, y_test, c)
        cie_train[name], cie_test[name] = ctr.numpy(), cte.numpy()
        freq = disagreement_frequency(dense[0], tr).numpy()
        arm = {"models": len(tr), "train": _rates(tr, dense[0], y_train),
               "test": _rates(te, dense[1], y_test),
               "exemplars": {"train": cie_tr, "test": cie_te},
               "memorization": _against_memorization(mem[ok], ctr.numpy()[ok], freq[ok],
                                                     margin[ok], edges, bootstrap, seed + i),
               "per_class": _per_class(dense[1], te, y_test, c)}
        if test_scores is not None:
            ts = np.asarray(test_scores, float)
            arm["test_scores"] = {"auroc": stats.auroc(ts, cte.numpy()),
                                  "mann_whitney": stats.mann_whitney(ts[cte.numpy()],
                                                                     ts[~cte.numpy()])}
        out_arms[name] = arm
    if control is not None:
        ref = cie_train[control_name][ok]
        for i, name in enumerate(arms):
            a = out_arms[name]["memorization"]["auroc"]
            b = out_arms[control_name]["memorization"]["auroc"]
            out_arms[name]["vs_control"] = {
                "auroc_difference": a - b,
                "auroc_difference_ci": list(stats.auroc_difference_interval(
                    mem[ok], cie_train[name][ok], ref, reps=bootstrap, seed=seed + 1000 + i)),
                "train_exemplar_ratio": (cie_train[name].sum() / cie_train[control_name].sum()
                                         if cie_train[control_name].sum() else math.nan),
                "test_exemplar_ratio": (cie_test[name].sum() / cie_test[control_name].sum()
                                        if cie_test[control_name].sum() else math.nan),
            }
    modal_train = {name: modal(tr, c).numpy() for name, (tr, _) in all_arms.items()}
    modal_test = {name: modal(te, c).numpy() for name, (_, te) in all_arms.items()}
    return {"bins": [[lo, hi] for lo, hi in edges], "examples": {"train": n, "test": n_test,
            "scored": int(ok.sum())}, "dense_models": len(dense[0]), "num_classes": c,
            "arms": out_arms, "control_name": control_name if control is not None else None,
            # Per-example arrays for plots and image grids; reports leave them out of JSON.
            "arrays": {"exemplars_train": cie_train, "exemplars_test": cie_test,
                       "modal_train": {"dense": modal(dense[0], c).numpy(), **modal_train},
                       "modal_test": {"dense": modal(dense[1], c).numpy(), **modal_test},
                       "memorization": mem, "dense_margin": margin}}


def mismatch_analysis(
    dense: Sequence[nn.Module],
    compressed: Mapping[str, Sequence[nn.Module]],
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    memorization: Tensor | Memorization,
    *,
    control: Sequence[nn.Module] | None = None,
    bins: Sequence[float] = MEMORIZATION_BINS,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare dense and compressed models example by example, against memorization.

    Args:
        dense: The dense population (one model or several seeds).
        compressed: Arm name to its compressed models; ``compressed[name][j]`` is compared with
            ``dense[j mod len(dense)]`` (pass them in the order they were derived).
        train: ``(X, y)`` of the training examples that ``memorization`` scores.
        test: ``(X, y)`` of the test examples.
        memorization: (n,) scores or a :class:`~woodfisher.longtail.Memorization` (then its
            test influence, where recorded, gives the test examples' long-tail score: the
            largest influence of any training example).
        control: Dense models from other seeds (the reseed control).
        bins: Memorization bin cut points.
        bootstrap: Bootstrap replicates of the AUROC intervals.
        seed: Seed of the bootstrap.

    Returns:
        See :func:`analyze_predictions`; also ``dense_accuracy`` on train and test.

    Raises:
        ValueError: If a population is empty or the sizes do not fit (see
            :func:`analyze_predictions`).
    """
    from woodfisher.longtail.proxies import margins

    if not dense or any(not models for models in compressed.values()):
        raise ValueError("every population needs at least one model (dense and each arm)")
    (Xtr, ytr), (Xte, yte) = train, test
    scores, test_scores = memorization, None
    if isinstance(memorization, Memorization):
        scores = memorization.scores
        if memorization.test_correct is not None and memorization.test_correct.shape[1] == len(
            yte
        ):
            test_scores = memorization.influence()[0].nan_to_num(-1.0).amax(0)
    d = (predict(dense, Xtr), predict(dense, Xte))
    arms = {name: (predict(ms, Xtr), predict(ms, Xte)) for name, ms in compressed.items()}
    ctrl = None if not control else (predict(control, Xtr), predict(control, Xte))
    margin = torch.stack([margins(m, Xtr, ytr)["margin"] for m in dense]).mean(0)
    out = analyze_predictions(d, arms, ytr, yte, torch.as_tensor(scores), margin, control=ctrl,
                              test_scores=test_scores, bins=bins, bootstrap=bootstrap, seed=seed)
    out["dense_accuracy"] = {"train": float((d[0] == ytr).double().mean()),
                             "test": float((d[1] == yte).double().mean())}
    return out
