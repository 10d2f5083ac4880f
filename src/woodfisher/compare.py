"""Compare one-shot pruning methods over a grid of sparsities, from one trained checkpoint.

The table, JSON and accuracy-vs-sparsity plot behind ``woodfisher compare`` and the demo.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.utils.data import TensorDataset

from woodfisher.data import DatasetSplits
from woodfisher.pruning import METHODS, prune
from woodfisher.train import evaluate

__all__ = ["compare", "compare_table", "plot_compare", "pruning_batches"]


def pruning_batches(
    train: TensorDataset, num_samples: int, seed: int = 0, batch_size: int = 100
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random subset of a training set, as a list of batches (what ``prune`` reads).

    Args:
        train: The training split.
        num_samples: Samples to take (all of them if the split is smaller).
        seed: Seed of the draw.
        batch_size: Samples per batch.

    Returns:
        A list of ``(x, y)`` batches.

    Raises:
        ValueError: If ``num_samples`` or ``batch_size`` is not positive.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}"
        )
    x, y = train.tensors[:2]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return [(x[order[s : s + batch_size]], y[order[s : s + batch_size]])
            for s in range(0, len(order), batch_size)]


def compare(
    model: nn.Module,
    splits: DatasetSplits,
    methods: Sequence[str],
    sparsities: Sequence[float],
    *,
    num_samples: int | None = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    sequential: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prune a copy of ``model`` with every method at every sparsity and evaluate each.

    Args:
        model: The trained dense (or already pruned) model; left unchanged.
        splits: Its dataset (pruning draws from ``train``, accuracy is on ``test``).
        methods: Keys of :data:`woodfisher.pruning.METHODS`.
        sparsities: Targets in [0, 1).
        num_samples: Training samples handed to the pruner; default enough for the gradients
            plus 1000 held-out samples.
        seed: Seed of the sample draw and of the pruner.
        options: Extra keyword options for :func:`woodfisher.prune`, used for every method
            that accepts them (``update`` is dropped for magnitude, ``relative_damp`` for
            kfac, which keeps its absolute default damp).
        sequential: Walk the sorted sparsities with one copy per method, each target
            pruned from the previous one (recompute steps between them), instead of a fresh
            copy per target. With ``recompute="auto"`` the path to the top sparsity takes the
            same steps either way, so this costs about one prune per method, not one per cell.
        log: Receives one line per finished run.

    Returns:
        ``{"dense": {accuracy, loss}, "rows": [{method, sparsity, accuracy, loss, seconds,
        update, damp, relative_damp, predicted_increase, layers}], "seed", "options"}``.

    Raises:
        ValueError: For an unknown method or a sparsity outside [0, 1), before any work.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    for s in sparsities:
        if not 0 <= s < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {s}")
    options = dict(options or {})
    log = log or (lambda _msg: None)
    if num_samples is None:
        grads = options.get("num_grads") or 1000
        num_samples = grads * options.get("samples_per_grad", 1) + 1000
    batches = pruning_batches(splits.train, num_samples, seed)
    dense = evaluate(model, splits.test)
    rows = []
    for method in methods:
        opts = dict(options)
        if method == "magnitude":
            opts.pop("update", None)
        if METHODS[method].curvature == "kfac":
            opts.pop("relative_damp", None)
        net = copy.deepcopy(model)
        for s in sorted(sparsities) if sequential else sparsities:
            if not sequential:
                net = copy.deepcopy(model)
            t0 = time.perf_counter()
            result = prune(net, batches, s, method=method, seed=seed, **opts)
            seconds = time.perf_counter() - t0
            ev = evaluate(net, splits.test)
            rows.append({
                "method": method, "sparsity": s, "accuracy": ev["accuracy"], "loss": ev["loss"],
                "seconds": seconds, "update": result.update, "damp": result.damp,
                "relative_damp": result.relative_damp,
                "predicted_increase": result.predicted_increase,
                "layers": [vars(layer) for layer in result.layers],
            })
            log(f"{method} at {s:.0%}: accuracy {ev['accuracy']:.2%} ({seconds:.1f} s)")
    return {"dense": {"accuracy": dense["accuracy"], "loss": dense["loss"]}, "rows": rows,
            "seed": seed, "sequential": sequential,
            "options": {k: v for k, v in options.items() if k != "loss_fn"}}


def compare_table(report: dict[str, Any], title: str | None = None) -> Table:
    """The accuracy grid of a :func:`compare` report: a row per method, a column per sparsity.

    Returns:
        A rich table (accuracy in %).
    """
    sparsities = sorted({r["sparsity"] for r in report["rows"]})
    dense = f"dense {100 * report['dense']['accuracy']:.2f}"
    table = Table(title=f"{title or 'test accuracy (%) after one-shot pruning'}; {dense}")
    table.add_column("method")
    for s in sparsities:
        table.add_column(f"{s:.0%}", justify="right")
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        acc = {r["sparsity"]: r["accuracy"] for r in report["rows"] if r["method"] == method}
        table.add_row(method, *(f"{100 * acc[s]:.2f}" if s in acc else "" for s in sparsities))
    return table


def plot_compare(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Accuracy against sparsity, one line per method, dense accuracy dashed; written atomically.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = dict.fromkeys(r["method"] for r in report["rows"])
    for method in methods:
        rows = sorted((r for r in report["rows"] if r["method"] == method),
                      key=lambda r: r["sparsity"])
        ax.plot([100 * r["sparsity"] for r in rows], [100 * r["accuracy"] for r in rows],
                "o-", label=method)
    ax.axhline(100 * report["dense"]["accuracy"], color="gray", ls="--", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "one-shot pruning, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
