"""Benchmark: gradual pruning of MLPNet 784-300-100-10 on Fashion-MNIST, and limited data.

Dense: ``woodfisher train`` defaults (10 epochs, SGD+momentum, cosine lr 0.05, batch 128,
seed 0), cached at ``runs/bench-dense-mlpnet.pt``. Then, with the same schedule and seed:

(a) quality: gradual to 95 % and 98 % in 10 epochs (cubic schedule from 50 %, pruning at
    epochs 0..6, fine-tuning to 10) with WoodFisher (gradual's default relative damp,
    ``GRADUAL_RELATIVE_DAMP``, chosen by ``bench/gradual_damp.py`` on a validation split) and
    with global magnitude;
(b) limited data: WoodFisher to 95 % with only the first N training samples for pruning and
    fine-tuning, N in {1000, 5000, all}.

Usage::

    PYTHONPATH=src python bench/gradual.py            # full, writes bench/results/gradual.json
    PYTHONPATH=src python bench/gradual.py --quick    # 4 epochs, fewer configs
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from woodfisher.checkpoint import atomic_save_json, load_checkpoint
from woodfisher.data import load_dataset
from woodfisher.gradual import GRADUAL_RELATIVE_DAMP, GradualConfig, gradual
from woodfisher.train import evaluate, train_and_save

# 400 per-sample gradients in blocks of 400: each block's Fisher has full rank, and a pruning
# step (gradients + 666 batched 400×400 Choleskys) takes a few seconds on 2 CPU cores.
WOODFISHER = {"num_grads": 400, "block_size": 400}


def dense_model(path: Path, data_dir: str | None):
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        train_and_save("mlpnet", "fashion-mnist", out=str(path), data_dir=data_dir,
                       progress=False)
    return load_checkpoint(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 epochs, fewer configs")
    ap.add_argument("--dense", type=Path, default=Path("runs/bench-dense-mlpnet.pt"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gradual.json"))
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, info = dense_model(args.dense, args.data_dir)
    splits = load_dataset("fashion-mnist", data_dir=args.data_dir, normalisation=info["dataset"])
    dense = evaluate(model, splits.test)["accuracy"]
    epochs = 4 if args.quick else 10
    runs = [("woodfisher", 0.95, None), ("magnitude", 0.95, None)]
    if args.quick:
        runs += [("woodfisher", 0.95, 5000)]
    else:
        runs += [("woodfisher", 0.98, None), ("magnitude", 0.98, None),
                 ("woodfisher", 0.95, 1000), ("woodfisher", 0.95, 5000)]
    rows = []
    for method, sparsity, subset in runs:
        cfg = GradualConfig(
            final_sparsity=sparsity, epochs=epochs, method=method, lr=args.lr,
            prune_options=WOODFISHER if method == "woodfisher" else {}, train_subset=subset,
            seed=0,
        )
        start = time.perf_counter()
        res = gradual(copy.deepcopy(model), splits.train, cfg, test_data=splits.test,
                      progress=False)
        prune_s = [r["prune_seconds"] for r in res.history if "prune_seconds" in r]
        rows.append({
            "method": method, "sparsity": sparsity, "train_subset": subset or len(splits.train),
            "accuracy": res.final["test_accuracy"], "drop_points": 100 * (dense - res.final[
                "test_accuracy"]), "reached_sparsity": res.final["sparsity"],
            "seconds": time.perf_counter() - start,
            "prune_step_seconds_mean": sum(prune_s) / len(prune_s),
            "relative_damp": sorted({r["relative_damp"] for r in res.history
                                     if "pruned_to" in r}, key=str),
            "history": [{k: r.get(k) for k in ("epoch", "sparsity", "test_accuracy", "lr")}
                        for r in res.history],
        })
        print(f"{method:10s} {sparsity:.0%} N={rows[-1]['train_subset']:6d}: "
              f"{rows[-1]['accuracy']:.4f} ({rows[-1]['seconds']:.0f} s)", flush=True)

    table = Table(title=f"MLPNet on Fashion-MNIST, gradual over {epochs} epochs "
                        f"(dense {dense:.2%})")
    for col in ("method", "sparsity", "train N", "test acc", "drop (pts)", "prune step s",
                "run s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['sparsity']:.0%}", str(r["train_subset"]),
                      f"{r['accuracy']:.2%}", f"{r['drop_points']:.2f}",
                      f"{r['prune_step_seconds_mean']:.1f}", f"{r['seconds']:.0f}")
    Console().print(table)
    result = {
        "command": "PYTHONPATH=src python bench/gradual.py" + (" --quick" if args.quick else ""),
        "dense_accuracy": dense, "epochs": epochs, "lr": args.lr,
        "woodfisher": {**WOODFISHER, "relative_damp": GRADUAL_RELATIVE_DAMP},
        "schedule": "cubic 0.5 -> final, pruning epochs 0..ceil(2E/3)-1, cosine lr per batch",
        "runs": rows, "total_seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_json(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
