"""Sweeps of strategies × cell budgets, their table and their accuracy-vs-memory plot.

What ``woodfisher storage`` and ``bench/storage.py`` print and draw.

Example:
    >>> ladder(["sign,adaptive,fisher"])
    ['naive', 'sign', 'sign+adaptive', 'sign+adaptive+fisher']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from torch import nn

from woodfisher.storage.codes import Strategy
from woodfisher.storage.simulate import digital_accuracy, simulate

__all__ = ["ladder", "plot_storage", "storage_table", "sweep"]


def ladder(strategies: Sequence[str | Sequence[str]]) -> list[str]:
    """``naive``, then every prefix of each strategy, without repeats, in order.

    Returns:
        Strategy names (tokens joined by ``+``).
    """
    out = ["naive"]
    for strategy in strategies:
        tokens = list(Strategy.parse(strategy).tokens)
        if tokens == ["naive"]:
            continue
        given = [t.strip() for t in (strategy.replace("+", ",").split(",")
                                     if isinstance(strategy, str) else strategy) if t.strip()]
        for k in range(1, len(given) + 1):
            name = Strategy.parse(given[:k]).name
            if name not in out:
                out.append(name)
    return out


def sweep(
    model: nn.Module,
    data: Any,
    strategies: Sequence[str],
    cells: Sequence[float],
    log: Callable[[str], None] = lambda msg: None,
    **options: Any,
) -> dict[str, Any]:
    """Run :func:`simulate` for every strategy and budget that fit together.

    A budget a strategy cannot spend (a fraction without allocation, or less than one copy of
    its code) is skipped and listed.

    Args:
        model: The network.
        data: Evaluation data.
        strategies: Strategy names.
        cells: Budgets (analog cells per stored weight).
        log: Progress messages.
        **options: Passed to :func:`simulate` (``channel``, ``trials``, ``seed``, ``fisher``...).

    Returns:
        ``{"results": [reports], "skipped": [{"strategy", "cells", "reason"}], "digital":
        {"fp32": {...}, "int8": {...}}}``: the digital rows give the accuracy of error-free
        storage and its cells per weight.

    Raises:
        ValueError: If no combination can run (the first reason is given).
    """
    results, skipped = [], []
    for name in strategies:
        for c in cells:
            try:
                rep = simulate(model, data, name, cells=c, **options)
            except ValueError as e:
                if "cells=" not in str(e):
                    raise
                skipped.append({"strategy": name, "cells": c, "reason": str(e)})
                continue
            results.append(rep)
            log(f"{rep['strategy']:>28s} ×{c:<5g} {rep['cells_per_weight']:6.3f} cells/weight "
                f"({rep['footprint_ratio']:5.1f}× fewer than fp32): accuracy "
                f"{100 * rep['accuracy_mean']:.2f} ± {100 * rep['accuracy_std']:.2f} "
                f"(clean {100 * rep['clean_accuracy']:.2f}) in {rep['time_s']:.0f} s")
    if not results:
        reason = skipped[0]["reason"] if skipped else "no strategy or budget given"
        raise ValueError(f"no strategy/cells combination can run: {reason}")
    first = results[0]
    keys = {"layers": options.get("layers"), "skip": options.get("skip")}
    digital = {
        "fp32": {"cells_per_weight": first["baselines"]["fp32"]["cells_per_weight"],
                 "accuracy": first["original_accuracy"]},
        "int8": {"cells_per_weight": first["baselines"]["int8"]["cells_per_weight"],
                 "accuracy": digital_accuracy(model, data, 8, **keys)["accuracy"]},
    }
    for sparse in ("fp32-sparse", "int8-sparse"):
        if sparse in first["baselines"]:
            digital[sparse] = {"cells_per_weight": first["baselines"][sparse]["cells_per_weight"],
                               "accuracy": digital[sparse[:4]]["accuracy"]}
    return {"results": results, "skipped": skipped, "digital": digital}


def storage_table(sweep_result: dict[str, Any], title: str | None = None) -> Table:
    """The sweep as a table: one row per strategy and budget, then the digital baselines.

    Returns:
        A rich table.
    """
    table = Table(title=title or "accuracy (%) after storage on noisy cells, mean ± std")
    table.caption = ("cells: analog cells per stored weight; cells/w: all cells (digital side "
                     "bits with SECDED included) per weight; ×fp32: fewer cells than 32-bit "
                     "digital + SECDED; Δ: accuracy minus noise-free")
    for col in ("strategy", "cells", "cells/w", "×fp32", "accuracy", "min", "Δ"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for r in sweep_result["results"]:
        table.add_row(
            r["strategy"], f"{r['cells']:g}", f"{r['cells_per_weight']:.3f}",
            f"{r['footprint_ratio']:.1f}",
            f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}",
            f"{100 * r['accuracy_min']:.2f}",
            f"{100 * (r['accuracy_mean'] - r['clean_accuracy']):+.2f}",
        )
    for name, d in sweep_result["digital"].items():
        fp32 = sweep_result["digital"]["fp32"]["cells_per_weight"]
        table.add_row(f"digital {name}", "-", f"{d['cells_per_weight']:.3f}",
                      f"{fp32 / d['cells_per_weight']:.1f}", f"{100 * d['accuracy']:.2f}",
                      "-", "-")
    return table


def plot_storage(sweep_result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Accuracy vs cells per weight (log scale), one line per strategy, digital as markers.

    Returns:
        ``path`` (written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for r in sweep_result["results"]:
        by_strategy.setdefault(r["strategy"], []).append(r)
    for name, rows in by_strategy.items():
        rows = sorted(rows, key=lambda r: r["cells_per_weight"])
        ax.errorbar([r["cells_per_weight"] for r in rows],
                    [100 * r["accuracy_mean"] for r in rows],
                    yerr=[100 * r["accuracy_std"] for r in rows], marker="o", ms=4, capsize=3,
                    label=name)
    clean = 100 * sweep_result["results"][0]["clean_accuracy"]
    ax.axhline(clean, color="0.4", lw=0.8, ls="--", label=f"noise-free {clean:.2f}")
    ax.axhline(clean - 1, color="0.6", lw=0.8, ls=":", label="noise-free − 1 point")
    for name, d in sweep_result["digital"].items():
        ax.plot(d["cells_per_weight"], 100 * d["accuracy"], marker="s", ls="none", ms=7,
                label=f"digital {name} + SECDED")
    ax.set_xscale("log")
    ax.set_xlabel("cells per weight (analog + digital side bits, SLC with SECDED)")
    fp32 = sweep_result["digital"]["fp32"]["cells_per_weight"]
    def ratio(x: Any) -> Any:
        return fp32 / np.maximum(x, 1e-9)

    top = ax.secondary_xaxis("top", functions=(ratio, ratio))
    top.set_xlabel("× fewer cells than fp32 + SECDED")
    ax.set_ylabel("test accuracy (%)")
    lo = min(min(100 * r["accuracy_mean"] for r in sweep_result["results"]), clean - 3)
    ax.set_ylim(max(lo - 1, 0), clean + 1.5)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from woodfisher.checkpoint import atomic_savefig

    try:
        return atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)
