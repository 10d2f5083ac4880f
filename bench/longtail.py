"""Benchmark: which examples compressed MLPNets lose, against Feldman–Zhang memorization.

Fashion-MNIST, MLPNet 784-300-100-10, a seeded training subset S of n examples:

1. Memorization of S from ``runs`` models on random 70 % subsets (with test influence).
2. Planted check: 5 % of S's labels flipped, memorization re-estimated; AUROC of the scores
   for flipped vs clean (must be ≥ 0.9), and of every one-model proxy.
3. Proxies (ours: WoodFisher self-influence ``g_iᵀF⁻¹g_i``; diagonal Fisher, gradient norm,
   loss, margin) against the clean estimate: Spearman and AUROC for the top decile.
4. 2·seeds dense models trained on all of S (same recipe): seeds 0..k-1 are the dense
   population, k..2k-1 the reseed control. From each dense model of the population:
   global magnitude and WoodFisher (block 100, automatic recompute steps, 95 % continued from
   90 %) one-shot at 90/95 %; magnitude at the WoodFisher model's accuracy (sparsity bisected
   on a validation split carved from the training set outside S, never the test set);
   low rank (``woodfisher.lowrank.decompose``, SVD of fc1 and fc2, classifier kept dense) at
   10 % and 5 % of their weights, ranks by the uniform rule and by the Fisher-predicted loss
   (validation batches); per-channel round-to-nearest 4- and 3-bit quantization.
5. The mismatch analysis of every arm and the control (:func:`woodfisher.longtail.
   mismatch_analysis`), and the equal-accuracy comparison WoodFisher vs magnitude: paired over
   seeds, test disagreement with the dense parent.

Dense and compressed models and the memorization runs are cached under
``$WOODFISHER_BENCH_CACHE/longtail`` (a killed run resumes).

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/longtail.py
    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/longtail.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import cache_dir, machine_info
from rich.console import Console
from rich.table import Table
from scipy import stats as sps
from torch.utils.data import TensorDataset

from woodfisher.checkpoint import atomic_save_json, load_checkpoint, save_checkpoint
from woodfisher.compare import pruning_batches
from woodfisher.data import load_dataset
from woodfisher.longtail import (
    MEMORIZATION_DEFAULTS,
    memorization,
    mismatch_analysis,
    proxy_scores,
    rank_agreement,
)
from woodfisher.longtail.report import image_grid, plot_bins, plot_class_deltas, summary_table
from woodfisher.longtail.stats import auroc, auroc_interval
from woodfisher.lowrank import decompose
from woodfisher.models import build_model
from woodfisher.params import select_modules
from woodfisher.pruning import prune
from woodfisher.quant import fake_quantize_model
from woodfisher.train import evaluate, train

FULL = {"n": 4000, "runs": 100, "planted_runs": 100, "seeds": 4, "val": 5000}
QUICK = {"n": 1000, "runs": 16, "planted_runs": 16, "seeds": 2, "val": 2000}
MODEL = "mlpnet"
WOODFISHER = {"block_size": 100, "num_grads": 500}  # B=100: 3x cheaper than 500 on 2 cores
FLIP = 0.05


def recipe() -> dict:
    return {k: MEMORIZATION_DEFAULTS[k] for k in
            ("epochs", "lr", "batch_size", "momentum", "weight_decay", "schedule")}


def flip_labels(y: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[: int(round(frac * len(y)))]
    noisy = y.clone()
    noisy[idx] = (noisy[idx] + torch.randint(1, 10, (len(idx),), generator=g)) % 10
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[idx] = True
    return noisy, flipped


def cached(path: Path, make, *args):
    """Load a checkpoint from ``path`` or build it with ``make(*args)``, save and return it."""
    if path.is_file():
        return load_checkpoint(path)[0]
    model = make(*args)
    spec = {"name": MODEL, "input_shape": [1, 28, 28], "num_classes": 10}
    save_checkpoint(path, model, spec, {"dataset": "fashion-mnist"})
    return model


def train_dense(X, y, seed: int):
    r = recipe()
    torch.manual_seed(seed)
    model = build_model(MODEL, (1, 28, 28), 10)
    train(model, TensorDataset(X, y), epochs=r["epochs"], lr=r["lr"],
          batch_size=r["batch_size"], seed=seed, momentum=r["momentum"],
          weight_decay=r["weight_decay"], schedule=r["schedule"], progress=False)
    return model.eval()


def accuracy(model, X, y) -> float:
    return evaluate(model, TensorDataset(X, y))["accuracy"]


def magnitude_at(dense, batches, target: float, Xv, yv, hi: float) -> tuple[object, float]:
    """Global magnitude pruning at the largest sparsity whose validation accuracy >= target."""
    lo, best = 0.0, None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = copy.deepcopy(dense)
        prune(m, batches, mid, method="magnitude")
        if accuracy(m, Xv, yv) >= target:
            lo, best = mid, m
        else:
            hi = mid
    if best is None:
        best = copy.deepcopy(dense)
    return best, lo


def quantized(dense, bits: int):
    model = copy.deepcopy(dense)
    fake_quantize_model(select_modules(model), bits)
    return model


def equal_accuracy(analysis: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """Paired over seeds: test disagreement with the dense parent, WoodFisher vs magnitude."""
    rows = []
    for wf, mag in pairs:
        a = np.array(analysis["arms"][wf]["test"]["disagreement"]["per_model"])
        b = np.array(analysis["arms"][mag]["test"]["disagreement"]["per_model"])
        acc_a = np.array(analysis["arms"][wf]["test"]["accuracy"]["per_model"])
        acc_b = np.array(analysis["arms"][mag]["test"]["accuracy"]["per_model"])
        t = sps.ttest_rel(a, b) if len(a) > 1 else None
        rows.append({
            "woodfisher": wf, "magnitude": mag,
            "test_accuracy": [float(acc_a.mean()), float(acc_b.mean())],
            "test_disagreement": [float(a.mean()), float(b.mean())],
            "disagreement_difference": float((a - b).mean()),
            "paired_t": None if t is None else float(t.statistic),
            "paired_p": None if t is None else float(t.pvalue),
            "train_exemplars": [analysis["arms"][wf]["exemplars"]["train"]["count"],
                                analysis["arms"][mag]["exemplars"]["train"]["count"]],
            "test_exemplars": [analysis["arms"][wf]["exemplars"]["test"]["count"],
                               analysis["arms"][mag]["exemplars"]["test"]["count"]],
            "auroc": [analysis["arms"][wf]["memorization"]["auroc"],
                      analysis["arms"][mag]["memorization"]["auroc"]],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=1000, 16 runs, 2 seeds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--markdown", type=Path, nargs="+", default=None,
                        help="print the docs' markdown tables of result JSON files and exit")
    parser.add_argument("--memorization-only", action="store_true",
                        help="parts 1-3 only (memorization, planted check, proxies; one dense "
                        "model each), no compression")
    args = parser.parse_args()
    if args.markdown:
        for path in args.markdown:
            print(markdown(json.loads(path.read_text())))
        return
    cfg = QUICK if args.quick else FULL
    tag = "quick" if args.quick else "full"
    name = ("longtail" + ("_quick" if args.quick else "")
            + ("_memorization" if args.memorization_only else ""))
    out = args.out or Path(f"bench/results/{name}.json")
    figures = out.with_suffix("")
    if not args.memorization_only:
        figures.mkdir(parents=True, exist_ok=True)
    cache = cache_dir() / "longtail" / f"{tag}-n{cfg['n']}"
    cache.mkdir(parents=True, exist_ok=True)
    console = Console(width=170)
    times: dict[str, float] = {}
    started = time.perf_counter()
    load_before = machine_info()["load_average"]

    splits = load_dataset("fashion-mnist")
    Xall, yall = splits.train.tensors
    perm = torch.randperm(len(Xall), generator=torch.Generator().manual_seed(0))
    S, V = perm[: cfg["n"]], perm[cfg["n"] : cfg["n"] + cfg["val"]]
    X, y, Xv, yv = Xall[S], yall[S], Xall[V], yall[V]
    Xt, yt = splits.test.tensors

    t = time.perf_counter()
    mem = memorization(X, y, model=MODEL, runs=cfg["runs"], test=(Xt, yt),
                       workers=args.workers, run_dir=cache / "mem-clean")
    times["memorization"] = time.perf_counter() - t
    console.print(f"memorization: {mem.to_dict()}")

    t = time.perf_counter()
    noisy, flipped = flip_labels(y, FLIP, seed=1)
    mem_p = memorization(X, noisy, model=MODEL, runs=cfg["planted_runs"], workers=args.workers,
                         run_dir=cache / "mem-planted")
    ok = ~mem_p.scores.isnan()
    planted = {
        "flipped": int(flipped.sum()), "fraction": FLIP,
        "auroc": auroc(mem_p.scores[ok].numpy(), flipped[ok].numpy()),
        "auroc_ci": list(auroc_interval(mem_p.scores[ok].numpy(), flipped[ok].numpy())),
        "mean_memorization": {"flipped": float(mem_p.scores[flipped & ok].mean()),
                              "clean": float(mem_p.scores[~flipped & ok].mean())},
        "fit": {"flipped": float((mem_p.train_correct & mem_p.masks)[:, flipped].sum()
                                 / mem_p.masks[:, flipped].sum()),
                "clean": float((mem_p.train_correct & mem_p.masks)[:, ~flipped].sum()
                               / mem_p.masks[:, ~flipped].sum())},
        "memorization": mem_p.to_dict(),
    }
    times["planted_memorization"] = time.perf_counter() - t
    console.print(f"planted: AUROC {planted['auroc']:.3f} {planted['auroc_ci']}")

    t = time.perf_counter()
    k = cfg["seeds"]
    dense = [cached(cache / f"dense-seed{s}.pt", train_dense, X, y, s)
             for s in range(1 if args.memorization_only else 2 * k)]
    noisy_dense = cached(cache / "dense-planted-seed0.pt", train_dense, X, noisy, 0)
    times["dense_training"] = time.perf_counter() - t

    t = time.perf_counter()
    proxies = proxy_scores(dense[0], X, y, block_size=WOODFISHER["block_size"])
    proxies_planted = proxy_scores(noisy_dense, X, noisy, block_size=WOODFISHER["block_size"])
    proxy_report = {
        "clean": rank_agreement(proxies, mem.scores),
        "planted": rank_agreement(proxies_planted, mem_p.scores),
        "planted_flipped_auroc": {name: auroc(p.numpy(), flipped.numpy())
                                  for name, p in proxies_planted.items()},
    }
    times["proxies"] = time.perf_counter() - t
    command = (f"python bench/longtail.py{' --quick' if args.quick else ''}"
               f"{' --memorization-only' if args.memorization_only else ''}")
    if args.memorization_only:
        console.print(f"planted AUROC {planted['auroc']:.3f}; proxies: {proxy_report}")
        times["total"] = time.perf_counter() - started
        write(out, {
            "command": command,
            "config": {**cfg, "model": MODEL, "recipe": recipe(), "woodfisher": WOODFISHER,
                       "flip": FLIP, "workers": args.workers},
            "memorization": mem.to_dict(), "planted": planted, "proxies": proxy_report,
            "dense_accuracy": {"test": accuracy(dense[0], Xt, yt),
                               "validation": accuracy(dense[0], Xv, yv)},
            "times": times, "load_average_before": load_before, "machine": machine_info()})
        console.print(f"wrote {out} in {times['total']:.0f} s")
        return

    t = time.perf_counter()
    arms: dict[str, list] = {}
    extras: dict[str, list] = {}
    for j in range(k):
        parent = dense[j]
        batches = pruning_batches(TensorDataset(X, y), len(X), seed=j)
        val = pruning_batches(TensorDataset(Xv, yv), len(Xv), seed=j)
        for s in (0.9, 0.95):
            arms.setdefault(f"magnitude {s:.0%}", []).append(cached(
                cache / f"magnitude-{s}-seed{j}.pt", prune_copy, parent, batches, s,
                "magnitude", j))
        wf90 = cached(cache / f"woodfisher-0.9-seed{j}.pt", prune_copy, parent, batches, 0.9,
                      "woodfisher", j)
        wf95 = cached(cache / f"woodfisher-0.95-seed{j}.pt", prune_copy, wf90, batches, 0.95,
                      "woodfisher", j)
        arms.setdefault("woodfisher 90%", []).append(wf90)
        arms.setdefault("woodfisher 95%", []).append(wf95)
        for s, wf in ((0.9, wf90), (0.95, wf95)):
            target = accuracy(wf, Xv, yv)
            matched, sp = magnitude_at(parent, batches, target, Xv, yv, hi=s)
            arms.setdefault(f"magnitude @ acc(wf {s:.0%})", []).append(matched)
            extras.setdefault(f"magnitude @ acc(wf {s:.0%})", []).append(
                {"sparsity": sp, "val_accuracy": accuracy(matched, Xv, yv),
                 "target_val_accuracy": target})
        for rule, frac in (("uniform", 0.1), ("fisher", 0.1), ("fisher", 0.05)):
            name = f"lowrank {rule} {frac:.0%}"
            m = decompose(parent, params=frac, method="svd", ranks=rule, data=val,
                          seed=j)
            arms.setdefault(name, []).append(m.eval())
            extras.setdefault(name, []).append(
                {"params_fraction": m.lowrank["params_fraction"],
                 "ranks": {r["name"]: r["rank"] for r in m.lowrank["layers"]}})
        for bits in (4, 3):
            arms.setdefault(f"rtn {bits}-bit", []).append(quantized(parent, bits))
        console.print(f"compressed seed {j}: {time.perf_counter() - t:.0f} s")
    times["compression"] = time.perf_counter() - t

    t = time.perf_counter()
    analysis = mismatch_analysis(dense[:k], arms, (X, y), (Xt, yt), mem, control=dense[k:])
    times["analysis"] = time.perf_counter() - t
    pairs = [("woodfisher 90%", "magnitude 90%"), ("woodfisher 95%", "magnitude 95%"),
             ("woodfisher 90%", "magnitude @ acc(wf 90%)"),
             ("woodfisher 95%", "magnitude @ acc(wf 95%)")]
    equal = equal_accuracy(analysis, pairs)

    plot_bins({**analysis, "arms": {a: analysis["arms"][a] for a in
                                    ("magnitude 90%", "woodfisher 90%",
                                     "magnitude @ acc(wf 90%)", "lowrank fisher 10%",
                                     "control (dense reseed)")}},
              figures / "mismatch_vs_memorization.png")
    plot_bins({**analysis, "arms": {a: analysis["arms"][a] for a in
                                    ("magnitude 95%", "woodfisher 95%",
                                     "magnitude @ acc(wf 95%)", "lowrank fisher 5%", "rtn 3-bit",
                                     "control (dense reseed)")}},
              figures / "mismatch_vs_memorization_95.png")
    plot_class_deltas({**analysis, "arms": {a: analysis["arms"][a] for a in
                                            ("magnitude 95%", "woodfisher 95%",
                                             "magnitude @ acc(wf 95%)",
                                             "control (dense reseed)")}},
                      figures / "class_deltas.png", "fashion-mnist")
    image_grid(analysis, X, y, "magnitude 95%", figures / "exemplars_magnitude95.png",
               "fashion-mnist")
    image_grid(analysis, X, y, "woodfisher 95%", figures / "exemplars_woodfisher95.png",
               "fashion-mnist")

    console.print(summary_table(analysis))
    table = Table(title="equal accuracy? test disagreement with the dense parent (paired)")
    for col in ("woodfisher", "vs", "acc wf", "acc other", "disagree wf", "disagree other",
                "diff", "p"):
        table.add_column(col)
    for r in equal:
        table.add_row(r["woodfisher"], r["magnitude"], f"{r['test_accuracy'][0]:.2%}",
                      f"{r['test_accuracy'][1]:.2%}", f"{r['test_disagreement'][0]:.2%}",
                      f"{r['test_disagreement'][1]:.2%}", f"{r['disagreement_difference']:+.2%}",
                      "—" if r["paired_p"] is None else f"{r['paired_p']:.2g}")
    console.print(table)
    console.print(f"planted AUROC {planted['auroc']:.3f}; proxies: {proxy_report}")
    times["total"] = time.perf_counter() - started
    result = {
        "command": command,
        "config": {**cfg, "model": MODEL, "recipe": recipe(), "woodfisher": WOODFISHER,
                   "flip": FLIP, "workers": args.workers},
        "memorization": mem.to_dict(),
        "planted": planted,
        "proxies": proxy_report,
        "dense_accuracy": {"test": [accuracy(m, Xt, yt) for m in dense],
                           "validation": [accuracy(m, Xv, yv) for m in dense]},
        "arm_details": extras,
        "analysis": analysis,
        "equal_accuracy": equal,
        "times": times,
        "load_average_before": load_before,
        "machine": machine_info(),
    }
    write(out, result)
    console.print(f"wrote {out} and {figures}/ in {times['total']:.0f} s")


def _p(x, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(r: dict) -> str:
    """The docs' tables of one result file."""
    cfg, mem, pl = r["config"], r["memorization"], r["planted"]
    lines = [f"`{r['command']}` — n={cfg['n']} training examples, MLPNet, "
             f"{mem['runs']} clean / {pl['memorization']['runs']} planted runs, "
             f"{r['times']['total']:.0f} s, load average before "
             f"{' '.join(format(x, '.1f') for x in r['load_average_before'])}",
             "", "| memorization | value |", "|---|---|",
             f"| runs fit their own subset | {mem['fit']:.2%} |",
             f"| held-out accuracy of the runs | {mem['held_out_accuracy']:.2%} |",
             f"| mean score; 75th / 90th percentile | {mem['mean_score']:.3f}; "
             f"{mem['score_quantiles']['0.75']:.3f} / {mem['score_quantiles']['0.9']:.3f} |",
             f"| planted: {pl['flipped']} flipped labels, AUROC of mem (flipped vs clean) "
             f"[95 % CI] | **{pl['auroc']:.3f}** [{pl['auroc_ci'][0]:.3f}, "
             f"{pl['auroc_ci'][1]:.3f}] |",
             f"| planted: mean mem flipped / clean | {pl['mean_memorization']['flipped']:.3f} / "
             f"{pl['mean_memorization']['clean']:.3f} |",
             f"| planted: runs fit flipped / clean in-subset labels | {pl['fit']['flipped']:.2%} / "
             f"{pl['fit']['clean']:.2%} |", "",
             "| proxy (one dense model) | Spearman ρ vs mem | AUROC top decile | "
             "AUROC flipped (planted) |", "|---|---|---|---|"]
    px = r["proxies"]
    for name, row in px["clean"].items():
        lines.append(f"| {name} | {row['spearman']:.3f} | {row['auroc_top']:.3f} | "
                     f"{px['planted_flipped_auroc'][name]:.3f} |")
    if "analysis" not in r:
        return "\n".join(lines)
    a = r["analysis"]
    lines += ["", "| arm | M | test acc | dis train | dis test | CIE train | CIE test | AUROC mem "
              "[CI] | ρ | logit coef (z) | Δ AUROC vs control [CI] |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in a["arms"].items():
        m = arm["memorization"]
        coef = m["logistic"]["coef"]["memorization"]
        vs = arm.get("vs_control")
        lines.append(
            f"| {name} | {arm['models']} | {arm['test']['accuracy']['mean']:.2%} | "
            f"{arm['train']['disagreement']['mean']:.2%} | "
            f"{arm['test']['disagreement']['mean']:.2%} | {arm['exemplars']['train']['count']} | "
            f"{arm['exemplars']['test']['count']} | {_p(m['auroc'])} "
            f"[{_p(m['auroc_ci'][0], '.2f')}, {_p(m['auroc_ci'][1], '.2f')}] | "
            f"{_p(m['spearman_disagreement']['rho'])} | "
            f"{_p(coef['coef'], '+.2f')} ({_p(coef['z'], '+.1f')}) | "
            + ("—" if vs is None else f"{vs['auroc_difference']:+.3f} "
               f"[{vs['auroc_difference_ci'][0]:+.2f}, {vs['auroc_difference_ci'][1]:+.2f}]")
            + " |")
    lines += ["", "| WoodFisher | vs | test acc WF / other | test disagreement WF / other | "
              "paired diff (p) | CIE train WF / other | AUROC WF / other |",
              "|---|---|---|---|---|---|---|"]
    for e in r["equal_accuracy"]:
        lines.append(
            f"| {e['woodfisher']} | {e['magnitude']} | {e['test_accuracy'][0]:.2%} / "
            f"{e['test_accuracy'][1]:.2%} | {e['test_disagreement'][0]:.2%} / "
            f"{e['test_disagreement'][1]:.2%} | {e['disagreement_difference']:+.2%} "
            f"({_p(e['paired_p'], '.2g')}) | {e['train_exemplars'][0]} / "
            f"{e['train_exemplars'][1]} | {_p(e['auroc'][0])} / {_p(e['auroc'][1])} |")
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    from woodfisher.longtail.report import to_json

    atomic_save_json(to_json(result), out)


def prune_copy(model, batches, sparsity: float, method: str, seed: int):
    pruned = copy.deepcopy(model)
    opts = WOODFISHER if method == "woodfisher" else {}
    prune(pruned, batches, sparsity, method=method, seed=seed, **opts)
    return pruned


if __name__ == "__main__":
    main()
