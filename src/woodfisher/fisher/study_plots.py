"""Figures and the table of the Hessian-approximation study (:mod:`woodfisher.fisher.study`).

Every figure is drawn from the study's JSON-able result alone, so a saved ``study.json`` can be
re-plotted and a test can check that what is plotted equals what is stored. Figures are sized
for a README column (about 900 px wide at the default dpi).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from woodfisher.fisher.study import label

#: Figure files written by :func:`write_figures`, by key.
FIGURES = {
    "error": "error_vs_m.png",
    "heatmaps": "heatmaps.png",
    "fidelity": "fidelity.png",
    "ihvp": "ihvp.png",
}
DPI = 130
# One colour per reference, used in every figure.
REFERENCE_STYLE = {
    "exact empirical Fisher": {"color": "0.35", "linestyle": "-."},
    "K-FAC": {"color": "tab:red", "linestyle": "--"},
    "diagonal Fisher": {"color": "tab:purple", "linestyle": ":"},
    "exact Hessian (check)": {"color": "black", "linestyle": "-"},
    "gradient (no curvature)": {"color": "tab:brown", "linestyle": (0, (1, 3))},
}
BLOCK_COLORS = ("tab:blue", "tab:green", "tab:orange", "tab:olive", "tab:cyan")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_estimator(result: dict) -> dict[str, dict]:
    return {label(r): r for r in result["rows"]}


def _sweep(result: dict, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Block label → (m values, metric values) of the WoodFisher rows, m increasing."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for b in result["setup"]["block_sizes"]:
        rows = sorted((r for r in result["rows"]
                       if r["estimator"] == "WoodFisher" and r["block_size"] == b),
                      key=lambda r: r["num_grads"])
        name = "B = full" if b is None else f"B = {b}"
        out[name] = ([r["num_grads"] for r in rows], [r[key] for r in rows])
    return out


def _sweep_axis(ax, result: dict, key: str, references: list[str], ylabel: str) -> None:
    for color, (name, (ms, vals)) in zip(BLOCK_COLORS, _sweep(result, key).items(),
                                         strict=False):
        ax.plot(ms, vals, "o-", color=color, label=f"WoodFisher {name}")
    rows = _by_estimator(result)
    for ref in references:
        if ref in rows:
            ax.axhline(rows[ref][key], label=ref, linewidth=1.6, **REFERENCE_STYLE[ref])
    ax.set_xscale("log")
    ax.set_xlabel("gradients m")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def error_figure(result: dict):
    """Relative error of each inverse against ``(H + λI)⁻¹`` vs ``m``, per block size.

    Returns:
        The matplotlib figure.
    """
    plt = _plt()
    s = result["setup"]
    fig, ax = plt.subplots(figsize=(7, 4))
    _sweep_axis(ax, result, "rel_frobenius",
                ["exact empirical Fisher", "K-FAC", "diagonal Fisher"],
                "relative error ‖F̂⁻¹ − (H+λI)⁻¹‖ / ‖(H+λI)⁻¹‖")
    ax.set_ylim(bottom=0)
    ax.set_title(f"inverse vs exact Hessian: layer {s['layer']} (d={s['d']}), "
                 f"λ={s['damp']:g}, N={s['num_samples']}", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def heatmap_figure(result: dict):
    """The same window of the exact inverse and of each estimate, on one colour scale.

    Returns:
        The matplotlib figure.
    """
    import numpy as np
    from matplotlib.colors import Normalize

    plt = _plt()
    windows = result["windows"]
    names = ["exact Hessian (check)"] + [n for n in windows if n != "exact Hessian (check)"]
    names = [n for n in names if n in windows]
    exact = np.asarray(windows["exact Hessian (check)"])
    # The diagonal is far larger than the rest; a scale at the 99th percentile of the exact
    # off-diagonal entries shows the block and Kronecker structure, and the saturated diagonal
    # still reads as a line.
    off = np.abs(exact[~np.eye(len(exact), dtype=bool)])
    vmax = float(np.percentile(off, 99)) if off.size else 1.0
    norm = Normalize(-(vmax or 1.0), vmax or 1.0)
    fig, axes = plt.subplots(2, 3, figsize=(7.5, 5.4), layout="constrained")
    rows = _by_estimator(result)
    im = None
    for ax, name in zip(axes.flat, names, strict=False):
        im = ax.imshow(np.asarray(windows[name]), cmap="RdBu_r", norm=norm,
                       interpolation="nearest")
        if name == "exact Hessian (check)":
            title = "exact (H+λI)⁻¹"
        else:
            title = name.replace("WoodFisher ", "WoodFisher\n")
            title += f", error {rows[name]['rel_frobenius']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, extend="both",
                 label="entry (diagonal saturates)")
    k = result["setup"]["window"]
    fig.suptitle(f"top-left {k}×{k} of each inverse, one colour scale (layer "
                 f"{result['setup']['layer']}, error = relative Frobenius error)", fontsize=10)
    return fig


def _symlog(ax, values) -> None:
    """Symmetric log axes with a linear band just below the smallest typical magnitude."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, SymmetricalLogLocator

    mags = np.abs(np.asarray(values, dtype=float))
    mags = mags[mags > 0]
    thresh = 10.0 ** np.floor(np.log10(np.percentile(mags, 10))) if mags.size else 1e-6
    for axis, set_scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
        set_scale("symlog", linthresh=thresh)
        axis.set_major_locator(SymmetricalLogLocator(base=100, linthresh=thresh))
        sci = LogFormatterSciNotation(labelOnlyBase=False)

        def label(x, pos, sci=sci):
            # ±thresh and 0 sit a hair apart on the axis; label 0 only.
            if x == 0:
                return "0"
            return "" if abs(x) <= thresh * 1.01 else ("−" if x < 0 else "") + sci(abs(x), pos)

        axis.set_major_formatter(FuncFormatter(label))


def fidelity_figure(result: dict):
    """Predicted vs actual loss change of OBS pruning with each estimate.

    Returns:
        The matplotlib figure.
    """
    import numpy as np

    plt = _plt()
    fid = result["fidelity"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    colors = {"K-FAC": "tab:red", "diagonal Fisher": "tab:purple",
              "exact Hessian (check)": "black"}
    palette = iter(BLOCK_COLORS)
    values: list[float] = []
    for name, f in fid.items():
        color = colors.get(name) or next(palette)
        pred, act = np.asarray(f["predicted"]), np.asarray(f["actual"])
        single = np.asarray([k == "single" for k in f["kind"]])
        shown = "exact Hessian" if name == "exact Hessian (check)" else name
        axes[0].scatter(pred[single], act[single], s=14, color=color, alpha=0.7,
                        label=f"{shown} (ρ={f['spearman']:.2f})")
        axes[1].plot(pred[~single], act[~single], "o-", color=color, markersize=5, label=shown)
        values += [*pred, *act]
    sets = ", ".join(f"{s:g}" for s in result["setup"]["sparsities"])
    for ax, title in zip(axes, ("single weights", f"sets: layer sparsity {sets}"), strict=True):
        ax.axline((0, 0), slope=1, color="0.5", linewidth=1, label="predicted = actual")
        _symlog(ax, values)
        ax.set_xlabel("predicted change ∇Lᵀδ + ½δᵀF̂δ")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("actual loss change")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("quadratic model vs actual loss after OBS pruning with each estimate "
                 "(ρ: Spearman over all points)", fontsize=10)
    fig.tight_layout()
    return fig


def ihvp_figure(result: dict):
    """Cosine of ``F̂⁻¹∇L`` to the exact Newton direction, and the loss decrease along it.

    Returns:
        The matplotlib figure.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    refs = ["exact empirical Fisher", "K-FAC", "diagonal Fisher"]
    _sweep_axis(axes[0], result, "newton_cos", refs, "cosine to (H+λI)⁻¹∇L")
    _sweep_axis(axes[1], result, "loss_decrease_best",
                [*refs, "exact Hessian (check)", "gradient (no curvature)"],
                "loss decrease at the best step")
    axes[0].set_title("IHVP direction vs exact Newton direction", fontsize=9)
    axes[1].set_title("line search along −F̂⁻¹∇L", fontsize=9)
    handles, labels = axes[1].get_legend_handles_labels()
    labels = ["exact Newton" if lab == "exact Hessian (check)" else lab for lab in labels]
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return fig


def study_figures(result: dict) -> dict[str, Any]:
    """Every figure of the study.

    Args:
        result: The output of :func:`woodfisher.fisher.study.analyze_hessian` (or its JSON).

    Returns:
        Key of :data:`FIGURES` → matplotlib figure.
    """
    return {"error": error_figure(result), "heatmaps": heatmap_figure(result),
            "fidelity": fidelity_figure(result), "ihvp": ihvp_figure(result)}


def _save(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Where the study's files go: into a directory, or beside a ``.png`` name as a prefix.

    ``hessian-study`` gives ``hessian-study/error_vs_m.png`` … ``hessian-study/study.json``;
    ``hessian.png`` gives ``hessian-error_vs_m.png`` … ``hessian.json`` beside it.

    Args:
        out: A directory, or a path ending in ``.png``.

    Returns:
        Key of :data:`FIGURES` (and ``"json"``) → path.
    """
    out = Path(out)
    if out.suffix.lower() == ".png":
        stem = out.with_suffix("")
        paths = {k: stem.with_name(f"{stem.name}-{name}") for k, name in FIGURES.items()}
        return {**paths, "json": stem.with_suffix(".json")}
    return {**{k: out / name for k, name in FIGURES.items()}, "json": out / "study.json"}


def write_figures(result: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write every figure as a PNG (see :func:`output_paths`), each atomically.

    Args:
        result: The study's result.
        out: A directory (created if needed) or a ``.png`` name used as a prefix.

    Returns:
        Key → path written.
    """
    plt = _plt()
    paths = {k: p for k, p in output_paths(out).items() if k in FIGURES}
    for key, fig in study_figures(result).items():
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        try:
            _save(fig, paths[key])
        finally:
            plt.close(fig)
    return paths


def print_hessian_table(result: dict, console=None) -> None:
    """Print one row per estimate as a rich table.

    Args:
        result: The study's result.
        console: A ``rich.console.Console``; default one on stdout.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = result["setup"]
    table = Table(title=f"layer {s['layer']} (d={s['d']}) vs exact (H + {s['damp']:g}·I)⁻¹, "
                        f"N={s['num_samples']}, eig(H) in [{s['hessian_min_eig']:.2e}, "
                        f"{s['hessian_max_eig']:.2e}], loss {s['loss']:.4f}")
    cols = [("rel_frobenius", "inverse err"), ("ihvp_cos_random", "cos (random v)"),
            ("newton_cos", "cos (Newton)"), ("newton_rel_err", "err (Newton)"),
            ("loss_decrease_unit", "ΔL step 1"), ("loss_decrease_best", "ΔL best step"),
            ("best_step", "best step")]
    table.add_column("estimate")
    for _, head in cols:
        table.add_column(head, justify="right")
    for row in result["rows"]:
        table.add_row(label(row), *(f"{row[c]:.3g}" if c in row else "" for c, _ in cols))
    console.print(table)
