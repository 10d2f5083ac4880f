"""What ``woodfisher fdnp`` writes: the checkpoint, a JSON log, and two pictures.

* ``OUT`` — the trained model; its DCTConv2d layers and masks reload with
  :func:`woodfisher.load_checkpoint` (``woodfisher evaluate OUT`` works);
* ``OUT.resume.pt`` — the resume file (after every epoch);
* ``OUT.json`` — options, dense accuracy and every epoch (after every epoch), then the report;
* ``OUT.png`` — test accuracy and compression against epoch;
* ``OUT.bands.png`` — the fraction of coefficients kept in each frequency band, per layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from woodfisher.checkpoint import atomic_save_json, atomic_savefig
from woodfisher.frequency.fdnp import FDNPError, fdnp, output_paths
from woodfisher.resume import open_job

__all__ = ["plot_bands", "plot_history", "run_fdnp"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike,
                 dense_accuracy: float | None = None) -> Path:
    """Accuracy and compression against epoch, as a PNG (written atomically).

    Args:
        history: Rows of an FDNP report's ``history``.
        path: The PNG file.
        dense_accuracy: Drawn as a dashed line when given.

    Returns:
        ``path`` as a ``Path``.
    """
    plt, MaxNLocator = _pyplot(), _locator()
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history and all("test_accuracy" in r for r in history):
        ax.plot(epochs, [100 * r["test_accuracy"] for r in history], "o-", label="test accuracy")
    ax.plot(epochs, [100 * r["train_accuracy"] for r in history], "s--", label="train accuracy")
    if dense_accuracy is not None:
        ax.axhline(100 * dense_accuracy, color="grey", ls="--", lw=1, label="dense test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax.twinx()
    ax2.plot(epochs, [r["compression"] for r in history], "k:", marker="^", label="compression")
    ax2.set_ylabel("compression (×, pruned convs)")
    ax2.set_ylim(bottom=0)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower center", fontsize=8)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


def plot_bands(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Kept fraction of the coefficients per frequency band ``u+v``, one line per layer.

    The thick line is all layers of that kernel size together. A spatial (DNS) run has no
    bands; the picture then says so.

    Args:
        report: An FDNP report.
        path: The PNG file.

    Returns:
        ``path`` as a ``Path``.
    """
    plt, MaxNLocator = _pyplot(), _locator()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = [r for r in report["layers"] if "bands" in r]
    for r in rows:
        ax.plot(range(len(r["bands"])), [100 * f for f in r["bands"]], "-", alpha=0.5, lw=1,
                label=r["name"] if len(rows) <= 8 else None)
    for size, band in report.get("bands", {}).items():
        ax.plot(range(len(band["kept_fraction"])), [100 * f for f in band["kept_fraction"]],
                "k-o", lw=2.5, label=f"all {size} layers")
    if not rows:
        ax.text(0.5, 0.5, "spatial-domain run: no frequency bands", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("frequency band u+v (0 = DC)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("coefficients kept (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['method']}: {report['compression']:.2f}× over the pruned convs",
                 fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


def run_fdnp(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    data_dir: str | None = None,
    progress: bool = True,
    device: str | Any | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Load a checkpoint and its dataset, run :func:`~woodfisher.frequency.fdnp`, write files.

    Args:
        checkpoint: A checkpoint written by ``woodfisher train``.
        out: The output checkpoint; default ``<checkpoint stem>-fdnp.pt`` beside it.
        resume: Continue from ``out``'s resume file.
        data_dir: Directory of the dataset files.
        progress: Progress bars on stderr.
        device: Where to train (see :func:`woodfisher.device.resolve_device`); default CPU.
        **options: ``compression``, ``epochs``, ``band_adaptive``, ``seed`` and the fields of
            :class:`~woodfisher.frequency.fdnp.FDNPConfig`.

    Returns:
        The report plus the paths written and the dense accuracy.

    Raises:
        ValueError: On bad input (options, checkpoint, dataset, unwritable output), checked
            before the training where it can be.
    """
    from woodfisher.checkpoint import save_checkpoint
    from woodfisher.frequency.fdnp import FDNPConfig
    from woodfisher.train import evaluate

    try:
        FDNPConfig(**options).check()
    except TypeError as e:
        raise FDNPError(f"bad fdnp option: {e}") from None
    out, paths, model, info, splits = open_job(checkpoint, out, "fdnp", output_paths, FDNPError,
                                                "train on", data_dir, device)
    saved = info["dataset"]
    dense = evaluate(model, splits.test)["accuracy"]

    def write_log(history: list[dict[str, Any]], report: dict | None = None) -> None:
        atomic_save_json({"checkpoint": str(checkpoint), "options": options,
                          "dense_accuracy": dense, "history": history,
                          **({"report": report} if report else {})}, paths["log"])

    report = fdnp(model, splits.train, test_data=splits.test, resume_path=paths["resume"],
                  resume=resume, progress=progress, callback=write_log, **options)
    meta = {"fdnp": report["config"], "source": str(checkpoint), "history": report["history"],
            "test_accuracy": report.get("test_accuracy"), "dense_accuracy": dense,
            "compression": report["compression"]}
    save_checkpoint(paths["checkpoint"], model, info["model"], saved, meta)
    write_log(report["history"], report)
    plot_history(report["history"], paths["plot"], dense)
    plot_bands(report, paths["bands"])
    return {**report, **{k: str(v) for k, v in paths.items()}, "dense_accuracy": dense}
