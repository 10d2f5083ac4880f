"""Benchmark: joint pruning + quantization as a QUBO (Wang et al. 2025) on the CNN and ResNet-20.

Two studies on Fashion-MNIST, dense models from ``bench/common.py`` (trained on all 60,000
training images):

1. **Solvers.** The formulated QUBOs (exact slack penalty, and the paper's ``−γ·size`` at the
   ``γ`` the search found) at three budgets, each solved by simulated annealing (dwave-samplers),
   tabu, steepest descent, a genetic algorithm and REINFORCE, over seeds: energy, gap to the best
   any solver found, time. Then random sub-problems of 20 variables (the rest clamped to the best
   solution) that ExactSolver certifies: gap to the exact optimum, success rate over seeds, time
   to solution (TTS99). SA, GA and RL get the same arithmetic (``reads × sweeps`` energy
   evaluations for GA/RL, one evaluation ≈ one sweep); tabu gets SA's measured wall time.
2. **Accuracy vs size.** Fisher-QUBO (ours), magnitude-QUBO (the paper's objective) and uniform
   bit widths at equal size, without fine-tuning and after one epoch of quantization-aware
   fine-tuning at budget 0.1 (CNN; ResNet-20 with ``--finetune-resnet``). The fisher damp and
   the magnitude ``β`` are chosen on 5,000 training images held out from the calibration data
   (budget 0.1, CNN), never on the test set, which all reported accuracies use.

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/qubo.py          # full
    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/qubo.py --quick  # smaller
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import dimod
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_checkpoint, machine_info  # noqa: E402

from woodfisher.checkpoint import atomic_save_json  # noqa: E402
from woodfisher.compare import pruning_batches  # noqa: E402
from woodfisher.curvature import fisher_inverse  # noqa: E402
from woodfisher.data import load_dataset  # noqa: E402
from woodfisher.params import select_modules  # noqa: E402
from woodfisher.quant import fake_quantize_model, quant_aware  # noqa: E402
from woodfisher.qubo import (  # noqa: E402
    Effort,
    apply_plan,
    best_decision,
    fill,
    formulate,
    lagrange_search,
    layer_report,
    plan_modules,
    qubo_costs,
    solve,
)
from woodfisher.qubo.costs import MAGNITUDE_BETA, QUBO_RELATIVE_DAMP  # noqa: E402
from woodfisher.train import evaluate, train  # noqa: E402

VAL = 5000
SOLVERS = ["sa", "tabu", "steepest", "ga", "rl"]
console = Console(stderr=True)


def log(msg: str) -> None:
    console.print(f"[{time.strftime('%H:%M:%S')}] {msg}")


# -- solver study ---------------------------------------------------------------------------
def run_solvers(bqm, effort: Effort, seeds: list[int]) -> list[dict]:
    """Every solver on one BQM; tabu gets SA's wall time per read."""
    rows, sa_time = [], None
    for name in SOLVERS:
        for seed in seeds:
            eff = effort
            if name == "tabu" and sa_time is not None:
                eff = Effort(effort.reads, effort.sweeps,
                             max(1, round(1000 * sa_time / effort.reads)))
            run = solve(bqm, name, seed=seed, effort=eff)
            if name == "sa":
                sa_time = run.time_s if sa_time is None else sa_time
            rows.append({"solver": name, "seed": seed, "energy": run.energy,
                         "time_s": run.time_s, "sample": run.sampleset.first.sample})
    return rows


def subproblems(bqm, reference: dict, count: int, size: int, seeds: list[int],
                effort: Effort, rng: np.random.Generator) -> list[dict]:
    """Random sub-problems of ``size`` variables (the rest clamped to ``reference``)."""
    out = []
    labels = list(bqm.variables)
    for k in range(count):
        free = set(rng.choice(len(labels), size=size, replace=False).tolist())
        sub = bqm.copy()
        sub.fix_variables({v: reference[v] for i, v in enumerate(labels) if i not in free})
        t0 = time.perf_counter()
        exact = solve(sub, "exact")
        exact_time = time.perf_counter() - t0
        scale = max(1e-12, float(np.abs(sub.to_numpy_vectors()[0]).max()))
        for row in run_solvers(sub, effort, seeds):
            row.pop("sample")
            gap = row["energy"] - exact.energy
            out.append({**row, "problem": k, "gap": gap, "optimum": exact.energy,
                        "exact_time_s": exact_time, "success": bool(gap <= 1e-9 * scale)})
    return out


def tts99(time_s: float, p: float) -> float:
    if p >= 1:
        return time_s
    if p <= 0:
        return math.inf
    return time_s * math.log(0.01) / math.log(1 - p)


def summarise_sub(rows: list[dict]) -> list[dict]:
    out = []
    for name in SOLVERS:
        r = [x for x in rows if x["solver"] == name]
        p = sum(x["success"] for x in r) / len(r)
        t = float(np.mean([x["time_s"] for x in r]))
        tts = tts99(t, p)
        out.append({"solver": name, "success_rate": p, "mean_gap": float(np.mean(
            [x["gap"] for x in r])), "max_gap": float(np.max([x["gap"] for x in r])),
            "time_s": t, "tts99_s": tts if math.isfinite(tts) else None, "runs": len(r)})
    return out


def solver_study(name: str, costs, budgets: list[float], effort: Effort, seeds: list[int],
                 sub_count: int, sub_seeds: list[int], sub_effort: Effort, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    result = {"model": name, "effort": vars(effort), "sub_effort": vars(sub_effort),
              "instances": [], "subproblems": []}
    for budget in budgets:
        log(f"{name}: γ search at budget {budget}")
        lag, _, _, trace = plan(costs, budget, effort, 0)
        for constraint, problem in (("penalty", formulate(costs, budget)), ("lagrange", lag)):
            bqm = problem.bqm
            log(f"{name}: {constraint} QUBO, budget {budget}: {bqm.num_variables} variables, "
                f"{bqm.num_interactions} couplings")
            rows = run_solvers(bqm, effort, seeds)
            best = min(rows, key=lambda r: r["energy"])
            for r in rows:
                d, pick = best_decision(problem, dimod.SampleSet.from_samples_bqm(
                    dict(r["sample"]), bqm))
                r.update(gap=r["energy"] - best["energy"],
                         objective_value=problem.objective_value(d),
                         size_ratio=problem.size_ratio(d), repaired=pick["repaired"])
            inst = {"budget": budget, "constraint": constraint, "gamma": problem.gamma,
                    "variables": bqm.num_variables, "interactions": bqm.num_interactions,
                    "penalty": problem.penalty, "best_energy": best["energy"],
                    "runs": [{k: v for k, v in r.items() if k != "sample"} for r in rows]}
            if constraint == "lagrange":
                inst["gamma_trace"] = trace
            result["instances"].append(inst)
            if budget == budgets[len(budgets) // 2]:
                log(f"{name}: {sub_count} sub-problems of 20 variables ({constraint})")
                sub = subproblems(bqm, best["sample"], sub_count, 20, sub_seeds, sub_effort, rng)
                result["subproblems"].append({"budget": budget, "constraint": constraint,
                                              "runs": sub, "summary": summarise_sub(sub)})
    return result


# -- accuracy vs size -----------------------------------------------------------------------
def finetune(model, bits: dict[str, int], data, seed: int) -> dict:
    """One epoch of quantization-aware fine-tuning (masks kept), ending on the grid."""
    with quant_aware(select_modules(model), bits):
        return train(model, data, epochs=1, lr=0.01, seed=seed, progress=False)


_PLANS: dict = {}


def plan(costs, budget, effort, seed):
    """What ``compress`` does before applying (γ search, then fill), once per costs and budget."""
    key = (id(costs), budget, seed)
    if key not in _PLANS:
        problem, run, decision, trace = lagrange_search(costs, budget, "sa", seed=seed,
                                                        effort=effort)
        _PLANS[key] = (problem, run, fill(problem, decision), trace)
    return _PLANS[key]


def qubo_run(model, costs, data, budget, quantizer, effort, seed):
    """``compress(model copy, costs=costs, ...)`` with the plan shared between quantizers."""
    problem, run, decision, trace = plan(costs, budget, effort, seed)
    m = copy.deepcopy(model)
    fisher = None
    if quantizer == "obq":
        fisher = fisher_inverse(m, data, params=plan_modules(m, problem),
                                num_grads=costs.options.get("num_grads"), block_size=128)
    example = next(iter(data))[0][:2]  # pruned channels silenced, as compress does
    stored = apply_plan(m, problem, decision, quantizer, fisher, example)
    return m, {
        "size_ratio": problem.size_ratio(decision), "layers": layer_report(problem, decision),
        "objective_value": problem.objective_value(decision),
        "solver_time_s": sum(t["time_s"] for t in trace),
        "storage_ratio": sum(v["storage_bits"] for v in stored.values()) / problem.fp32_bits,
    }


def choose_on_validation(model, fisher, calib, val, effort, grid) -> dict:
    """The fisher damp and the magnitude β with the best validation accuracy at budget 0.1."""
    rows = []
    for rd in grid:
        m, r = qubo_run(model, fisher.with_relative_damp(rd), calib, 0.1, "rtn", effort, 0)
        rows.append({"objective": "fisher", "relative_damp": rd,
                     "val_accuracy": evaluate(m, val)["accuracy"], "size_ratio": r["size_ratio"],
                     "plan": [(x["bits"], x["pruned_filters"]) for x in r["layers"]]})
        log(f"validation fisher damp {rd}: {rows[-1]['val_accuracy']:.4f} {rows[-1]['plan']}")
    for beta in grid:
        mag = qubo_costs(model, None, "magnitude", beta=beta)
        m, r = qubo_run(model, mag, calib, 0.1, "rtn", effort, 0)
        rows.append({"objective": "magnitude", "beta": beta,
                     "val_accuracy": evaluate(m, val)["accuracy"], "size_ratio": r["size_ratio"],
                     "plan": [(x["bits"], x["pruned_filters"]) for x in r["layers"]]})
        log(f"validation magnitude beta {beta}: {rows[-1]['val_accuracy']:.4f} "
            f"{rows[-1]['plan']}")
    best_f = max((r for r in rows if r["objective"] == "fisher"),
                 key=lambda r: r["val_accuracy"])
    best_m = max((r for r in rows if r["objective"] == "magnitude"),
                 key=lambda r: r["val_accuracy"])
    return {"rows": rows, "relative_damp": best_f["relative_damp"], "beta": best_m["beta"]}


def accuracy_study(name, model, splits, fit, calib, fisher, magnitude, budgets, ft_budgets,
                   effort, seed, ft_methods) -> dict:
    dense = evaluate(model, splits.test)["accuracy"]
    rows = []

    def record(method, budget, m, size, bits, extra=None):
        acc = evaluate(m, splits.test)["accuracy"]
        row = {"method": method, "budget": budget, "size_ratio": size, "accuracy": acc,
               "drop": dense - acc, **(extra or {})}
        kind = "uniform" if method.startswith("uniform") else method
        if budget in ft_budgets and kind in ft_methods:
            t0 = time.perf_counter()
            finetune(m, bits, fit, seed)
            row["accuracy_ft1"] = evaluate(m, splits.test)["accuracy"]
            row["ft_time_s"] = time.perf_counter() - t0
        rows.append(row)
        log(f"{name} {method} @ {budget:.4f}: size {size:.4f}, acc {acc:.4f}"
            + (f", after 1 epoch {row['accuracy_ft1']:.4f}" if "accuracy_ft1" in row else ""))

    for budget in budgets:
        # The widest uniform width within the budget (at 0.1: 3 bits, 0.094 of fp32).
        b = math.floor(budget * 32 + 1e-9)
        m = copy.deepcopy(model)
        mods = select_modules(m)
        fake_quantize_model(mods, b)
        record(f"uniform {b}-bit", budget, m, b / 32, dict.fromkeys(mods, b))
        for method, costs, quantizer in (("magnitude-QUBO", magnitude, "rtn"),
                                         ("fisher-QUBO", fisher, "rtn"),
                                         ("fisher-QUBO + OBQ", fisher, "obq")):
            m, r = qubo_run(model, costs, calib, budget, quantizer, effort, seed)
            bits = {x["name"]: x["bits"] for x in r["layers"]}
            record(method, budget, m, r["size_ratio"], bits, {
                "plan": [(x["bits"], x["pruned_filters"], x["filters"]) for x in r["layers"]],
                "objective_value": r["objective_value"], "solver_time_s": r["solver_time_s"],
                "storage_ratio": r["storage_ratio"]})
    return {"model": name, "dense_accuracy": dense, "rows": rows}


def print_tables(result: dict) -> None:
    out = Console()
    for acc in result["accuracy"]:
        t = Table(title=f"{acc['model']}: test accuracy (%) vs stored size; dense "
                        f"{100 * acc['dense_accuracy']:.2f}")
        for c in ("method", "budget", "size", "no FT", "1 epoch FT", "plan (bits, pruned)"):
            t.add_column(c, justify="left" if c in ("method", "plan (bits, pruned)") else "right")
        for r in acc["rows"]:
            plan = " ".join(f"{b}/{p}" for b, p, *_ in r.get("plan", []))
            ft = f"{100 * r['accuracy_ft1']:.2f}" if "accuracy_ft1" in r else "-"
            t.add_row(r["method"], f"{r['budget']:.4f}", f"{r['size_ratio']:.4f}",
                      f"{100 * r['accuracy']:.2f}", ft, plan)
        out.print(t)
    for st in result["solvers"]:
        t = Table(title=f"{st['model']}: solvers on the formulated QUBOs (mean over seeds)")
        for c in ("budget", "form", "vars", "solver", "energy gap", "time (s)", "objective",
                  "size"):
            t.add_column(c, justify="left" if c in ("form", "solver") else "right")
        for inst in st["instances"]:
            for name in SOLVERS:
                r = [x for x in inst["runs"] if x["solver"] == name]
                t.add_row(f"{inst['budget']:.4f}", inst["constraint"], str(inst["variables"]),
                          name, f"{np.mean([x['gap'] for x in r]):.3g}",
                          f"{np.mean([x['time_s'] for x in r]):.2f}",
                          f"{np.mean([x['objective_value'] for x in r]):.4g}",
                          f"{np.mean([x['size_ratio'] for x in r]):.4f}")
        out.print(t)
        for sub in st["subproblems"]:
            t = Table(title=f"{st['model']}: 20-variable sub-problems ({sub['constraint']}, "
                            f"budget {sub['budget']}), ExactSolver as the certificate")
            for c in ("solver", "success", "mean gap", "time (s)", "TTS99 (s)"):
                t.add_column(c, justify="left" if c == "solver" else "right")
            for s in sub["summary"]:
                tts = "inf" if s["tts99_s"] is None else f"{s['tts99_s']:.4f}"
                t.add_row(s["solver"], f"{s['success_rate']:.2f}", f"{s['mean_gap']:.3g}",
                          f"{s['time_s']:.4f}", tts)
            out.print(t)


def markdown(result: dict) -> str:
    """The docs' tables from a result JSON."""
    lines = []
    for acc in result["accuracy"]:
        lines += [f"**{acc['model']}**, test accuracy (%), dense {100 * acc['dense_accuracy']:.2f}"
                  f" (fine-tuning: one epoch on {acc.get('finetune_images', '?')} images)", "",
                  "| method | budget | size | no FT | 1 epoch FT | bits/pruned per layer |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in acc["rows"]:
            plan = " ".join(f"{b}/{p}" for b, p, *_ in r.get("plan", [])) or "-"
            ft = f"{100 * r['accuracy_ft1']:.2f}" if "accuracy_ft1" in r else "-"
            lines.append(f"| {r['method']} | {r['budget']:.4f} | {r['size_ratio']:.4f} | "
                         f"{100 * r['accuracy']:.2f} | {ft} | {plan} |")
        lines.append("")
    for st in result["solvers"]:
        dense = st.get("dense_epochs", 10)
        trained = f" ({dense}-epoch dense model)" if dense != 10 else ""
        lines += [f"**{st['model']}**{trained}, formulated QUBOs (mean over seeds; gap to the best "
                  "any solver found)", "",
                  "| budget | form | vars | couplings | solver | energy gap | time (s) | "
                  "objective | size |", "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
        for inst in st["instances"]:
            for name in SOLVERS:
                r = [x for x in inst["runs"] if x["solver"] == name]
                lines.append(
                    f"| {inst['budget']:.4f} | {inst['constraint']} | {inst['variables']} | "
                    f"{inst['interactions']} | {name} | {np.mean([x['gap'] for x in r]):.3g} | "
                    f"{np.mean([x['time_s'] for x in r]):.2f} | "
                    f"{np.mean([x['objective_value'] for x in r]):.4g} | "
                    f"{np.mean([x['size_ratio'] for x in r]):.4f} |")
        lines.append("")
        for sub in st["subproblems"]:
            n = len({x["problem"] for x in sub["runs"]})
            lines += [f"**{st['model']}**, {n} random 20-variable sub-problems of the "
                      f"{sub['constraint']} QUBO at budget {sub['budget']} (ExactSolver "
                      "certifies the optimum)", "",
                      "| solver | success rate | mean gap | mean time (s) | TTS99 (s) |",
                      "|---|---:|---:|---:|---:|"]
            for x in sub["summary"]:
                tts = "∞" if x["tts99_s"] is None else f"{x['tts99_s']:.4f}"
                lines.append(f"| {x['solver']} | {x['success_rate']:.2f} | {x['mean_gap']:.3g} "
                             f"| {x['time_s']:.4f} | {tts} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer budgets, seeds, sub-problems")
    ap.add_argument("--models", default="cnn,resnet20")
    ap.add_argument("--finetune-resnet", action="store_true",
                    help="also fine-tune ResNet-20 for one epoch (slow on 2 cores)")
    ap.add_argument("--relative-damp", type=float, default=None,
                    help="fisher damp to use instead of choosing it on validation (with --beta)")
    ap.add_argument("--beta", type=float, default=None,
                    help="magnitude beta to use instead of choosing it on validation")
    ap.add_argument("--dense-epochs", type=int, default=10,
                    help="epochs of the cached dense models (bench/common.py's dense_checkpoint)")
    ap.add_argument("--solvers-only", action="store_true",
                    help="only the solver study (no accuracy study, no validation choice: the "
                         "library's damp and beta unless --relative-damp/--beta are given)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None,
                    help="print the markdown tables of this result JSON and exit")
    args = ap.parse_args()
    if args.table is not None:
        import json

        print(markdown(json.loads(args.table.read_text())))
        return
    out = args.out or Path(f"bench/results/qubo{'_quick' if args.quick else ''}.json")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    quick = args.quick
    seeds = [0, 1] if quick else [0, 1, 2]
    sub_seeds = [0, 1, 2] if quick else [0, 1, 2, 3, 4]
    sub_count = 4 if quick else 10
    solver_budgets = [0.1] if quick else [0.0625, 0.1, 0.125]
    grid = [0.01, 1.0, 100.0] if quick else [0.01, 0.1, 1.0, 10.0, 100.0]
    result = {"command": " ".join(sys.argv), "quick": quick, "machine": machine_info(),
              "solvers": [], "accuracy": []}
    chosen = None
    if args.solvers_only or (args.relative_damp is not None and args.beta is not None):
        chosen = {"relative_damp": QUBO_RELATIVE_DAMP if args.relative_damp is None
                  else args.relative_damp,
                  "beta": MAGNITUDE_BETA if args.beta is None else args.beta}
        result["validation"] = {"given": chosen}
    result["dense_epochs"] = args.dense_epochs
    for name in args.models.split(","):
        model, info = dense_checkpoint(name, epochs=args.dense_epochs)
        splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
        x, y = splits.train.tensors[:2]
        fit = TensorDataset(x[:-VAL], y[:-VAL])
        val = TensorDataset(x[-VAL:], y[-VAL:])
        big = name == "resnet20"
        num_grads = 256 if big else 500
        calib = pruning_batches(fit, num_grads, seed=0)
        effort = Effort(reads=16, sweeps=300) if big else Effort(reads=32, sweeps=1000)
        log(f"{name}: fisher statistics from {num_grads} gradients")
        t0 = time.perf_counter()
        fisher = qubo_costs(model, calib, "fisher", num_grads=num_grads, seed=0)
        grad_time = time.perf_counter() - t0
        if chosen is None:
            chosen = choose_on_validation(model, fisher, calib, val, effort, grid)
            result["validation"] = {"model": name, "budget": 0.1, **chosen}
        fisher = fisher.with_relative_damp(chosen["relative_damp"])
        magnitude = qubo_costs(model, None, "magnitude", beta=chosen["beta"])
        if args.solvers_only:
            budgets, ft = [], []
        elif big:
            budgets = [0.09375, 0.1] if not quick else [0.1]
            ft = [0.1] if args.finetune_resnet else []
        else:
            budgets = [0.1] if quick else [0.0625, 0.09375, 0.1, 0.125]
            ft = [0.1]
        # --quick fine-tunes two methods on 10,000 images; the full run all four on 55,000.
        ft_data = TensorDataset(x[:10_000], y[:10_000]) if quick else fit
        ft_methods = ("uniform", "fisher-QUBO") if quick else (
            "uniform", "magnitude-QUBO", "fisher-QUBO", "fisher-QUBO + OBQ")
        if not args.solvers_only:
            acc = accuracy_study(name, model, splits, ft_data, calib, fisher, magnitude,
                                 budgets, ft, effort, 0, ft_methods)
            acc["finetune_images"] = len(ft_data)
            acc["gradient_time_s"] = grad_time
            result["accuracy"].append(acc)
        sub_effort = Effort(reads=16, sweeps=200, tabu_ms=5)
        study = solver_study(
            name, fisher, solver_budgets, effort, seeds, sub_count, sub_seeds, sub_effort, 0)
        study.update(dense_epochs=args.dense_epochs, gradient_time_s=grad_time)
        result["solvers"].append(study)
        result["total_seconds"] = time.perf_counter() - t_start
        atomic_save_json(result, out)
        log(f"{name} done; {result['total_seconds']:.0f} s so far")
    result["machine_end"] = machine_info()
    atomic_save_json(result, out)
    print_tables(result)
    Console().print(f"wrote {out}; {result['total_seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
