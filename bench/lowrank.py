"""Benchmark: low-rank compression on Fashion-MNIST (MLPNet, CNN, ResNet-20).

1. Fine-tuning learning rate chosen on a validation split (last 5000 training images) on the
   CNN at 50 % of the parameters (full run only).
2. Every rank rule at 30 % and 50 % of the weights of every Linear/Conv layer (classifier
   included; Tucker-2 for convolutions, SVD for Linear layers): test accuracy without
   fine-tuning, and (uniform, fisher, rene) after 2 epochs of CE + 0.5·(reconstruction +
   layer-output distillation) on a subset of the training images.
3. Against WoodFisher unstructured pruning (one shot, same selected layers) at equal weights,
   and (MLPNet, CNN) at equal MACs (low rank ``flops=`` vs layerwise sparsity).
4. The survey's claim: per layer, the validation loss increase when that layer alone keeps 30 %
   of its weights, against its effective rank, ℓ1 rank, stable rank and mean |w|
   (Spearman correlations).
5. CNN extras, with the default selection (conv2; the classifier and the 144-weight conv1 stay
   dense): SVD / Tucker-2 / CP; pruning the factors and 8/4-bit quantization (size in bits);
   the survey's three families (pre-train = decompose + fine-tune, compression-aware = erank
   penalty then decompose, pre-set = the factorised net trained from scratch).

Dense models come from ``bench/common.py`` (``$WOODFISHER_BENCH_CACHE``). ResNet-20 is used
only if a cached checkpoint exists (10 epochs, else the 1-epoch one); the bench never trains it.
The machine is shared: everything runs on one thread (``--threads``), ResNet-20 is evaluated on
the first ``--resnet-test`` test images and fine-tuned on fewer images.

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src:bench python bench/lowrank.py
    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src:bench python bench/lowrank.py --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from common import cache_dir, dense_checkpoint, machine_info
from torch.utils.data import TensorDataset

from woodfisher.checkpoint import atomic_save_json, load_checkpoint
from woodfisher.compare import pruning_batches
from woodfisher.data import load_dataset
from woodfisher.flops import count_flops
from woodfisher.lowrank import decompose
from woodfisher.lowrank.measures import layer_measures
from woodfisher.lowrank.size import quantize, size_bits
from woodfisher.lowrank.training import finetune, preset_model, train_rank_penalised
from woodfisher.models import build_model
from woodfisher.pruning import prune
from woodfisher.train import evaluate, train

RULES = ("uniform", "energy", "erank", "l1", "fisher", "fisher+W", "rene")
VAL = 5000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def subset(ds: TensorDataset, start: int, stop: int) -> TensorDataset:
    return TensorDataset(*(t[start:stop] for t in ds.tensors))


def load(name: str):
    if name != "resnet20":
        return dense_checkpoint(name)
    for epochs in (10, 1):
        path = cache_dir() / f"resnet20-fashion-mnist-seed0-e{epochs}.pt"
        if path.is_file():
            return load_checkpoint(path)
    return None


def rule_kwargs(rule: str, rene_cache: dict, opts: dict) -> dict:
    if rule == "fisher+W":
        return {"ranks": "fisher", "weighting": "fisher"}
    if rule == "rene":
        return {"ranks": "rene", "rene": {**opts.get("rene", {}), **rene_cache}}
    return {"ranks": rule}


def acc(model, test) -> float:
    return evaluate(model, test)["accuracy"]


def run_rules(name, model, parts, budgets, cfg, lr, rows):
    rene_cache: dict = {}
    for p in budgets:
        for rule in cfg["rules"]:
            t0 = time.perf_counter()
            small = decompose(model, params=p, method="tucker2", data=parts["held"],
                              num_grads=cfg["num_grads"], **cfg["select"],
                              **rule_kwargs(rule, rene_cache, cfg))
            secs = time.perf_counter() - t0
            if rule == "rene":
                rene_cache["ranks"] = small.lowrank["rule"].get("rene_ranks",
                                                                rene_cache.get("ranks"))
            row = {"model": name, "budget": p, "rule": rule, "seconds": secs,
                   "params_fraction": small.lowrank["params_fraction"],
                   "flops_fraction": small.lowrank["flops_fraction"],
                   "model_params_fraction": small.lowrank["model_params_fraction"],
                   "ranks": {r["name"]: r["rank"] for r in small.lowrank["layers"]},
                   "accuracy": acc(small, parts["test"])}
            if rule == "rene" and "rene_fraction" in small.lowrank["rule"]:
                row["rene_raw"] = {"ranks": small.lowrank["rule"]["rene_ranks"],
                                   "params_fraction": small.lowrank["rule"]["rene_fraction"]}
            if cfg["finetune"] and rule in cfg["ft_rules"] and p in cfg["ft_budgets"]:
                hist = finetune(small, model, parts["ft"], cfg["epochs"], lr=lr, seed=0)
                row["finetuned"] = acc(small, parts["test"])
                row["finetune_seconds"] = hist["time_s"]
            rows.append(row)
            log(f"  {name} {p:.0%} {rule:9s} acc {row['accuracy']:.4f} "
                f"ft {row.get('finetuned', float('nan')):.4f} params {row['params_fraction']:.3f}"
                f" ({secs:.1f} s)")


def run_pruning(name, model, parts, budgets, cfg, lr, layers, rows):
    for p in budgets:
        for scope, kind in (("global", "params"), ("layerwise", "flops")):
            if kind == "flops" and not cfg["equal_flops"]:
                continue
            net = copy.deepcopy(model)
            t0 = time.perf_counter()
            prune(net, parts["held"], 1 - p, method="woodfisher", layers=layers, scope=scope,
                  recompute=1, num_grads=cfg["num_grads"])
            flop = count_flops(net, parts["example"])
            row = {"model": name, "budget": p, "equal": kind, "method": f"woodfisher {scope}",
                   "accuracy": acc(net, parts["test"]), "seconds": time.perf_counter() - t0,
                   "nonzero_macs_fraction": flop.nonzero_macs / flop.total_macs}
            if kind == "flops":
                small = decompose(model, flops=p, ranks="fisher", data=parts["held"],
                                  num_grads=cfg["num_grads"], **cfg["select"])
                row["lowrank_fisher_flops"] = {
                    "accuracy": acc(small, parts["test"]),
                    "flops_fraction": small.lowrank["flops_fraction"],
                    "params_fraction": small.lowrank["params_fraction"]}
            if cfg["finetune"] and p in cfg["ft_budgets"] and kind == "params":
                finetune(net, model, parts["ft"], cfg["epochs"], lr=lr, lam=0.0, seed=0)
                row["finetuned"] = acc(net, parts["test"])
            rows.append(row)
            log(f"  {name} {p:.0%} {row['method']}: {row['accuracy']:.4f}")


def run_channels(out: Path) -> None:
    """Add WoodFisher channel pruning (``pattern="channels"``) rows to an existing result."""
    import json

    res = json.loads(out.read_text())
    res["channels"] = []
    for name in ("mlpnet", "cnn"):
        model, info = load(name)
        model.eval()
        splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
        n = len(splits.train)
        held = pruning_batches(subset(splits.train, 0, n - VAL), 1024, seed=0)
        example = torch.zeros(1, *splits.input_shape)
        for p in (0.3, 0.5):
            for target in ("params", "flops"):
                net = copy.deepcopy(model)
                t0 = time.perf_counter()
                try:
                    prune(net, held, 1 - p, method="woodfisher", pattern="channels",
                          target=target, example_inputs=example, recompute=1, num_grads=256)
                except ValueError as err:
                    res["channels"].append({"model": name, "budget": p, "target": target,
                                            "error": str(err)})
                    log(f"  {name} channels {p:.0%} {target}: {err}")
                    continue
                flop = count_flops(net, example)
                row = {"model": name, "budget": p, "target": target,
                       "accuracy": acc(net, splits.test), "seconds": time.perf_counter() - t0,
                       "nonzero_macs_fraction": flop.nonzero_macs / flop.total_macs}
                res["channels"].append(row)
                log(f"  {name} channels {p:.0%} {target}: {row['accuracy']:.4f}")
    res["channels_command"] = ("WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src:bench python "
                               "bench/lowrank.py --channels")
    res["machine_channels"] = machine_info()
    atomic_save_json(res, out)


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def sensitivity(name, model, parts, cfg) -> list[dict]:
    """Loss increase on the validation split when one layer alone keeps 30 % of its weights."""
    base = evaluate(model, parts["val"])["loss"]
    probe = decompose(model, params=0.3, method="tucker2", ranks="uniform", **cfg["select"])
    names = [r["name"] for r in probe.lowrank["layers"]]
    measures = {m["name"]: m for m in layer_measures(
        {n: model.get_submodule(n) for n in names})}
    out = []
    for layer in names:
        one = decompose(model, params=0.3, method="tucker2", ranks="uniform", layers=[layer],
                        **cfg["select"])
        loss = evaluate(one, parts["val"])["loss"]
        m = measures[layer]
        out.append({"model": name, "layer": layer, "loss_increase": loss - base,
                    "erank_ratio": m["erank_ratio"], "l1_rank_ratio": m["l1_rank"] /
                    m["full_rank"], "stable_rank_ratio": m["stable_rank"] / m["full_rank"],
                    "mean_abs": m["mean_abs"]})
    return out


def cnn_extras(model, parts, cfg, lr) -> dict:
    out: dict = {"methods": [], "integration": [], "families": []}
    for method in ("svd", "tucker2", "cp"):
        t0 = time.perf_counter()
        small = decompose(model, params=0.5, method=method, ranks="fisher", data=parts["held"],
                          min_weights=cfg["min_weights"], num_grads=cfg["num_grads"])
        out["methods"].append({"method": method, "accuracy": acc(small, parts["test"]),
                               "params_fraction": small.lowrank["params_fraction"],
                               "flops_fraction": small.lowrank["flops_fraction"],
                               "seconds": time.perf_counter() - t0})
        log(f"  cnn method {method}: {out['methods'][-1]['accuracy']:.4f}")
    small = decompose(model, params=0.5, ranks="fisher", data=parts["held"],
                      min_weights=cfg["min_weights"], num_grads=cfg["num_grads"])
    names = [r["name"] for r in small.lowrank["layers"]]
    finetune(small, model, parts["ft"], cfg["epochs"], lr=lr, seed=0)
    steps = [("dense", model, None), ("low rank 50 % + fine-tune", small, None)]
    pruned = copy.deepcopy(small)
    prune(pruned, parts["held"], 0.5, layers=[f"{n}.*" for n in names], recompute=1,
          num_grads=cfg["num_grads"])
    steps.append(("+ WoodFisher 50 % of the factors", pruned, None))
    for bits in (8, 4):
        q = copy.deepcopy(pruned)
        quantize(q, bits)
        steps.append((f"+ {bits}-bit", q, bits))
    for label, net, bits in steps:
        out["integration"].append({"step": label, "accuracy": acc(net, parts["test"]),
                                   "size_bits": size_bits(net, bits)["bits"]})
        log(f"  cnn {label}: {out['integration'][-1]}")
    fam = out["families"]
    fam.append({"family": "pre-train (decompose, fine-tune with distillation)",
                "accuracy": out["integration"][1]["accuracy"], "epochs": cfg["epochs"]})
    aware = copy.deepcopy(model)
    train_rank_penalised(aware, parts["ft"], cfg["epochs"], penalty="erank", strength=0.1, lr=lr)
    aware_small = decompose(aware, params=0.5, ranks="fisher", data=parts["held"],
                            min_weights=cfg["min_weights"], num_grads=cfg["num_grads"])
    fam.append({"family": "compression-aware (erank penalty, then decompose; no fine-tune)",
                "accuracy": acc(aware_small, parts["test"]), "epochs": cfg["epochs"]})
    torch.manual_seed(0)
    fresh = build_model("cnn", parts["input_shape"])
    scratch = preset_model(small, fresh)
    train(scratch, parts["ft"], epochs=cfg["preset_epochs"], lr=0.05, progress=False)
    fam.append({"family": "pre-set (same factorised structure, trained from scratch)",
                "accuracy": acc(scratch, parts["test"]), "epochs": cfg["preset_epochs"]})
    for f in fam:
        log(f"  cnn family {f}")
    return out


def choose_lr(model, parts, cfg) -> dict:
    small = decompose(model, params=0.5, ranks="fisher", data=parts["held"],
                      min_weights=cfg["min_weights"], num_grads=cfg["num_grads"])
    scores = {}
    for lr in (1e-5, 1e-3, 1e-2):
        net = copy.deepcopy(small)
        finetune(net, model, parts["ft"], cfg["epochs"], lr=lr, seed=0)
        scores[lr] = acc(net, parts["val"])
        log(f"  lr {lr:g}: validation accuracy {scores[lr]:.4f}")
    return {"validation_accuracy": scores, "chosen": max(scores, key=scores.get)}


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def tables(res: dict) -> str:
    """The result JSON as the markdown tables of docs/lowrank.md."""
    out = []
    dense = {d["model"]: d for d in res.get("dense", [])}
    for name, d in dense.items():
        rows = [r for r in res["rules"] if r["model"] == name]
        budgets = sorted({r["budget"] for r in rows})
        out.append(f"\n**{name}** (dense {pct(d['accuracy'])} % on {d['test_images']} test "
                   f"images; fine-tuning: 2 epochs on {d['finetune_images']} training images)\n")
        head = "| rule | " + " | ".join(f"{b:.0%}: no FT | {b:.0%}: FT | {b:.0%}: model params"
                                        for b in budgets) + " |"
        out += [head, "|---" * (1 + 3 * len(budgets)) + "|"]
        for rule in dict.fromkeys(r["rule"] for r in rows):
            cells = []
            for b in budgets:
                r = next((x for x in rows if x["rule"] == rule and x["budget"] == b), None)
                cells += [pct(r and r["accuracy"]), pct(r and r.get("finetuned")),
                          pct(r and r.get("model_params_fraction"))]
            out.append(f"| {rule} | " + " | ".join(cells) + " |")
        prs = [r for r in res["pruning"] if r["model"] == name]
        for r in prs:
            lr = r.get("lowrank_fisher_flops")
            extra = (f"; low rank `fisher` at flops={r['budget']:g}: {pct(lr['accuracy'])} "
                     f"(MACs {pct(lr['flops_fraction'])} %)") if lr else ""
            out.append(f"\n- {r['method']} at equal {r['equal']} ({r['budget']:.0%} kept, "
                       f"nonzero MACs {pct(r['nonzero_macs_fraction'])} %): "
                       f"{pct(r['accuracy'])}, fine-tuned {pct(r.get('finetuned'))}{extra}")
    if res.get("lr_choice"):
        out.append("\nFine-tuning learning rate (CNN, 50 %, validation accuracy): " + ", ".join(
            f"{k}: {pct(v)}" for k, v in res["lr_choice"]["validation_accuracy"].items())
            + f"; chosen {res['lr_choice']['chosen']}")
    ex = res.get("cnn_extras")
    if ex:
        out.append("\nCNN, default selection (conv2), `fisher`, 50 %, no fine-tuning, by method: "
                   + ", ".join(f"{m['method']} {pct(m['accuracy'])}" for m in ex["methods"]))
        out += ["\n| CNN step | test accuracy % | size (KiB) |", "|---|---|---|"]
        out += [f"| {r['step']} | {pct(r['accuracy'])} | {r['size_bits'] / 8192:.1f} |"
                for r in ex["integration"]]
        out += ["\n| family (CNN, 50 % of conv2) | test accuracy % | epochs |", "|---|---|---|"]
        out += [f"| {f['family']} | {pct(f['accuracy'])} | {f['epochs']} |"
                for f in ex["families"]]
    if res.get("channels"):
        out += ["\n| channel pruning | kept | target | test accuracy % | nonzero MACs % |",
                "|---|---|---|---|---|"]
        out += [f"| {c['model']} | {c['budget']:.0%} | {c['target']} | "
                f"{pct(c.get('accuracy'))} | {pct(c.get('nonzero_macs_fraction'))} |"
                for c in res["channels"]]
    for note in res.get("notes", []):
        out.append(f"\nNote: {note}")
    if res.get("survey_claim"):
        out.append("\nSpearman correlation with the per-layer loss increase (layer alone at "
                   f"30 %, {len(res['sensitivity'])} layers): " + ", ".join(
                       f"{k} {v:+.2f}" for k, v in res["survey_claim"].items()))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resnet-test", type=int, default=1000)
    ap.add_argument("--tables", type=Path, help="print a result file's tables and exit")
    ap.add_argument("--channels", action="store_true",
                    help="add channel-pruning rows to an existing result (--out) and exit")
    args = ap.parse_args()
    if args.tables:
        import json

        print(tables(json.loads(args.tables.read_text())))
        return
    torch.set_num_threads(args.threads)
    out = args.out or Path(f"bench/results/lowrank{'-quick' if args.quick else ''}.json")
    if args.channels:
        run_channels(out)
        return
    t_start = time.perf_counter()
    quick = args.quick
    cfg_all = {"rules": RULES, "ft_rules": ("uniform", "fisher", "rene"),
               "num_grads": 256, "min_weights": 512,
               # The rule comparison factorises every layer (classifier included): with the
               # defaults the CNN has one selected layer (conv2) and every rule coincides.
               "select": {"min_weights": 0, "keep_classifier": False},
               "epochs": 2, "finetune": True, "equal_flops": not quick, "preset_epochs": 4,
               "rene": {"iters": 30 if quick else 50}}
    models = ["mlpnet", "cnn"] + ([] if quick else ["resnet20"])
    budgets = (0.5,) if quick else (0.3, 0.5)
    result: dict = {"command": "WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src:bench python "
                    "bench/lowrank.py" + (" --quick" if quick else ""),
                    "machine": machine_info(), "rules": [], "pruning": [], "sensitivity": [],
                    "notes": []}
    lr = 1e-2
    for name in models:
        loaded = load(name)
        if loaded is None:
            result["notes"].append(f"{name}: no cached checkpoint; skipped")
            log(f"{name}: no cached checkpoint, skipped")
            continue
        model, info = loaded
        model.eval()
        splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
        n_train = len(splits.train)
        resnet = name == "resnet20"
        n_ft = {"mlpnet": 5000, "cnn": 4000, "resnet20": 1000}[name] // (2 if quick else 1)
        n_test = args.resnet_test if resnet else (2000 if quick and name == "cnn" else None)
        parts = {
            "held": pruning_batches(subset(splits.train, 0, n_train - VAL), 1024, seed=0),
            "ft": subset(splits.train, 0, n_ft),
            "val": subset(splits.train, n_train - VAL, n_train if not resnet else n_train - 4000),
            "test": splits.test if n_test is None else subset(splits.test, 0, n_test),
            "example": torch.zeros(1, *splits.input_shape),
            "input_shape": splits.input_shape,
        }
        cfg = dict(cfg_all)
        cfg["ft_budgets"] = budgets if not resnet else (0.5,)
        if resnet:
            cfg["ft_rules"] = ("uniform", "fisher", "rene")
            cfg["rules"] = tuple(r for r in RULES if r != "fisher+W")
            cfg["rene"] = {"iters": 30, "batch_size": 64}
            cfg["equal_flops"] = False
        dense = {"model": name, "accuracy": acc(model, parts["test"]),
                 "checkpoint_epochs": info["meta"].get("epochs"),
                 "test_images": len(parts["test"]), "finetune_images": n_ft,
                 "params": sum(p.numel() for p in model.parameters())}
        result.setdefault("dense", []).append(dense)
        log(f"{name}: dense accuracy {dense['accuracy']:.4f} on {len(parts['test'])} images")
        if name == "cnn" and not quick:
            result["lr_choice"] = choose_lr(model, parts, cfg)
            lr = result["lr_choice"]["chosen"]
        run_rules(name, model, parts, budgets, cfg, lr, result["rules"])
        probe = decompose(model, params=0.5, ranks="uniform", **cfg["select"])
        layers = [r["name"] for r in probe.lowrank["layers"]]
        run_pruning(name, model, parts, budgets, cfg, lr, layers, result["pruning"])
        result["sensitivity"] += sensitivity(name, model, parts, cfg)
        if name == "cnn" and not quick:
            result["cnn_extras"] = cnn_extras(model, parts, cfg, lr)
        atomic_save_json({**result, "partial": True}, out)
    sens = result["sensitivity"]
    result["survey_claim"] = {
        m: spearman([s[m] for s in sens], [s["loss_increase"] for s in sens])
        for m in ("erank_ratio", "l1_rank_ratio", "stable_rank_ratio", "mean_abs")
    } if len(sens) > 2 else {}
    result["finetune_lr"] = lr
    result["total_seconds"] = time.perf_counter() - t_start
    result["machine_after"] = machine_info()
    atomic_save_json(result, out)
    log(f"wrote {out} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
