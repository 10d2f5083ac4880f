"""Benchmark: one-shot WoodFisher pruning of a whole ResNet-50 (all conv + fc weights, ~25.5 M).

Random 3×32×32 inputs and random labels (timing and memory do not depend on training), block
size from ``plan_memory`` under ``--max-memory`` (largest candidate that fits), ``--num-grads``
per-sample gradients, independent OBS update to ``--sparsity``. Reports ``result.times`` per phase
and the peak RSS (``ru_maxrss``); goal: completes with peak ≤ 16 GiB on a 24 GiB machine.

Usage::

    PYTHONPATH=src python bench/resnet50.py --out bench/results/resnet50.json
    PYTHONPATH=src python bench/resnet50.py --quick   # m = 8, 100 classes
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from woodfisher.checkpoint import atomic_save_json
from woodfisher.fisher import plan_memory
from woodfisher.fisher.memory import suggest_block_size
from woodfisher.gradients import gradient_layout
from woodfisher.models import build_model
from woodfisher.pruning import prune

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/resnet50.json"))
    parser.add_argument("--quick", action="store_true", help="m = 8 gradients, 100 classes")
    parser.add_argument("--num-grads", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--max-memory-gib", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.num_grads, args.num_classes = 8, 100
    torch.manual_seed(args.seed)
    model = build_model("resnet50", (3, 32, 32), args.num_classes)
    sizes = gradient_layout(model)[1].sizes
    d, m = sum(sizes), args.num_grads
    budget = int(args.max_memory_gib * GIB)
    block = suggest_block_size(d, m, 100_000, sizes, torch.float32, "fast", budget)
    plan = plan_memory(d, m, block, sizes)
    print(f"ResNet-50: d = {d:,} pruned weights, m = {m}, block size {block}: {plan}", flush=True)
    x = torch.randn(m, 3, 32, 32)
    y = torch.randint(0, args.num_classes, (m,))
    t0 = time.perf_counter()
    res = prune(model, [(x, y)], args.sparsity, method="woodfisher", num_grads=m,
                block_size=block, update="independent", recompute=1, seed=args.seed)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for k, v in res.times.items():
        print(f"  {k:<12} {v:8.2f} s")
    print(f"  {'total wall':<12} {wall:8.2f} s, peak RSS {peak / GIB:.2f} GiB (goal ≤ 16 GiB), "
          f"sparsity {res.sparsity:.3f}")
    out = {"d": d, "num_grads": m, "block_size": block, "num_classes": args.num_classes,
           "input_shape": [3, 32, 32], "sparsity": res.sparsity, "seed": args.seed,
           "plan": str(plan), "plan_bytes": plan.total_bytes, "times": dict(res.times),
           "wall_s": wall, "peak_rss_bytes": peak, "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
