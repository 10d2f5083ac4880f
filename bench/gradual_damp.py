"""Benchmark: how the damp of gradual WoodFisher was chosen, on a validation split only.

The test split never takes part. MLPNet 784-300-100-10 is trained with ``woodfisher train``
defaults on the first 50,000 Fashion-MNIST training images (cached at
``runs/bench-dense-mlpnet-val.pt``); gradual pruning (the schedule of ``bench/gradual.py``:
10 epochs, cubic from 50 %, pruning at epochs 0..6) fine-tunes on the same 50,000 and is scored
on the held-out training images 50,000..59,999. WoodFisher (m = B = 400) runs with several
relative damps, global magnitude with the same seeds as the reference.

``woodfisher.gradual.GRADUAL_RELATIVE_DAMP`` is the value this table picked.

Usage::

    PYTHONPATH=src python bench/gradual_damp.py   # ~25 min, bench/results/gradual_damp.json
    PYTHONPATH=src python bench/gradual_damp.py --damps 100 --sparsities 0.95 --seeds 0
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
from torch.utils.data import TensorDataset

from woodfisher.checkpoint import atomic_save_json
from woodfisher.data import load_dataset
from woodfisher.gradual import GradualConfig, gradual
from woodfisher.models import build_model
from woodfisher.train import evaluate, train

FIT = 50_000
WOODFISHER = {"num_grads": 400, "block_size": 400}


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--damps", type=floats, default=[1e-2, 1.0, 100.0, 1000.0],
                    help="relative damps of WoodFisher (comma-separated)")
    ap.add_argument("--sparsities", type=floats, default=[0.95, 0.98])
    ap.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1])
    ap.add_argument("--extra-seed-damp", type=float, default=100.0,
                    help="the one damp also run with every seed after the first")
    ap.add_argument("--dense", type=Path, default=Path("runs/bench-dense-mlpnet-val.pt"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gradual_damp.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    splits = load_dataset("fashion-mnist", data_dir=args.data_dir)
    x, y = splits.train.tensors
    fit, val = TensorDataset(x[:FIT], y[:FIT]), TensorDataset(x[FIT:], y[FIT:])
    torch.manual_seed(0)
    model = build_model("mlpnet", splits.input_shape, splits.num_classes)
    if args.dense.is_file():
        model.load_state_dict(torch.load(args.dense, weights_only=True))
    else:
        train(model, fit, seed=0, progress=False)
        args.dense.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.dense)
    dense = evaluate(model, val)["accuracy"]

    runs = [("magnitude", s, None, seed) for s in args.sparsities for seed in args.seeds]
    runs += [("woodfisher", s, d, args.seeds[0]) for s in args.sparsities for d in args.damps]
    runs += [("woodfisher", s, args.extra_seed_damp, seed)
             for s in args.sparsities for seed in args.seeds[1:]]
    rows = []
    for method, sparsity, damp, seed in runs:
        options = {} if method == "magnitude" else {**WOODFISHER, "relative_damp": damp}
        cfg = GradualConfig(final_sparsity=sparsity, epochs=10, method=method,
                            prune_options=options, seed=seed)
        start = time.perf_counter()
        res = gradual(copy.deepcopy(model), fit, cfg, test_data=val, progress=False)
        rows.append({"method": method, "sparsity": sparsity, "relative_damp": damp,
                     "seed": seed, "val_accuracy": res.final["test_accuracy"],
                     "seconds": time.perf_counter() - start})
        print(f"{method:10s} {sparsity:.0%} damp {damp} seed {seed}: "
              f"{rows[-1]['val_accuracy']:.4f} ({rows[-1]['seconds']:.0f} s)", flush=True)

    table = Table(title=f"Gradual MLPNet, validation accuracy (dense {dense:.2%})")
    for col in ("method", "relative damp", "seed", *(f"{s:.0%}" for s in args.sparsities)):
        table.add_column(col, justify="left" if col == "method" else "right")
    keys = sorted({(r["method"], r["relative_damp"] or 0.0, r["seed"]) for r in rows})
    for method, damp, seed in keys:
        cells = [next((f"{r['val_accuracy']:.2%}" for r in rows
                       if (r["method"], r["relative_damp"] or 0.0, r["seed"], r["sparsity"])
                       == (method, damp, seed, s)), "") for s in args.sparsities]
        table.add_row(method, f"{damp:g}" if method != "magnitude" else "-", str(seed), *cells)
    Console().print(table)
    atomic_save_json({
        "command": "PYTHONPATH=src python bench/gradual_damp.py",
        "protocol": f"dense and fine-tuning on train[:{FIT}], accuracy on train[{FIT}:]",
        "dense_val_accuracy": dense, "woodfisher": WOODFISHER, "runs": rows,
        "total_seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
