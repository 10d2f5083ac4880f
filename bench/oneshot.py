"""Benchmark: one-shot pruning quality on the Fashion-MNIST MLPNets (no fine-tuning).

1. Every method at 50-98 % on bias-free MLPNet 784-40-20-10 and on MLPNet 784-300-100-10,
   default options, each method walking the sparsities in order (``compare(sequential=True)``).
2. Ablations of WoodFisher on 784-40-20-10 at 90 % and 95 %: independent vs joint update,
   one step vs ``recompute="auto"``, relative damp, number of gradients m and block size.

Dense models are trained with ``woodfisher train`` defaults (seed 0) and cached in ``runs/``.

Usage::

    PYTHONPATH=src python bench/oneshot.py --out bench/results/oneshot.json   # ~10 min
    PYTHONPATH=src python bench/oneshot.py --quick                            # ~3 min
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from woodfisher.checkpoint import atomic_save_json, load_checkpoint
from woodfisher.compare import compare, compare_table, plot_compare, pruning_batches
from woodfisher.data import load_dataset
from woodfisher.pruning import METHODS, prune
from woodfisher.pruning.methods import DEFAULTS
from woodfisher.train import evaluate, train_and_save

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def dense(name: str, runs: Path):
    path = runs / f"bench-{name}-fashion-mnist-seed0.pt"
    if not path.is_file():
        runs.mkdir(parents=True, exist_ok=True)
        train_and_save(name, "fashion-mnist", out=str(path), seed=0, progress=False)
    return load_checkpoint(path)


def ablations(model, splits, sparsities, quick: bool) -> list[dict]:
    batches = pruning_batches(splits.train, 2000, seed=0)
    grid: list[tuple[str, dict, float]] = [
        ("update=independent, 1 step", {"update": "independent", "recompute": 1}, 1e-2),
        ("update=joint, 1 step", {"update": "joint", "recompute": 1}, 1e-2),
        ("update=independent, auto steps", {"update": "independent"}, 1e-2),
        ("defaults (joint, auto steps)", {}, 1e-2),
    ]
    if not quick:
        grid += [(f"relative damp {d:g}", {}, d) for d in (1e-4, 1e-3, 1e-1)]
        grid += [(f"m={m}, B={m}", {"num_grads": m, "block_size": m}, 1e-2)
                 for m in (100, 250, 1000)]
        grid += [(f"B={b}", {"block_size": b}, 1e-2) for b in (100, 2000, None)]
    rows = []
    default_rel = DEFAULTS["relative_damp"]
    for label, opts, rel in grid:
        DEFAULTS["relative_damp"] = rel
        try:
            for s in sparsities:
                net = copy.deepcopy(model)
                t0 = time.perf_counter()
                res = prune(net, batches, s, method="woodfisher", **opts)
                rows.append({"config": label, "options": {**opts, "relative_damp": rel},
                             "sparsity": s, "accuracy": evaluate(net, splits.test)["accuracy"],
                             "steps": len(res.steps), "seconds": time.perf_counter() - t0})
                print(f"  {label:34s} {s:.0%}: {100 * rows[-1]['accuracy']:.2f} "
                      f"({rows[-1]['seconds']:.1f} s)", flush=True)
        finally:
            DEFAULTS["relative_damp"] = default_rel
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/oneshot.json"))
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--quick", action="store_true", help="small model only, fewer ablations")
    args = ap.parse_args()
    console = Console()
    t0 = time.perf_counter()
    result: dict = {"command": "PYTHONPATH=src python bench/oneshot.py"
                    + (" --quick" if args.quick else ""), "defaults": {
                        k: v for k, v in DEFAULTS.items() if isinstance(v, (int, float, str))}}
    models = ["mlpnet-small-nobias"] + ([] if args.quick else ["mlpnet"])
    for name in models:
        model, info = dense(name, args.runs)
        splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
        methods = sorted(METHODS) if name != "mlpnet" else ["magnitude", "kfac", "woodfisher"]
        report = compare(model, splits, methods, SPARSITIES, sequential=True,
                         log=lambda msg: print("  " + msg, flush=True))
        result[name] = report
        console.print(compare_table(report, f"{name}, one-shot, no fine-tuning"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot_compare(report, args.out.with_name(f"oneshot-{name}.png"),
                     title=f"{name} on Fashion-MNIST, one-shot")
    model, info = dense("mlpnet-small-nobias", args.runs)
    splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
    result["ablations"] = ablations(model, splits, (0.9, 0.95), args.quick)
    t = Table(title="WoodFisher ablations, mlpnet-small-nobias (test accuracy %)")
    for col in ("config", "90%", "95%", "steps", "s per prune"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for label in dict.fromkeys(r["config"] for r in result["ablations"]):
        rs = {r["sparsity"]: r for r in result["ablations"] if r["config"] == label}
        t.add_row(label, *(f"{100 * rs[s]['accuracy']:.2f}" for s in (0.9, 0.95)),
                  str(rs[0.95]["steps"]), f"{rs[0.95]['seconds']:.1f}")
    console.print(t)
    result["total_seconds"] = time.perf_counter() - t0
    atomic_save_json(result, args.out)
    print(f"wrote {args.out} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
