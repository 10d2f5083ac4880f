"""Benchmark: the default one-shot prune of MLPNet 784-300-100-10 to 90 %, end to end.

``woodfisher.prune(model, data, 0.9, num_grads=1000)`` with every other option at its default
(block 500, joint update, automatic steps) on the trained Fashion-MNIST MLPNet, along three
paths in the same run:

- ``default``: what ``prune`` does unless told otherwise since issue 13: gradients once,
  streamed into block Grams, inverted once, Schur-downdated through the steps, and the Fisher
  re-estimated over the kept weights before the late steps (``refresh``, a small fraction of
  the first build's cost);
- ``downdate-late``: refreshed only before the steps that start with at most 40 % of the
  weights (``refresh=0.4``, the value chosen on MLPNet's validation split);
- ``downdate-once``: the same without a refresh (``refresh=0``): one Fisher for all steps;
- ``resample``: the paper's recomputation, the default before issue 13: fresh gradients and a
  fresh inverse at every step.

Each run is a fresh process, so its peak RSS is its own; the report gives wall time per phase,
test accuracy, peak RSS against the memory plan made before the prune (``woodfisher.plan``,
baseline = the process's RSS just before), time ratios, and the load average (the machine
is shared: read the ratios, not the seconds).

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/end_to_end.py
    PYTHONPATH=src python bench/end_to_end.py --quick   # 1 run per path
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PATHS = ("default", "downdate-late", "downdate-once", "resample")
#: prune() options of each path (on top of the defaults).
PATH_OPTIONS = {
    "default": {},
    "downdate-late": {"recompute_by": "downdate", "refresh": 0.4},
    "downdate-once": {"recompute_by": "downdate", "refresh": 0.0},
    "resample": {"recompute_by": "resample"},
}


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> None:
    """One prune in this (fresh) process; prints one JSON line."""
    import torch
    from common import dense_checkpoint

    import woodfisher as wf
    from woodfisher.compare import pruning_batches
    from woodfisher.data import load_dataset
    from woodfisher.params import select_modules
    from woodfisher.plan import plan_prune

    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = dense_checkpoint(args.model)
    splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
    data = pruning_batches(splits.train, args.num_grads + 1000, args.seed)
    sizes = [m.weight.numel() for m in select_modules(model).values()]
    opts = PATH_OPTIONS[args.child]
    plan = plan_prune(sizes, args.num_grads, args.block_size,
                      recompute_by=opts.get("recompute_by", "auto"), baseline=_rss_now())
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    res = wf.prune(model, data, args.sparsity, num_grads=args.num_grads,
                   block_size=args.block_size, seed=args.seed, **opts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc = wf.evaluate(model, splits.test)["accuracy"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "path": res.path, "wall_s": wall, "cpu_s": cpu, "times": res.times,
        "steps": len(res.steps), "accuracy": acc, "sparsity": res.sparsity,
        "peak_rss_bytes": peak, "plan_bytes": plan.total_bytes, "plan": plan.to_dict(),
        "rss_over_plan": peak / plan.total_bytes, "load_before": load0,
        "load_after": os.getloadavg(), "threads": torch.get_num_threads(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/end_to_end.json"))
    parser.add_argument("--quick", action="store_true", help="1 run per path instead of 3")
    parser.add_argument("--model", default="mlpnet")
    parser.add_argument("--num-grads", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=500)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from common import machine_info

    from woodfisher.checkpoint import atomic_save_json

    repeats = 1 if args.quick else 3
    base = [sys.executable, __file__, "--model", args.model, "--num-grads", str(args.num_grads),
            "--block-size", str(args.block_size), "--sparsity", str(args.sparsity),
            "--seed", str(args.seed), "--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {p: [] for p in args.paths.split(",")}
    for _ in range(repeats):
        for path in runs:  # interleaved, so that both paths see the same load
            out = subprocess.run([*base, "--child", path], check=True, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": "src"})
            runs[path].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[path][-1]
            print(f"{path:9s} {r['wall_s']:7.2f} s wall {r['cpu_s']:7.2f} s cpu, "
                  f"accuracy {r['accuracy']:.4f}, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} "
                  f"GiB = {r['rss_over_plan']:.2f} x plan, load {r['load_before'][0]:.1f}",
                  flush=True)
    summary = {}
    for path, rs in runs.items():
        summary[path] = {
            "median_wall_s": statistics.median(r["wall_s"] for r in rs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "median_times": {k: statistics.median(r["times"][k] for r in rs)
                             for k in rs[0]["times"]},
            "accuracy": rs[0]["accuracy"],
            "steps": rs[0]["steps"],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "plan_bytes": rs[0]["plan_bytes"],
            "rss_over_plan": max(r["rss_over_plan"] for r in rs),
        }
    if {"default", "resample"} <= set(summary):
        summary["resample_over_default_wall"] = (
            summary["resample"]["median_wall_s"] / summary["default"]["median_wall_s"]
        )
        summary["resample_over_default_cpu"] = (
            summary["resample"]["median_cpu_s"] / summary["default"]["median_cpu_s"]
        )
        print(f"resample / default: {summary['resample_over_default_wall']:.1f}x wall, "
              f"{summary['resample_over_default_cpu']:.1f}x cpu")
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"machine": machine_info(), "options": options | {"repeats": repeats},
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
