"""Benchmark: WoodTaylor (safe) vs the paper's WoodTaylor vs WoodFisher, in one run per part.

Parts (``--parts``, comma-separated; each is saved as soon as it ends):

- ``diagnose``: why the paper's step fails, at the library defaults (m = B = 500) on the trained
  MLPNet, one step to 90 %: the noise in ḡ (cosine with the mean gradient of 10,000 samples),
  ‖F⁻¹ḡ‖ against ‖w‖, the curvature along the Newton part under the block-diagonal F and
  under the full empirical Fisher, and test accuracy along δ_WF + α·n for a sweep of α.

- ``select``: the options of ``woodtaylor`` on a **validation split** (MLPNet trained on
  Fashion-MNIST train[:50k], accuracy on train[50k:]; the test set takes no part): the default
  (WoodFisher's mask, Newton scale chosen on held-out loss, ḡ from the Fisher's m samples), ḡ
  from 5000 samples, the first-order term in the saliency, at a trained model and after a
  distribution shift, both at 90 %. The default of ``TAYLOR_DEFAULTS`` is the best of these.
  (The paper's method is in every other part; its step with WoodFisher's mask, α = 1, is in
  ``diagnose``.)
- ``oneshot``: one-shot 50, 70, 90, 95, 98 % on MLPNet 784-300-100-10 and the CNN (test
  accuracy).
- ``settings``: models not at a minimum, one-shot to 50 and 90 % with two seeds: early in
  training (1 epoch), after a distribution shift (Gaussian pixel noise σ = 0.3 on pruning
  data and test set).
- ``gradual``: gradual to 95 % (10 epochs; 4 with ``--quick``), all training data and the
  limited-data regime (the first 1000 training samples).

Every method gets the same pruning samples (``m`` gradients, then 1000 held out for
woodtaylor's scale, which the others ignore). WoodFisher settings: m = B = 256 (a fifth of the
library default's cost, so that the grid fits); everything else the library defaults.

Usage::

    PYTHONPATH=src WOODFISHER_BENCH_CACHE=/work/cache python bench/woodtaylor.py
    PYTHONPATH=src python bench/woodtaylor.py --quick            # minutes: fewer points
    PYTHONPATH=src python bench/woodtaylor.py --parts select     # one part
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import sys
import time
from pathlib import Path

import torch
from common import cache_dir, dense_checkpoint, machine_info
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

from woodfisher.checkpoint import atomic_save, atomic_save_json
from woodfisher.compare import pruning_batches
from woodfisher.data import load_dataset
from woodfisher.gradual import GradualConfig, gradual
from woodfisher.models import build_model
from woodfisher.pruning import prune
from woodfisher.train import evaluate, train

PRUNER = {"num_grads": 256, "block_size": 256}
HELD_OUT = 1000
METHODS = ("woodfisher", "woodtaylor", "woodtaylor-paper")
VARIANTS = {  # name -> (method, taylor options)
    "woodfisher": ("woodfisher", None),
    "woodtaylor (default)": ("woodtaylor", None),
    "woodtaylor ḡ 5000": ("woodtaylor", {"grad_samples": 5000}),
    "woodtaylor + saliency": ("woodtaylor", {"saliency": True}),
    "woodtaylor-paper": ("woodtaylor-paper", None),
}
SHIFT_SIGMA = 0.3


def shifted(ds: TensorDataset, std: float, seed: int) -> TensorDataset:
    """Gaussian pixel noise of ``SHIFT_SIGMA`` (in [0, 1] pixel units) on normalised images."""
    x, y = ds.tensors[:2]
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(x + SHIFT_SIGMA / std * torch.randn(x.shape, generator=gen), y)


def one_shot(model, method, taylor, train_ds, test_ds, sparsity, seed) -> dict:
    net = copy.deepcopy(model)
    extra = (taylor or {}).get("grad_samples") or 0
    data = pruning_batches(train_ds, max(PRUNER["num_grads"], extra) + HELD_OUT, seed=seed)
    t0 = time.perf_counter()
    kwargs = {} if taylor is None else {"taylor": taylor}
    res = prune(net, data, sparsity, method, seed=seed, **PRUNER, **kwargs)
    ev = evaluate(net, test_ds)
    return {"accuracy": ev["accuracy"], "loss": ev["loss"], "seconds": time.perf_counter() - t0,
            "sparsity": res.sparsity, "seed": seed,
            "scales": None if res.taylor is None else res.taylor["scales"]}


def table(title: str, rows: list[dict], key: str, cols: list[str]) -> None:
    t = Table(title=title)
    t.add_column("method")
    for c in cols:
        t.add_column(c, justify="right")
    names = list(dict.fromkeys(r["method"] for r in rows))
    for name in names:
        cells = []
        for c in cols:
            hit = [r for r in rows if r["method"] == name and r[key] == c]
            cells.append(f"{100 * hit[0]['accuracy']:.2f}" if hit else "")
        t.add_row(name, *cells)
    Console().print(t)


def part_diagnose(args, splits) -> dict:
    from woodfisher.curvature import fisher_inverse, mean_gradient
    from woodfisher.params import flat_masks, flat_weights, select_modules
    from woodfisher.pruning import obs
    from woodfisher.pruning.masks import apply_masks, compute_masks
    from woodfisher.pruning.select import select_by_sparsity
    from woodfisher.pruning.woodtaylor import split_update

    model, _ = dense_checkpoint("mlpnet")
    data = pruning_batches(splits.train, 500, seed=args.seed)
    op = fisher_inverse(model, data, num_grads=500, block_size=500, mean_grad=True)
    inv, g, G = op.inv, op.mean_grad, op.inv.grads
    modules = select_modules(model)
    w, present = flat_weights(modules), flat_masks(modules)
    g_many = mean_gradient(model, pruning_batches(splits.train, 10_000, seed=args.seed + 1))
    ig = inv.mul(g)

    def full_ef(v):  # vᵀ F_full v with every cross-block term
        return float((G @ v).pow(2).mean() + op.damp * v.pow(2).sum())

    out = {"num_grads": 500, "block_size": 500, "blocks": len(inv.blocks), "damp": op.damp,
           "w_norm": float(w.norm()), "inv_grad_norm": float(ig.norm()),
           "grad_norm_500": float(g.norm()), "grad_norm_10000": float(g_many.norm()),
           "grad_cos_500_vs_10000": float(torch.nn.functional.cosine_similarity(g, g_many, 0)),
           "newton_decrease_blockdiag": float(g @ ig) / 2,
           "curvature_blockdiag": float(ig @ inv.fmul(ig)), "curvature_full_ef": full_ef(ig),
           "sweeps": []}
    for saliency in ("woodfisher", "woodtaylor"):
        scores = (obs.obs_saliency(w, inv.diag()) if saliency == "woodfisher"
                  else obs.woodtaylor_saliency(w, inv.diag(), ig, g))
        remove = select_by_sparsity(scores, present, op.layout, 0.9, "global", None)
        base, n = split_update("joint", w, remove, present, inv, g, inv.diag())
        for alpha in (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0):
            net = copy.deepcopy(model)
            mods = select_modules(net)
            new_w = obs.finish_update(w, base + alpha * n, remove)
            apply_masks(None, mods, compute_masks(mods, ~remove), op.layout.split(new_w))
            d = base + alpha * n
            out["sweeps"].append({
                "saliency": saliency, "alpha": alpha,
                "quadratic_model": float(g @ d + 0.5 * d @ inv.fmul(d)),
                "test_accuracy": evaluate(net, splits.test)["accuracy"]})
    t = Table(title="one step to 90 %, m = B = 500: test accuracy (%) along δ_WF + α·n")
    t.add_column("mask")
    alphas = sorted({r["alpha"] for r in out["sweeps"]})
    for a in alphas:
        t.add_column(f"α={a:g}", justify="right")
    for sal in ("woodfisher", "woodtaylor"):
        t.add_row(sal, *(f"{100 * r['test_accuracy']:.1f}" for r in out["sweeps"]
                         if r["saliency"] == sal))
    Console().print(t)
    Console().print({k: v for k, v in out.items() if k != "sweeps"})
    return out


def part_select(args, splits) -> dict:
    x, y = splits.train.tensors
    fit, val = TensorDataset(x[:50_000], y[:50_000]), TensorDataset(x[50_000:], y[50_000:])
    torch.manual_seed(0)
    model = build_model("mlpnet", splits.input_shape, splits.num_classes)
    # Cached like the dense checkpoints, so that slices of this part train it once.
    cached = cache_dir() / "mlpnet-fashion-mnist-train50k-seed0-e10-state.pt"
    if cached.is_file():
        model.load_state_dict(torch.load(cached, weights_only=True))
    else:
        train(model, fit, epochs=10, seed=0, progress=False)
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(model.state_dict(), cached)
    model.eval()
    std = splits.normalisation["std"]
    cases = [("trained", model, fit, val, s) for s in args.select_sparsities]
    if not args.quick:
        cases += [("shift", model, shifted(fit, std, 1), shifted(val, std, 2), 0.9)]
    cases = [c for c in cases if c[0] in args.select_cases]
    # The paper's method is in every other part; here only the options of the safe step.
    variants = {k: v for k, v in VARIANTS.items() if k != "woodtaylor-paper"}
    if args.quick:
        variants = {k: variants[k] for k in ("woodfisher", "woodtaylor (default)")}
    if args.variants:
        variants = {k: v for k, v in variants.items() if k.split()[-1].strip("()") in
                    args.variants}
    rows = []
    for case, net, fit_ds, val_ds, sparsity in cases:
        dense = evaluate(net, val_ds)["accuracy"]
        for name, (method, taylor) in variants.items():
            r = one_shot(net, method, taylor, fit_ds, val_ds, sparsity, args.seed)
            rows.append({"case": f"{case} {sparsity:.0%}", "method": name,
                         "dense_accuracy": dense, **r})
            print(f"select {case} {sparsity:.0%} {name}: {r['accuracy']:.4f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    table("validation accuracy (%), one-shot MLPNet, train[:50k] / train[50k:]", rows, "case",
          list(dict.fromkeys(r["case"] for r in rows)))
    return {"protocol": "dense and pruning data from train[:50000], accuracy on "
                        "train[50000:]", "rows": rows}


def part_oneshot(args, splits) -> dict:
    out = {}
    for name in args.models:
        model, info = dense_checkpoint(name)
        dense = evaluate(model, splits.test)["accuracy"]
        rows = []
        for s in args.sparsities:
            for method in args.methods:
                r = one_shot(model, method, None, splits.train, splits.test, s, args.seed)
                rows.append({"method": method, "sparsity": s, **r})
                print(f"oneshot {name} {s:.0%} {method}: {r['accuracy']:.4f} "
                      f"({r['seconds']:.0f} s)", flush=True)
        table(f"{name}: test accuracy (%) after one-shot pruning, dense {100 * dense:.2f}",
              [{**r, "col": f"{r['sparsity']:.0%}"} for r in rows], "col",
              [f"{s:.0%}" for s in args.sparsities])
        out[name] = {"dense_accuracy": dense, "rows": rows}
    return out


def part_settings(args, splits) -> dict:
    trained, _ = dense_checkpoint("mlpnet")
    early, _ = dense_checkpoint("mlpnet", epochs=1)
    std = splits.normalisation["std"]
    cases = [("early (1 epoch)", early, splits.train, splits.test),
             ("shift (noise σ=0.3)", trained, shifted(splits.train, std, 1),
              shifted(splits.test, std, 2))]
    cases = [c for c in cases if c[0].split()[0] in args.cases]
    rows = []
    for case, model, train_ds, test_ds in cases:
        dense = evaluate(model, test_ds)["accuracy"]
        for s in args.setting_sparsities:
            for seed in args.seeds:
                for method in args.methods:
                    r = one_shot(model, method, None, train_ds, test_ds, s, seed)
                    rows.append({"case": case, "method": method, "sparsity": s,
                                 "dense_accuracy": dense, **r})
                    print(f"settings {case} {s:.0%} seed {seed} {method}: "
                          f"{r['accuracy']:.4f} ({r['seconds']:.0f} s)", flush=True)
    for case in dict.fromkeys(r["case"] for r in rows):
        sub = [{**r, "col": f"{r['sparsity']:.0%} s{r['seed']}"} for r in rows
               if r["case"] == case]
        table(f"{case}: test accuracy (%), dense {100 * sub[0]['dense_accuracy']:.2f}", sub,
              "col", list(dict.fromkeys(r["col"] for r in sub)))
    return {"shift_sigma": SHIFT_SIGMA, "rows": rows}


def part_gradual(args, splits) -> dict:
    model, _ = dense_checkpoint("mlpnet")
    epochs = args.epochs or (4 if args.quick else 10)
    rows = []
    for subset in args.subsets:
        for method in args.methods:
            cfg = GradualConfig(final_sparsity=0.95, epochs=epochs, method=method, lr=0.01,
                                prune_options=dict(PRUNER), train_subset=subset, seed=args.seed)
            t0 = time.perf_counter()
            res = gradual(copy.deepcopy(model), splits.train, cfg, test_data=splits.test,
                          progress=False)
            rows.append({
                "method": method, "train_subset": subset or len(splits.train), "epochs": epochs,
                "accuracy": res.final["test_accuracy"], "sparsity": res.final["sparsity"],
                "seconds": time.perf_counter() - t0, "seed": args.seed,
                "scales": [r.get("newton_scales") for r in res.history if "pruned_to" in r],
                "history": [{k: r.get(k) for k in ("epoch", "sparsity", "test_accuracy")}
                            for r in res.history],
            })
            print(f"gradual N={rows[-1]['train_subset']} {method}: {rows[-1]['accuracy']:.4f} "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    table(f"MLPNet gradual to 95 % in {epochs} epochs: test accuracy (%)",
          [{**r, "col": f"N={r['train_subset']}"} for r in rows], "col",
          list(dict.fromkeys(f"N={r['train_subset']}" for r in rows)))
    return {"epochs": epochs, "rows": rows}


#: Row keys that identify a measurement: a rerun of the same point replaces the old row.
ROW_KEYS = ("case", "method", "sparsity", "seed", "train_subset", "epochs")


def merge(old: object, new: object) -> object:
    """Merge a part's result into the stored one, so that a part can be run in slices.

    Lists of rows are united (a row with the same ``ROW_KEYS`` values is replaced); dicts are
    merged key by key; anything else takes the new value.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: merge(old.get(k), v) for k, v in new.items()}}
    if isinstance(old, list) and isinstance(new, list) and all(
            isinstance(r, dict) and "method" in r for r in old + new):
        def key(r: dict) -> tuple:
            return tuple(repr(r.get(k)) for k in ROW_KEYS)
        kept = {key(r): r for r in old}
        kept.update({key(r): r for r in new})
        return list(kept.values())
    return new


def markdown(result: dict) -> str:
    """The README/docs tables (test or validation accuracy, %) of what the JSON holds."""
    def grid(rows, row_key, col_key, title):
        cols = list(dict.fromkeys(col_key(r) for r in rows))
        names = sorted(dict.fromkeys(row_key(r) for r in rows),
                       key=lambda n: METHODS.index(n) if n in METHODS else -1)
        lines = [title, "", "| method | " + " | ".join(cols) + " |",
                 "|---|" + "---:|" * len(cols)]
        for n in names:
            cells = []
            for c in cols:
                hit = [r for r in rows if row_key(r) == n and col_key(r) == c]
                cells.append(f"{100 * hit[0]['accuracy']:.1f}" if hit else "")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    out = []
    if "select" in result:
        out.append(grid(result["select"]["rows"], lambda r: r["method"], lambda r: r["case"],
                        "Validation accuracy (%), MLPNet fit on train[:50k], held out "
                        "train[50k:]:"))
    for name, part in result.get("oneshot", {}).items():
        if isinstance(part, dict) and "rows" in part:
            rows = sorted(part["rows"], key=lambda r: r["sparsity"])
            out.append(grid(rows, lambda r: r["method"], lambda r: f"{r['sparsity']:.0%}",
                            f"{name}, one-shot, test accuracy (%) (dense "
                            f"{100 * part['dense_accuracy']:.1f}):"))
    if "settings" in result:
        rows = result["settings"]["rows"]
        out.append(grid(rows, lambda r: r["method"],
                        lambda r: f"{r['case']} {r['sparsity']:.0%} s{r['seed']}",
                        "Not at a minimum, one-shot, test accuracy (%) (dense: " + ", ".join(
                            f"{c} {100 * d:.1f}" for c, d in dict.fromkeys(
                                (r["case"], r["dense_accuracy"]) for r in rows)) + "):"))
    if "gradual" in result:
        rows = result["gradual"]["rows"]
        out.append(grid(rows, lambda r: r["method"],
                        lambda r: f"N={r['train_subset']}, {r.get('epochs', '?')} epochs",
                        "MLPNet gradual to 95 %, test accuracy (%):"))
    return "\n".join(out)


PARTS = {"diagnose": part_diagnose, "select": part_select, "oneshot": part_oneshot,
         "settings": part_settings, "gradual": part_gradual}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sparsities, models, epochs")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--models", default=None, help="oneshot: comma-separated (mlpnet,cnn)")
    ap.add_argument("--sparsities", default=None, help="oneshot: comma-separated fractions")
    ap.add_argument("--setting-sparsities", default=None, help="settings: comma-separated")
    ap.add_argument("--seeds", default=None, help="settings: comma-separated seeds")
    ap.add_argument("--cases", default="early,shift", help="settings: early,shift")
    ap.add_argument("--select-cases", default="trained,shift", help="select: trained,shift")
    ap.add_argument("--variants", default=None,
                    help="select: comma-separated among woodfisher,default,5000,saliency")
    ap.add_argument("--subsets", default="all,1000", help="gradual: training samples (all,N)")
    ap.add_argument("--epochs", type=int, default=None, help="gradual: epochs (10; 4 --quick)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="oneshot, settings, gradual: comma-separated among " + ",".join(METHODS))
    ap.add_argument("--markdown", action="store_true",
                    help="print the tables of the JSON as markdown and exit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {list(PARTS)}")
    def floats(text, default):
        return default if text is None else [float(t) for t in text.split(",")]

    args.models = (args.models.split(",") if args.models
                   else ["mlpnet"] if args.quick else ["mlpnet", "cnn"])
    args.sparsities = floats(args.sparsities,
                             [0.5, 0.9] if args.quick else [0.5, 0.7, 0.9, 0.95, 0.98])
    args.select_sparsities = [0.9]
    args.setting_sparsities = floats(args.setting_sparsities,
                                     [0.9] if args.quick else [0.5, 0.9])
    args.seeds = ([int(t) for t in args.seeds.split(",")] if args.seeds
                  else [args.seed] if args.quick else [args.seed, args.seed + 1])
    args.methods = args.methods.split(",")
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {list(METHODS)}")
    args.cases = args.cases.split(",")
    args.select_cases = args.select_cases.split(",")
    args.variants = args.variants.split(",") if args.variants else None
    args.subsets = [None if t == "all" else int(t) for t in args.subsets.split(",")]
    out = args.out or Path("bench/results/woodtaylor" + ("_quick" if args.quick else "")
                           + ".json")
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    splits = load_dataset("fashion-mnist")
    for part in parts:
        t0 = time.perf_counter()
        load = os.getloadavg()
        new = PARTS[part](args, splits)
        new.update(seconds=time.perf_counter() - t0, load_average_before=load,
                   load_average_after=os.getloadavg(), command=" ".join(
                       ["PYTHONPATH=src python bench/woodtaylor.py", *sys.argv[1:]]))
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.with_suffix(".lock"), "w")  # slices may run side by side
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = json.loads(out.read_text()) if out.is_file() else {}
        # Timing and command of every slice: a merged part has several.
        slices = result.get(part, {}).get("slices", []) + [
            {k: new.pop(k) for k in ("seconds", "load_average_before", "load_average_after",
                                     "command")}]
        result[part] = merge(result.get(part), new)
        result[part]["slices"] = slices
        result["pruner"] = {**PRUNER, "held_out": HELD_OUT}
        result["machine"] = machine_info()
        atomic_save_json(result, out)
        lock.close()
        print(f"wrote {out} ({part}, {slices[-1]['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
