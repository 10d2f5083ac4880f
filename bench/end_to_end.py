"""Benchmark: one-shot WoodFisher on MLPNet 784-300-100-10 end to end (goal: ≤ 10 s, 2 cores).

Gradients (1000 per-sample), inverse (block 1000), selection (global, 90 %) and the OBS
update (joint by default, ``--update independent`` for the paper's), in one step, as timed by
``woodfisher.prune`` in ``result.times``. Untrained weights (the timing does not depend on
them); Fashion-MNIST if its files are installed, else scikit-learn's digits at their own 8×8
shape (MLPNet 64-300-100-10).

Usage::

    PYTHONPATH=src python bench/end_to_end.py --out bench/results/end_to_end.json
    PYTHONPATH=src python bench/end_to_end.py --quick   # 1 repeat
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from woodfisher.checkpoint import atomic_save_json
from woodfisher.data import load_dataset
from woodfisher.models import build_model
from woodfisher.pruning import prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/end_to_end.json"))
    parser.add_argument("--quick", action="store_true", help="1 repeat instead of 3")
    parser.add_argument("--num-grads", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=1000)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--update", default="joint", choices=["independent", "joint"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    try:
        ds = load_dataset("fashion-mnist")
    except Exception:  # noqa: BLE001 - any missing-data error falls back to digits
        ds = load_dataset("digits")
    x, y = ds.train.tensors
    data = [(x[i : i + 100], y[i : i + 100]) for i in range(0, args.num_grads, 100)]
    runs = []
    for _ in range(repeats):
        torch.manual_seed(args.seed)
        model = build_model("mlpnet", ds.input_shape, ds.num_classes)
        t0 = time.perf_counter()
        res = prune(
            model,
            data,
            args.sparsity,
            method="woodfisher",
            num_grads=args.num_grads,
            block_size=args.block_size,
            update=args.update,
            recompute=1,
            seed=args.seed,
        )
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, "times": dict(res.times), "sparsity": res.sparsity})
    phases = sorted({k for r in runs for k in r["times"]})
    med = {k: statistics.median(r["times"].get(k, 0.0) for r in runs) for k in phases}
    wall = statistics.median(r["wall_s"] for r in runs)
    print(
        f"MLPNet on {ds.name}, m={args.num_grads}, B={args.block_size}, "
        f"sparsity {args.sparsity}, {torch.get_num_threads()} threads, median of {repeats}"
    )
    for k in phases:
        print(f"  {k:<12} {med[k]:8.3f} s")
    print(f"  {'total wall':<12} {wall:8.3f} s   (goal ≤ 10 s)")
    out = {
        "dataset": ds.name,
        "num_grads": args.num_grads,
        "block_size": args.block_size,
        "sparsity": args.sparsity,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "median_times": med,
        "median_wall_s": wall,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
