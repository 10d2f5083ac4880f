"""The `make demo` / `woodfisher demo` walk-through.

For now: train MLPNet (784-300-100-10) on Fashion-MNIST, or on scikit-learn's digits when the
Fashion-MNIST files are absent, cache the checkpoint under ``out_dir`` and evaluate it. Pruning
with several methods will be added here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from woodfisher.checkpoint import CheckpointError, load_checkpoint
from woodfisher.data import DataError, fashion_mnist_files, load_dataset
from woodfisher.train import evaluate, sparsity_report, train_and_save

__all__ = ["DEMO_EPOCHS", "run_demo"]

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
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) a dense model and evaluate it.

    Args:
        out_dir: Directory for the cached checkpoint (created if missing).
        dataset: ``"fashion-mnist"``, ``"digits"``, or ``None`` for Fashion-MNIST when its files
            are found and digits otherwise.
        model: Model name (see ``woodfisher.models.MODELS``).
        epochs: Training epochs; ``None`` uses ``DEMO_EPOCHS[dataset]``.
        seed: Seed of initialisation and shuffling.
        data_dir: Directory with the Fashion-MNIST files.
        retrain: Train even if a matching cached checkpoint exists.
        progress: Show progress bars on stderr.
        log: Receives one-line status messages (nothing is printed otherwise).

    Returns:
        ``{"dataset", "model", "checkpoint", "reused", "epochs", "seed", "train_time_s",
        "accuracy", "loss", "sparsity", "layers"}``.

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
    return {
        "dataset": dataset, "model": model, "checkpoint": str(ckpt), "reused": reused,
        "epochs": epochs, "seed": seed, "train_time_s": info["meta"].get("time_s"),
        "accuracy": result["accuracy"], "loss": result["loss"],
        "sparsity": report["sparsity"], "layers": report["layers"],
    }
