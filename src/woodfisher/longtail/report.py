"""The long-tail report: a summary table, JSON, two plots and an image grid.

* :func:`summary_table`: one row per arm (accuracy, disagreement, exemplars, memorization
  AUROC, Spearman, the margin-controlled logistic coefficient, the difference to the control);
* :func:`to_json`: the analysis without its per-example arrays, NaN as ``null``;
* :func:`plot_bins`: exemplar rate per memorization bin with Wilson intervals, per arm;
* :func:`plot_class_deltas`: per-class recall change per arm (BH-significant ones starred);
* :func:`image_grid`: the most memorized training examples an arm loses, with the labels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich import box
from rich.table import Table

from woodfisher.checkpoint import atomic_save_json, atomic_savefig

__all__ = ["CLASS_NAMES", "image_grid", "plot_bins", "plot_class_deltas", "summary_table",
           "to_json"]

#: Class names of the registered datasets (others print as numbers).
CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}


def _names(dataset: str | None, c: int) -> list[str]:
    names = CLASS_NAMES.get(dataset or "")
    return names if names and len(names) == c else [str(k) for k in range(c)]


def to_json(obj: Any) -> Any:
    """Plain JSON values: NaN/inf to None, tensors and arrays to lists, ``arrays`` left out.

    Args:
        obj: An analysis (or any nest of dicts, lists and numbers).

    Returns:
        The cleaned copy.
    """
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items() if k != "arrays"}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return to_json(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def summary_table(analysis: dict[str, Any]) -> Table:
    """One row per arm of a mismatch analysis.

    Args:
        analysis: From :func:`~woodfisher.longtail.mismatch_analysis`.

    Returns:
        A rich table.
    """
    dense = analysis.get("dense_accuracy", {})
    title = (f"mismatches vs memorization ({analysis['examples']['scored']} scored train, "
             f"{analysis['examples']['test']} test examples; {analysis['dense_models']} dense "
             f"model(s), test acc {_f(dense.get('test'), '.2%')})")
    caption = ("M models; dis: disagreement with the dense parent (train/test); CIE: "
               "compression-identified exemplars; AUROC of memorization for CIE on train; ρ: "
               "Spearman(memorization, disagreement frequency); logit: memorization coefficient "
               "(per SD) controlling for the dense margin; Δ: AUROC minus the control's")
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD)
    columns = ("arm", "M", "test acc", "dis tr", "dis te", "CIE tr", "CIE te", "AUROC",
               "95% CI", "ρ", "logit (z)", "Δ vs control [CI]")
    for col in columns:
        table.add_column(col, justify="left" if col == "arm" else "right", no_wrap=True)
    for name, arm in analysis["arms"].items():
        mem = arm["memorization"]
        coef = mem["logistic"]["coef"]["memorization"]
        vs = arm.get("vs_control")
        lo, hi = mem["auroc_ci"]
        table.add_row(
            name, str(arm["models"]), _f(arm["test"]["accuracy"]["mean"], ".2%"),
            _f(arm["train"]["disagreement"]["mean"], ".2%"),
            _f(arm["test"]["disagreement"]["mean"], ".2%"),
            str(arm["exemplars"]["train"]["count"]), str(arm["exemplars"]["test"]["count"]),
            _f(mem["auroc"]), f"[{_f(lo, '.2f')}, {_f(hi, '.2f')}]",
            _f(mem["spearman_disagreement"]["rho"]),
            f"{_f(coef['coef'], '+.2f')} ({_f(coef['z'], '+.1f')})",
            "—" if vs is None else (f"{vs['auroc_difference']:+.3f} "
                                    f"[{_f(vs['auroc_difference_ci'][0], '+.2f')}, "
                                    f"{_f(vs['auroc_difference_ci'][1], '+.2f')}]"),
        )
    return table


def plot_bins(analysis: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Exemplar rate per memorization bin, one line per arm, Wilson 95 % intervals.

    Returns:
        The PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = list(analysis["arms"])
    first = analysis["arms"][names[0]]["memorization"]["bins"]
    labels = [f"{_bin_label(b['low'], b['high'])}\nn={b['n']}" for b in first]
    x = np.arange(len(labels))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        rows = analysis["arms"][name]["memorization"]["bins"]
        rate = np.array([r["rate"] if r["n"] else np.nan for r in rows], float)
        lo = np.array([r["ci"][0] if r["n"] else np.nan for r in rows], float)
        hi = np.array([r["ci"][1] if r["n"] else np.nan for r in rows], float)
        control = name == analysis.get("control_name")
        ax.errorbar(x + (i - (len(names) - 1) / 2) * width, rate, yerr=[rate - lo, hi - rate],
                    fmt="s--" if control else "o-", capsize=3, label=name,
                    color="grey" if control else None)
    ax.set_xticks(x, labels)
    ax.set_xlabel("memorization (Feldman–Zhang estimate)")
    ax.set_ylabel("compression-identified exemplars (fraction)")
    ax.set_title(title or "mismatch rate by memorization (95 % Wilson intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def _bin_label(low: float, high: float) -> str:
    if low == -math.inf:
        return f"< {high:g}"
    if high == math.inf:
        return f"≥ {low:g}"
    return f"[{low:g}, {high:g})"


def plot_class_deltas(analysis: dict[str, Any], path: str | os.PathLike,
                      dataset: str | None = None) -> Path:
    """Per-class change of test recall (compressed − dense), one bar group per class.

    Bars of classes whose normalised change is significant after Benjamini–Hochberg (q < 0.05)
    carry a star.

    Returns:
        The PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(analysis["arms"])
    c = analysis["num_classes"]
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * c + 2), 4.2))
    width = 0.8 / max(len(names), 1)
    x = np.arange(c)
    for i, name in enumerate(names):
        rows = analysis["arms"][name]["per_class"]
        delta = np.array([100 * r["delta"] for r in rows])
        pos = x + (i - (len(names) - 1) / 2) * width
        control = name == analysis.get("control_name")
        ax.bar(pos, delta, width, label=name, color="grey" if control else None)
        for p, d, r in zip(pos, delta, rows, strict=True):
            if r["significant"]:
                ax.text(p, d, "*", ha="center", va="bottom" if d >= 0 else "top")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, _names(dataset, c), rotation=30, ha="right")
    ax.set_ylabel("test recall change (points)")
    ax.set_title("per-class recall change vs dense (* BH q < 0.05, Welch)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def image_grid(
    analysis: dict[str, Any],
    X: torch.Tensor,
    y: torch.Tensor,
    arm: str,
    path: str | os.PathLike,
    dataset: str | None = None,
    count: int = 24,
    columns: int = 8,
) -> Path:
    """The training exemplars of one arm with the highest memorization, as an image grid.

    Each tile shows the image, its memorization, its label and the dense and compressed modal
    predictions.

    Args:
        analysis: The analysis (with its ``arrays``).
        X: (n, C, H, W) training images (as scored).
        y: (n,) labels.
        arm: The arm.
        path: PNG to write.
        dataset: Dataset name, for class names.
        count: Tiles at most.
        columns: Tiles per row.

    Returns:
        The PNG written.

    Raises:
        ValueError: If ``arm`` is not in the analysis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = analysis["arrays"]
    if arm not in arrays["exemplars_train"]:
        raise ValueError(f"unknown arm {arm!r}; choose from {list(arrays['exemplars_train'])}")
    mem = np.nan_to_num(np.asarray(arrays["memorization"], float), nan=-2.0)
    cie = np.asarray(arrays["exemplars_train"][arm], bool)
    order = [i for i in np.argsort(-mem, kind="stable") if cie[i]][:count]
    names = _names(dataset, analysis["num_classes"])
    rows = max(1, math.ceil(len(order) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    dense_mode, comp_mode = arrays["modal_train"]["dense"], arrays["modal_train"][arm]
    for ax, i in zip(axes.flat, order, strict=False):
        img = X[i].detach().float()
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        ax.imshow(img.numpy(), cmap="gray" if img.ndim == 2 else None)
        ax.set_title(f"mem {mem[i]:.2f}\ny {names[int(y[i])][:9]}\n"
                     f"D {names[dense_mode[i]][:9]} C {names[comp_mode[i]][:9]}", fontsize=6.5)
    fig.suptitle(f"{arm}: most memorized training exemplars (y label, D dense, C compressed mode)"
                 if order else f"{arm}: no training exemplars", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(analysis: dict[str, Any], out: str | os.PathLike, X: torch.Tensor,
                 y: torch.Tensor, dataset: str | None = None,
                 extra: dict[str, Any] | None = None,
                 grid_arms: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``longtail.json``, the two plots and one image grid per arm into ``out``.

    Args:
        analysis: The analysis.
        out: The directory (created if missing).
        X: Training images as scored.
        y: Their labels.
        dataset: Dataset name.
        extra: More JSON to store beside the analysis (options, memorization summary, ...).
        grid_arms: Arms to draw grids for (default: every arm but the control).

    Returns:
        Name to path of every file written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "longtail.json", "bins": out / "mismatch_vs_memorization.png",
             "classes": out / "class_deltas.png"}
    atomic_save_json(to_json({**(extra or {}), "analysis": analysis}), paths["json"])
    plot_bins(analysis, paths["bins"])
    plot_class_deltas(analysis, paths["classes"], dataset)
    arms = grid_arms if grid_arms is not None else [
        a for a in analysis["arms"] if a != analysis.get("control_name")]
    for i, arm in enumerate(arms):
        paths[f"grid:{arm}"] = image_grid(analysis, X, y, arm, out / f"exemplars_{i}.png",
                                          dataset)
    return paths
