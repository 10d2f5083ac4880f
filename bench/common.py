"""What every benchmark shares: cached dense models and a record of the machine.

Dense models are trained with ``woodfisher train`` defaults (or the epochs given) and cached
under ``$WOODFISHER_BENCH_CACHE`` (default ``runs/bench``), so that benchmarks run one after
another, or side by side, train each model once.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from woodfisher.checkpoint import load_checkpoint, versions
from woodfisher.train import train_and_save


def cache_dir() -> Path:
    """Where dense models are cached.

    Returns:
        ``$WOODFISHER_BENCH_CACHE`` or ``runs/bench``.
    """
    return Path(os.environ.get("WOODFISHER_BENCH_CACHE", "runs/bench"))


def dense_checkpoint(
    model: str, dataset: str = "fashion-mnist", seed: int = 0, epochs: int = 10
) -> tuple[torch.nn.Module, dict]:
    """A trained dense model, from the cache or trained now (then cached).

    Returns:
        ``(model, info)`` as :func:`woodfisher.load_checkpoint` gives them.
    """
    path = cache_dir() / f"{model}-{dataset}-seed{seed}-e{epochs}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        train_and_save(model, dataset, out=str(path), seed=seed, epochs=epochs, progress=False)
    return load_checkpoint(path)


def machine_info() -> dict[str, object]:
    """The machine, threads, load and versions, to store beside every result.

    Returns:
        A JSON-able dict.
    """
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": load,
        **versions(),
    }
