"""Benchmark: Fashion-MNIST models stored on noisy analog cells (woodfisher.storage).

For MLPNet and the CNN, dense and WoodFisher-pruned (one-shot, then stored with their masks),
on two channels — aihwkit's PCM programming noise (``pcm``) and the same cells read one year
after programming with drift and read noise (``retention``) — every strategy at several cell
budgets, 20 seeded noise draws each, against digital fp32/int8 storage with SECDED.

1. Defaults on a validation split (5000 training samples): allocation groups ``row`` vs
   ``weight`` for the Fisher and magnitude allocations (MLPNet, retention channel).
2. The grid on the test set, plus 4-bit quantized MLPNet (the CNN gets the short grid).
3. A summary: the smallest footprint within 1 point of the noise-free accuracy, and naive
   storage at about the same footprint.

Dense models come from ``bench/common.py`` (``$WOODFISHER_BENCH_CACHE``); pruned models and
Fisher diagonals are cached beside them.

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/storage.py          # full
    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/storage.py --quick  # ~3 min
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import cache_dir, dense_checkpoint, machine_info
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

from woodfisher.checkpoint import atomic_save_json, load_checkpoint, save_checkpoint
from woodfisher.compare import pruning_batches
from woodfisher.data import load_dataset
from woodfisher.pruning import prune
from woodfisher.storage import fisher_diagonal, make_channel
from woodfisher.storage.report import plot_storage, storage_table, sweep
from woodfisher.train import evaluate

CHANNELS = {"pcm": "pcm", "retention": "pcm:drift=31536000,read"}
FULL = [("naive", (1, 2, 3)), ("adaptive", (1,)), ("adaptive,fisher", (1.25,)),
        ("sign", (1, 2)), ("sign,adaptive", (1, 2)), ("sign,adaptive,split", (2,)),
        ("sign,adaptive,magnitude", (1.25, 1.5)), ("sign,adaptive,fisher", (1.25, 1.5)),
        ("pair,adaptive", (2,))]
SMALL = [("naive", (1, 2)), ("adaptive", (1,)), ("adaptive,fisher", (1.25,)), ("sign", (1,)),
         ("sign,adaptive", (1,)), ("sign,adaptive,split", (2,)),
         ("sign,adaptive,magnitude", (1.25,)), ("sign,adaptive,fisher", (1.25,))]
QUICK = [("naive", (1, 2)), ("adaptive", (1,)), ("sign", (1,)), ("sign,adaptive", (1,)),
         ("sign,adaptive,fisher", (1.25,))]
SPARSITY = {"mlpnet": 0.8, "cnn": 0.5}
FISHER_GRADS = 500


def pruned_checkpoint(name: str, model, info, splits, sparsity: float):
    """WoodFisher one-shot pruning (defaults), cached beside the dense model."""
    path = cache_dir() / f"storage-{name}-woodfisher{int(100 * sparsity)}.pt"
    if not path.is_file():
        net = copy.deepcopy(model)
        prune(net, pruning_batches(splits.train, 2000, seed=0), sparsity, method="woodfisher")
        save_checkpoint(path, net, info["model"], info["dataset"], {
            "pruned": {"method": "woodfisher", "sparsity": sparsity}})
    return load_checkpoint(path)[0]


def fisher_of(tag: str, model, splits):
    path = cache_dir() / f"storage-fisher-{tag}-m{FISHER_GRADS}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    fisher = fisher_diagonal(model, pruning_batches(splits.train, FISHER_GRADS, seed=0),
                             num_grads=FISHER_GRADS, seed=0)
    torch.save(fisher, path)
    return fisher


def run_grid(model, data, grid, channel, fisher, trials, log, **options):
    rows = {"results": [], "skipped": [], "digital": None}
    for strategy, budgets in grid:
        res = sweep(model, data, [strategy], budgets, log=log, trials=trials, channel=channel,
                    fisher=fisher, seed=0, **options)
        rows["results"] += res["results"]
        rows["skipped"] += res["skipped"]
        rows["digital"] = res["digital"]
    return rows


def summary(rows: dict) -> dict:
    """Smallest footprint within 1 point of noise-free, and naive at about that footprint."""
    results = rows["results"]
    clean = results[0]["clean_accuracy"]
    ok = [r for r in results if r["accuracy_mean"] >= clean - 0.01 and r["strategy"] != "naive"]
    best = max(ok, key=lambda r: r["footprint_ratio"]) if ok else None
    naive = [r for r in results if r["strategy"] == "naive"]
    near = (min(naive, key=lambda r: abs(r["cells_per_weight"] - best["cells_per_weight"]))
            if best and naive else None)
    pick = ("strategy", "cells", "cells_per_weight", "footprint_ratio", "accuracy_mean",
            "accuracy_std", "accuracy_min")
    return {
        "clean_accuracy": clean,
        "best_within_1pt": {k: best[k] for k in pick} if best else None,
        "naive_at_similar_footprint": {k: near[k] for k in pick} if near else None,
        "naive_best": ({k: max(naive, key=lambda r: r["accuracy_mean"])[k] for k in pick}
                       if naive else None),
    }


def validate_defaults(model, splits, fisher, trials, log) -> list[dict]:
    """Allocation groups row vs weight on 5000 training samples (the validation split)."""
    x, y = splits.train.tensors
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))[:5000]
    val = TensorDataset(x[order], y[order])
    out = []
    for strategy in ("sign,adaptive,fisher", "sign,adaptive,magnitude"):
        for granularity in ("row", "weight"):
            res = sweep(model, val, [strategy], (1.25, 1.5), log=log, trials=trials,
                        channel=CHANNELS["retention"], fisher=fisher, seed=0,
                        granularity=granularity)
            for r in res["results"]:
                out.append({"strategy": strategy, "granularity": granularity,
                            "cells": r["cells"], "cells_per_weight": r["cells_per_weight"],
                            "accuracy_mean": r["accuracy_mean"],
                            "accuracy_std": r["accuracy_std"],
                            "loss_increase_mean": r["loss_increase_mean"]})
    return out


def markdown(result: dict) -> str:
    """The runs of a result file as markdown tables (what docs/storage.md shows)."""
    lines = ["| run | noise-free % | best within 1 point | cells/weight | × fewer than fp32 | "
             "accuracy % | naive near that footprint: cells/weight | naive accuracy % |",
             "|---|---|---|---|---|---|---|---|"]
    for key, rows in result["runs"].items():
        s = rows["summary"]
        b, n = s["best_within_1pt"], s["naive_at_similar_footprint"]
        lines.append(
            f"| {key} | {100 * s['clean_accuracy']:.2f} | "
            + (f"{b['strategy']} ×{b['cells']:g} | {b['cells_per_weight']:.3f} | "
               f"{b['footprint_ratio']:.1f} | {100 * b['accuracy_mean']:.2f} ± "
               f"{100 * b['accuracy_std']:.2f} | " if b else "- | - | - | - | ")
            + (f"{n['cells_per_weight']:.3f} | {100 * n['accuracy_mean']:.2f} ± "
               f"{100 * n['accuracy_std']:.2f} |" if n else "- | - |"))
    lines.append("")
    for key, rows in result["runs"].items():
        clean = rows["results"][0]["clean_accuracy"]
        lines += [f"**{key}** (noise-free {100 * clean:.2f} %)", "",
                  "| strategy | cells | cells/weight | × fewer than fp32 | accuracy % | min | Δ |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows["results"]:
            lines.append(
                f"| {r['strategy']} | {r['cells']:g} | {r['cells_per_weight']:.3f} | "
                f"{r['footprint_ratio']:.1f} | {100 * r['accuracy_mean']:.2f} ± "
                f"{100 * r['accuracy_std']:.2f} | {100 * r['accuracy_min']:.2f} | "
                f"{100 * (r['accuracy_mean'] - clean):+.2f} |")
        fp32 = rows["digital"]["fp32"]["cells_per_weight"]
        for name, d in rows["digital"].items():
            lines.append(f"| digital {name} + SECDED | - | {d['cells_per_weight']:.3f} | "
                         f"{fp32 / d['cells_per_weight']:.1f} | {100 * d['accuracy']:.2f} | - | "
                         "- |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MLPNet dense only, 5 draws")
    ap.add_argument("--trials", type=int, default=None, help="noise draws (default 20, quick 5)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None,
                    help="print the tables of an existing result file as markdown and exit")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in OUT (same command) and do the rest")
    ap.add_argument("--models", default=None,
                    help="comma-separated subset of mlpnet,cnn to run now (a resumed file keeps "
                         "the others' runs)")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    out = args.out or Path("bench/results") / ("storage_quick.json" if args.quick
                                               else "storage.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)
    t0 = time.perf_counter()
    trials = args.trials or (5 if args.quick else 20)

    def log(msg: str) -> None:
        print(f"  [{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    result: dict = {
        "command": "WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/storage.py"
                   + (" --quick" if args.quick else "")
                   + (f" --trials {args.trials}" if args.trials else ""),
        "machine": machine_info(), "trials": trials, "channels": CHANNELS,
        "sparsity": SPARSITY, "fisher_grads": FISHER_GRADS, "runs": {},
    }
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if old.get("command") == result["command"]:
            result["runs"] = old.get("runs", {})
            if "defaults_validation" in old:
                result["defaults_validation"] = old["defaults_validation"]
            result["resumed_from_seconds"] = old.get("elapsed_seconds")
    models = ["mlpnet"] if args.quick else ["mlpnet", "cnn"]
    if args.models:
        wanted = args.models.split(",")
        if any(m not in models for m in wanted):
            raise SystemExit(f"--models {args.models}: choose among {','.join(models)}")
        models = wanted
    for name in models:
        dense, info = dense_checkpoint(name)
        splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
        variants = {"dense": dense}
        if not args.quick:
            variants["pruned"] = pruned_checkpoint(name, dense, info, splits, SPARSITY[name])
        for variant, model in variants.items():
            log(f"{name} {variant}: test accuracy {evaluate(model, splits.test)['accuracy']:.4f}")
            fisher = fisher_of(f"{name}-{variant}", model, splits)
            if (name == "mlpnet" and variant == "dense" and not args.quick
                    and "defaults_validation" not in result):
                result["defaults_validation"] = validate_defaults(model, splits, fisher, 10,
                                                                  log)
                atomic_save_json(result, out)
            # The CNN gets the short grid: one of its 20-draw rows takes ~6 min on a loaded
            # 2-core machine, where an MLPNet row takes ~15 s.
            grid = QUICK if args.quick or name == "cnn" else (
                FULL if variant == "dense" else SMALL)
            for ch_name, spec in CHANNELS.items():
                key = f"{name}-{variant}-{ch_name}"
                if key in result["runs"]:
                    continue
                log(f"== {key}")
                rows = run_grid(model, splits.test, grid, make_channel(spec), fisher, trials,
                                log)
                rows["summary"] = summary(rows)
                result["runs"][key] = rows
                result["elapsed_seconds"] = time.perf_counter() - t0
                console.print(storage_table(rows, f"{key}: accuracy (%) over {trials} draws"))
                plot_storage(rows, out.with_name(f"{out.stem}-{key}.png"),
                             title=f"{name} ({variant}) on Fashion-MNIST, channel {spec}")
                atomic_save_json(result, out)
            if name == "mlpnet" and variant == "dense" and not args.quick:
                for ch_name, spec in CHANNELS.items():
                    key = f"{name}-int4-{ch_name}"
                    if key in result["runs"]:
                        continue
                    log(f"== {key}")
                    rows = run_grid(model, splits.test, [("naive", (1,)), ("sign", (1,)),
                                                         ("sign,adaptive", (1,))],
                                    make_channel(spec), fisher, trials, log, quant_bits=4)
                    rows["summary"] = summary(rows)
                    result["runs"][key] = rows
                    console.print(storage_table(rows, f"{key} (4-bit weights, decode snaps "
                                                      "to the grid)"))
                    atomic_save_json(result, out)
    table = Table(title="smallest footprint within 1 point of noise-free vs naive near it")
    for col in ("run", "noise-free", "best strategy", "cells/weight", "× fp32", "accuracy",
                "naive at ~same cells", "naive accuracy"):
        table.add_column(col, justify="left" if col in ("run", "best strategy") else "right")
    for key, rows in result["runs"].items():
        s = rows["summary"]
        b, n = s["best_within_1pt"], s["naive_at_similar_footprint"]
        table.add_row(key, f"{100 * s['clean_accuracy']:.2f}",
                      f"{b['strategy']} ×{b['cells']:g}" if b else "-",
                      f"{b['cells_per_weight']:.3f}" if b else "-",
                      f"{b['footprint_ratio']:.1f}" if b else "-",
                      f"{100 * b['accuracy_mean']:.2f} ± {100 * b['accuracy_std']:.2f}"
                      if b else "-",
                      f"{n['cells_per_weight']:.3f}" if n else "-",
                      f"{100 * n['accuracy_mean']:.2f} ± {100 * n['accuracy_std']:.2f}"
                      if n else "-")
    console.print(table)
    result["total_seconds"] = time.perf_counter() - t0
    result["machine_end"] = machine_info()
    atomic_save_json(result, out)
    print(f"wrote {out} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
