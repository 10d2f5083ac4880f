"""Benchmark: FDNP, BA-FDNP, spatial DNS and gradual pruning of the convs of CNN and ResNet-20.

Dense models: ``bench/common.py`` (Fashion-MNIST, 10 epochs, seed 0, cached under
``$WOODFISHER_BENCH_CACHE``). Every method then trains from the dense model for the same epochs
on the same training subset, with SGD+momentum and a cosine learning rate (peak 0.01), and
prunes only the 3×3 convs to the same parameter compression (4×, 8×, 16× of the conv
weights):

* ``fdnp`` / ``ba-fdnp`` — :func:`woodfisher.frequency.fdnp` (DCT coefficients, DNS rule with a
  compression target; BA = band-adaptive); ``fdnp+woodfisher`` (CNN only) — the same with our
  second-order score ``|c|/sqrt([F⁻¹]_qq)``;
* ``dns`` — the same dynamic rule on the spatial weights (``domain="spatial"``);
* ``gradual-magnitude`` / ``gradual-woodfisher`` — :func:`woodfisher.gradual` restricted to the
  same convs (cubic schedule from 50 %, pruning in the first two thirds of the epochs).

Reported on the test split (or its first ``--test-samples`` for ResNet-20): accuracy, parameter
compression over the pruned convs, and the theoretical speed-up of those convs (multiplies only;
for FDNP also with the DCT of the feature maps). A one-shot table (CNN, no training) compares
the magnitude rule and WoodFisher/OBS on coefficients and on spatial weights.

``--tune`` instead picks FDNP's defaults (target ramp, allocation, band slope) on a validation
split carved from the training set (train on samples [0, 50k), score on [50k, 60k)).

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/fdnp.py          # full
    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/fdnp.py --quick  # minutes
    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/fdnp.py --tune
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from common import dense_checkpoint, machine_info  # noqa: E402

from woodfisher.checkpoint import atomic_save_json  # noqa: E402
from woodfisher.data import load_dataset  # noqa: E402
from woodfisher.frequency import eligible_convs, fdnp, frequency_cost, prune_oneshot  # noqa: E402
from woodfisher.gradual import GradualConfig, gradual  # noqa: E402
from woodfisher.train import evaluate  # noqa: E402
from woodfisher.train import train as train_model  # noqa: E402

METHODS = ("fdnp", "ba-fdnp", "fdnp+woodfisher", "dns", "gradual-magnitude",
           "gradual-woodfisher")
# The second-order dynamic criterion re-estimates F⁻¹ every epoch; on the CNN only.
SKIP = {"resnet20": ("fdnp+woodfisher",)}
#: Besides the methods: ``finetune`` (the same training without pruning: what the training
#: budget alone does to the dense model) and ``oneshot`` (the CNN's one-shot table).
EXTRAS = ("finetune", "oneshot")
# Per-sample gradients for the WoodFisher pruning steps of gradual: blocks as wide as the
# number of gradients (full rank per block), few enough for ResNet-20's 270k conv weights.
WOODFISHER = {"num_grads": 256, "block_size": 256}

#: (train samples, epochs, test samples or None for all) per model and mode.
SETTINGS = {
    "full": {"cnn": (10_000, 3, None), "resnet20": (3_000, 2, 3_000)},
    "quick": {"cnn": (2_000, 1, 2_000), "resnet20": (500, 1, 500)},
}
RATIOS = {"full": {"cnn": (4, 8, 16), "resnet20": (8,)}, "quick": {"cnn": (8,), "resnet20": (8,)}}


def _head(ds: TensorDataset, n: int | None, start: int = 0) -> TensorDataset:
    stop = None if n is None else start + n
    return TensorDataset(*(t[start:stop] for t in ds.tensors))


def run_method(method: str, dense: torch.nn.Module, train: Any, ratio: float, epochs: int,
               lr: float, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a copy of ``dense`` with one method to ``ratio`` over its 3×3 convs."""
    model = copy.deepcopy(dense)
    names, _ = eligible_convs(model)
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "finetune":
        train_model(model, train, epochs=epochs, lr=lr, batch_size=128, seed=seed,
                    weight_decay=0.0, progress=False)
        extra: dict[str, Any] = {}
    elif method.startswith("gradual-"):
        cfg = GradualConfig(final_sparsity=1 - 1 / ratio, epochs=epochs,
                            method=method.removeprefix("gradual-"), lr=lr, seed=seed,
                            prune_options={"layers": names,
                                           **(WOODFISHER if "woodfisher" in method else {})})
        gradual(model, train, cfg, progress=False)
        extra: dict[str, Any] = {}
    else:
        rep = fdnp(model, train, compression=ratio, epochs=epochs,
                   band_adaptive=method.startswith("ba-"), seed=seed, lr=lr, progress=False,
                   domain="spatial" if method == "dns" else "frequency",
                   criterion="woodfisher" if method.endswith("+woodfisher") else "magnitude")
        extra = {"bands": rep["bands"], "layers": [
            {k: r[k] for k in ("name", "kept_fraction", "c") if k in r} for r in rep["layers"]]}
    extra["seconds"] = time.perf_counter() - t0
    extra["cpu_seconds"] = time.process_time() - c0  # all threads; steadier than wall on a busy box
    return model, {**extra, "names": names}


def measure(model: torch.nn.Module, names: list[str], test: Any, example: torch.Tensor
            ) -> dict[str, Any]:
    full = frequency_cost(model, example, names)
    cost = full["selected"]
    return {"accuracy": evaluate(model, test)["accuracy"], "compression": cost["compression"],
            "speedup_multiply_only": cost["speedup_multiply_only"],
            "speedup_with_transform": cost["speedup_with_transform"],
            "model_speedup_multiply_only": full["model"]["speedup_multiply_only"]}


def oneshot_table(dense: torch.nn.Module, train: Any, test: Any, ratios: tuple) -> list[dict]:
    """Magnitude vs WoodFisher/OBS, on DCT coefficients vs spatial weights, no training."""
    batches = [(train.tensors[0][i:i + 128], train.tensors[1][i:i + 128])
               for i in range(0, 1024, 128)]
    rows = []
    for domain in ("spatial", "frequency"):
        for method in ("magnitude", "woodfisher"):
            for ratio in ratios:
                model = copy.deepcopy(dense)
                opts = {"num_grads": 512, "block_size": 512} if method == "woodfisher" else {}
                prune_oneshot(model, batches, ratio, method=method, domain=domain, **opts)
                rows.append({"domain": domain, "method": method, "ratio": ratio,
                             "accuracy": evaluate(model, test)["accuracy"]})
    return rows


def tune(args: argparse.Namespace, console: Console) -> None:
    """Pick ramp, band slope and allocation on a validation split (never the test set).

    The validation samples are train[50k:60k], which no run trains on (the dense model did see
    them in its own training, as it saw every training sample).
    """
    dense, info = dense_checkpoint("cnn")
    splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
    # A third of the bench's training budget per run (5k samples × 2 epochs instead of 10k × 3).
    n, epochs = (1_000, 1) if args.quick else (5_000, 2)
    train, val = _head(splits.train, n), _head(splits.train, 10_000, start=50_000)
    grid = [dict(ramp=r, band_slope=s, band_adaptive=s > 0, allocation="score",
                 **({"criterion": c} if c != "magnitude" else {}))
            for c in args.criteria for s in args.slopes for r in args.ramps]
    grid += [dict(ramp=0.5, band_slope=2.0, band_adaptive=True, allocation=a)
             for a in args.allocations if a != "score"]
    out = args.out.with_name(args.out.stem + ("_tune_quick.json" if args.quick else "_tune.json"))
    # Rows accumulate across invocations (a grid can be extended without redoing it).
    done = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    rows = [r for r in done["rows"] if r.get("train_samples", n) == n]
    for ratio in (8,):
        for opts in grid:
            if any(all(r.get(k) == v for k, v in {"ratio": ratio, **opts}.items())
                   for r in rows):
                continue
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            fdnp(model, train, compression=ratio, epochs=epochs, progress=False, lr=args.lr,
                 **opts)
            rows.append({"ratio": ratio, **opts, "train_samples": n,
                         "val_accuracy": evaluate(model, val)["accuracy"],
                         "seconds": time.perf_counter() - t0})
            console.print(rows[-1])
            atomic_save_json({"machine": machine_info(), "train_samples": n, "epochs": epochs,
                              "dense_val_accuracy": evaluate(dense, val)["accuracy"],
                              "validation": "train[50000:60000]", "rows": rows}, out)
    console.print(f"wrote {out}")


def plot_band_profiles(result: dict[str, Any], path: Path) -> None:
    """Kept coefficients per band (all 3×3 convs) of the frequency-domain runs, per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from woodfisher.checkpoint import atomic_savefig

    rows = [r for r in result["rows"] if "fdnp" in r["method"] and r.get("bands")]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(6 * max(len(models), 1), 3.6),
                             squeeze=False)
    styles = {"fdnp": "-", "ba-fdnp": "--", "fdnp+woodfisher": ":"}
    for ax, name in zip(axes[0], models, strict=False):
        for r in (r for r in rows if r["model"] == name):
            kept = r["bands"]["3x3"]["kept_fraction"]
            ax.plot(range(len(kept)), [100 * f for f in kept], styles.get(r["method"], "-"),
                    marker="o", color={4: "C0", 8: "C1", 16: "C2"}.get(r["ratio"], "k"),
                    label=f"{r['method']} {r['ratio']}×")
        ax.set_title(f"{name}: coefficients kept per band (all 3×3 convs)", fontsize=10)
        ax.set_xlabel("frequency band u+v (0 = DC)")
        ax.set_ylabel("kept (%)")
        ax.set_xticks(range(5))
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subsets, 8× only")
    ap.add_argument("--tune", action="store_true", help="choose defaults on a validation split")
    ap.add_argument("--methods", type=lambda t: t.split(","), default=None,
                    help=f"only these of {', '.join(METHODS + EXTRAS)} (rows merge into --out)")
    ap.add_argument("--plot", action="store_true",
                    help="only redraw the band picture from an existing --out JSON")
    ap.add_argument("--models", default=None,
                    help="comma-separated; default cnn,resnet20 (cnn with --quick)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--dense-epochs", type=int, default=10,
                    help="epochs of the cached dense models (bench/common.py)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (1 is faster when the machine is oversubscribed)")
    ap.add_argument("--slopes", type=lambda t: [float(v) for v in t.split(",")],
                    default=[0.0, 2.0, 4.0], help="--tune: band slopes to try")
    ap.add_argument("--ramps", type=lambda t: [float(v) for v in t.split(",")],
                    default=[0.0, 0.5], help="--tune: target ramps to try")
    ap.add_argument("--allocations", type=lambda t: t.split(","),
                    default=["score", "global", "uniform"], help="--tune: allocations")
    ap.add_argument("--criteria", type=lambda t: t.split(","), default=["magnitude"],
                    help="--tune: scores (magnitude, woodfisher)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fdnp.json"))
    args = ap.parse_args()
    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    if args.tune:
        tune(args, console)
        return
    mode = "quick" if args.quick else "full"
    out = args.out.with_name(args.out.stem + "_quick.json") if args.quick else args.out
    png = out.with_name(out.stem.replace("fdnp", "fdnp-bands") + ".png")
    if args.plot:
        plot_band_profiles(json.loads(out.read_text()), png)
        console.print(f"wrote {png}")
        return
    t_start = time.perf_counter()
    chosen = args.methods or [*METHODS, *EXTRAS]
    # Rows of earlier invocations stay unless this one recomputes them (same model, method and
    # ratio), so models and methods can be run one at a time into one file.
    result: dict[str, Any] = (json.loads(out.read_text()) if out.is_file() else
                              {"settings": {}, "rows": [], "oneshot": []})
    result.update(machine=machine_info(), mode=mode, lr=args.lr, threads=args.threads)
    models = args.models or ("cnn" if args.quick else "cnn,resnet20")
    for name in models.split(","):
        t_model = time.perf_counter()
        dense, info = dense_checkpoint(name, epochs=args.dense_epochs)
        splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
        n_train, epochs, n_test = SETTINGS[mode][name]
        train, test = _head(splits.train, n_train), _head(splits.test, n_test)
        example = test.tensors[0][:1]
        names, _ = eligible_convs(dense)
        base = measure(dense, names, test, example)
        result["settings"][name] = {"train_samples": n_train, "epochs": epochs,
                                    "dense_epochs": args.dense_epochs,
                                    "test_samples": len(test), "dense_accuracy": base["accuracy"],
                                    "ratios": list(RATIOS[mode][name]), "convs": names}
        console.print(f"{name}: dense {base['accuracy']:.4f} on {len(test)} test samples")
        if name == "cnn" and "oneshot" in chosen:
            result["oneshot"] = oneshot_table(dense, train, test, RATIOS[mode][name])
        runs = [("finetune", 1)] if "finetune" in chosen else []
        runs += [(m, r) for r in RATIOS[mode][name] for m in METHODS
                 if m in chosen and m not in SKIP.get(name, ())]
        for method, ratio in runs:
            model, extra = run_method(method, dense, train, ratio, epochs, args.lr)
            row = {"model": name, "method": method, "ratio": ratio,
                   **measure(model, names, test, example), **extra}
            result["rows"] = [x for x in result["rows"] if (x["model"], x["method"], x["ratio"])
                              != (name, method, ratio)] + [row]
            console.print(f"  {method:>20} {ratio:>3}×: acc {row['accuracy']:.4f} "
                          f"comp {row['compression']:.2f}× speed-up "
                          f"{row['speedup_multiply_only']:.2f}× ({row['seconds']:.0f} s)")
            result["seconds"] = {**result.get("seconds", {}), name: time.perf_counter() - t_model}
            atomic_save_json(result, out)
    result["load_average_end"] = machine_info()["load_average"]
    atomic_save_json(result, out)
    plot_band_profiles(result, png)
    print_tables(result, Console())
    console.print(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")


def print_tables(result: dict[str, Any], console: Console) -> None:
    for name, s in result["settings"].items():
        tuned = next((x for x in result["rows"] if x["model"] == name
                      and x["method"] == "finetune"), None)
        same = f", same training unpruned {100 * tuned['accuracy']:.2f}" if tuned else ""
        table = Table(title=f"{name}: test accuracy % (dense {100 * s['dense_accuracy']:.2f}"
                      f"{same}) / conv speed-up ×, multiplies only [with DCT of feature maps]")
        table.add_column("method")
        for r in s["ratios"]:
            table.add_column(f"{r}×", justify="right")
        for method in (m for m in METHODS if m not in SKIP.get(name, ())):
            cells = []
            for r in s["ratios"]:
                row = next((x for x in result["rows"] if x["model"] == name
                            and x["method"] == method and x["ratio"] == r), None)
                if row is None:
                    cells.append("-")
                    continue
                speed = f"{row['speedup_multiply_only']:.1f}"
                if "fdnp" in method:
                    speed += f" [{row['speedup_with_transform']:.1f}]"
                cells.append(f"{100 * row['accuracy']:.2f} / {speed}")
            table.add_row(method, *cells)
        console.print(table)
    if result["oneshot"]:
        table = Table(title="CNN one-shot (no training): test accuracy %")
        ratios = sorted({r["ratio"] for r in result["oneshot"]})
        table.add_column("weights / rule")
        for r in ratios:
            table.add_column(f"{r}×", justify="right")
        for domain in ("spatial", "frequency"):
            for method in ("magnitude", "woodfisher"):
                cells = [f"{100 * x['accuracy']:.2f}" for r in ratios for x in result["oneshot"]
                         if x["domain"] == domain and x["method"] == method and x["ratio"] == r]
                table.add_row(f"{domain} / {method}", *cells)
        console.print(table)


if __name__ == "__main__":
    main()
