"""The `make demo` / `woodfisher demo` walk-through.

Train MLPNet (784-300-100-10) on Fashion-MNIST, or on scikit-learn's digits when the
Fashion-MNIST files are absent, cache the checkpoint under ``out_dir``, evaluate it, then prune
it one-shot with magnitude, diagonal Fisher, K-FAC and WoodFisher at 50-98 % sparsity and
write the accuracy-vs-sparsity table (JSON) and plot (PNG) beside the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from woodfisher.checkpoint import CheckpointError, atomic_save_json, load_checkpoint
from woodfisher.data import DataError, fashion_mnist_files, load_dataset
from woodfisher.train import evaluate, sparsity_report, train_and_save

__all__ = ["DEMO_EPOCHS", "DEMO_METHODS", "DEMO_SPARSITIES", "run_demo"]

DEMO_METHODS = ("magnitude", "diag-fisher", "kfac", "woodfisher")
DEMO_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)

#: Epochs per dataset: ~10 s on 2 CPU cores for Fashion-MNIST, ~1 s for digits.
DEMO_EPOCHS = {"fashion-mnist": 10, "digits": 30}


def _choose_dataset(
    dataset: str | None, data_dir: str | os.PathLike | None, log: Callable[[str], None]
) -> str:
    if dataset is not None:
        return dataset
    try:
        fashion_mnist_files(data_dir)
    except DataError as e:
        log(f"Fashion-MNIST unavailable ({e}); the demo falls back to digits")
        return "digits"
    return "fashion-mnist"


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    dataset: str | None = None,
    model: str = "mlpnet",
    epochs: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    prune: bool = True,
    methods: tuple[str, ...] = DEMO_METHODS,
    sparsities: tuple[float, ...] = DEMO_SPARSITIES,
    prune_options: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) a dense model, evaluate it and compare one-shot pruning methods.

    Args:
        out_dir: Directory for the cached checkpoint (created if missing).
        dataset: ``"fashion-mnist"``, ``"digits"``, or ``None`` for Fashion-MNIST when its files
            are found and digits otherwise.
        model: Model name (see ``woodfisher.models.MODELS``).
        epochs: Training epochs; ``None`` uses ``DEMO_EPOCHS[dataset]``.
        seed: Seed of initialisation and shuffling.
        data_dir: Directory with the Fashion-MNIST files.
        retrain: Train even if a matching cached checkpoint exists.
        prune: Run the pruning comparison (``DEMO_METHODS`` × ``DEMO_SPARSITIES``, each method
            walking the sparsities in order; see :func:`woodfisher.compare.compare`).
        methods: Methods to compare.
        sparsities: Sparsities to compare them at.
        prune_options: Extra options for :func:`woodfisher.prune` (default: its defaults).
        progress: Show progress bars on stderr.
        log: Receives one-line status messages (nothing is printed otherwise).

    Returns:
        ``{"dataset", "model", "checkpoint", "reused", "epochs", "seed", "train_time_s",
        "accuracy", "loss", "sparsity", "layers", "comparison", "report", "plot"}``.

    Raises:
        ValueError: On bad input (unknown names, missing data for an explicit dataset, an
            ``out_dir`` that cannot be created).
    """
    log = log or (lambda _msg: None)
    dataset = _choose_dataset(dataset, data_dir, log)
    epochs = DEMO_EPOCHS.get(dataset, 10) if epochs is None else epochs
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create demo directory {out}: {e}") from e
    ckpt = out / f"{model}-{dataset}-seed{seed}-e{epochs}.pt"

    net, info, reused = None, None, False
    if ckpt.is_file() and not retrain:
        try:
            net, info = load_checkpoint(ckpt)
            reused = True
            log(f"reusing {ckpt}")
        except CheckpointError as e:
            log(f"retraining: cached {ckpt} unusable ({e})")
    if net is None:
        log(f"training {model} on {dataset} for {epochs} epochs (seed {seed}) -> {ckpt}")
        net, info = train_and_save(model, dataset, out=str(ckpt), epochs=epochs, seed=seed,
                                   data_dir=data_dir, progress=progress)
    splits = load_dataset(dataset, data_dir=data_dir,
                          normalisation=info["dataset"] if "mean" in info["dataset"] else None)
    result = evaluate(net, splits.test)
    report = sparsity_report(net)
    comparison, report_path, plot_path = None, None, None
    if prune:
        from woodfisher.compare import compare, plot_compare

        comparison = compare(net, splits, methods, sparsities, seed=seed,
                             options=prune_options, sequential=True, log=log)
        report_path = ckpt.with_suffix(".compare.json")
        atomic_save_json(comparison, report_path)
        plot_path = plot_compare(comparison, ckpt.with_suffix(".compare.png"),
                                 title=f"{model} on {dataset}, one-shot, no fine-tuning")
    return {
        "dataset": dataset, "model": model, "checkpoint": str(ckpt), "reused": reused,
        "epochs": epochs, "seed": seed, "train_time_s": info["meta"].get("time_s"),
        "accuracy": result["accuracy"], "loss": result["loss"],
        "sparsity": report["sparsity"], "layers": report["layers"],
        "comparison": comparison, "report": None if report_path is None else str(report_path),
        "plot": None if plot_path is None else str(plot_path),
    }
