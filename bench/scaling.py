"""Benchmark: time and peak memory of one one-shot WoodFisher step against d, block size and m.

One step = build :class:`~woodfisher.fisher.EmpiricalFisherInverse` from synthetic (m, d)
float32 gradients, take its diagonal, OBS saliencies, global selection of 90 % of the weights and
the independent OBS update (one ``mul``). Each configuration runs in a fresh subprocess, so the
peak RSS (``ru_maxrss``) is that configuration's own; it is shown next to ``plan_memory``'s
estimate (which counts the gradients, the kept factors and the largest working set, not the
weights, saliencies and update vectors of size d, nor the Python/torch baseline).

The grid varies one axis at a time around d = 1e6, m = 100, B = 1000, plus d = 1e7 with m = 10.

Usage::

    PYTHONPATH=src python bench/scaling.py --out bench/results/scaling.json
    PYTHONPATH=src python bench/scaling.py --quick   # smaller grid
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from woodfisher.checkpoint import atomic_save_json

FULL = [
    # (d, m, B): vary d, then B, then m around (1e6, 100, 1000)
    (10**4, 100, 1000), (10**5, 100, 1000), (10**6, 100, 1000), (10**7, 10, 1000),
    (10**6, 100, 100), (10**6, 100, 10000),
    (10**6, 10, 1000), (10**6, 1000, 1000),
]
QUICK = [(10**4, 100, 1000), (10**5, 100, 1000), (10**5, 100, 100), (10**5, 10, 1000)]


def one(d: int, m: int, B: int, seed: int) -> dict:
    """Run one configuration in this process.

    Returns:
        Times per phase, peak RSS and the memory plan.
    """
    from woodfisher.fisher import EmpiricalFisherInverse, plan_memory
    from woodfisher.pruning.obs import independent_update, obs_saliency
    from woodfisher.pruning.select import select

    torch.manual_seed(seed)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads, w = torch.randn(m, d), torch.randn(d)
    times = {}
    t0 = time.perf_counter()
    inv = EmpiricalFisherInverse(grads, block_size=B, damp=1e-5)
    times["inverse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    diag = inv.diag()
    times["diag"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    remove = select(obs_saliency(w, diag), int(0.9 * d))
    times["select"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta = independent_update(w, remove, inv, inv_diag=diag)
    w = torch.where(remove, torch.zeros_like(w), w + delta)
    times["update"] = time.perf_counter() - t0
    plan = plan_memory(d, m, B)
    return {
        "d": d, "m": m, "block_size": B, "times": times, "total_s": sum(times.values()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_bytes": base, "plan_bytes": plan.total_bytes, "plan": str(plan),
        "path": plan.path,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    parser.add_argument("--quick", action="store_true", help="small grid (d <= 1e5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", nargs=3, type=int, metavar=("D", "M", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.seed)))
        return
    rows = []
    gib = 2**30
    print(f"{'d':>9} {'m':>5} {'B':>6} {'inverse':>8} {'diag':>7} {'select':>7} {'update':>7}"
          f" {'total s':>8} {'plan GiB':>9} {'peak RSS GiB':>13}  path", flush=True)
    for d, m, B in QUICK if args.quick else FULL:
        cmd = [sys.executable, __file__, "--one", str(d), str(m), str(B), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode:
            print(f"{d:>9} {m:>5} {B:>6} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        t = r["times"]
        print(f"{d:>9.0e} {m:>5} {B:>6} {t['inverse']:>8.3f} {t['diag']:>7.3f} {t['select']:>7.3f}"
              f" {t['update']:>7.3f} {r['total_s']:>8.3f} {r['plan_bytes'] / gib:>9.3f}"
              f" {r['peak_rss_bytes'] / gib:>13.3f}  {r['path']}", flush=True)
    result = {"seed": args.seed, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "dtype": "float32", "sparsity": 0.9, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
