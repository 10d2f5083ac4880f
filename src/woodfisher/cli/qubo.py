"""``qubo``: joint filter pruning and per-layer bit widths as a QUBO, solved by annealing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from woodfisher.cli.common import (
    DataDir,
    JsonOut,
    Quiet,
    Seed,
    _checkpoint_and_data,
    _stderr_log,
    _stdout,
    app,
    user_errors,
)

# Names only: dimod is imported when the command runs (the `qubo` extra).
_SOLVERS = "exact, sa, tabu, steepest, ga, rl"


def _parse_bits(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"--bits must be two integers 'LOWEST,HIGHEST' in 1..16, got {text!r}"
        ) from None
    return lo, hi


def _layer_table(report: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("layer", "filters", "pruned", "bits", "size (bits)"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in report["layers"]:
        table.add_row(row["name"], str(row["filters"]), str(row["pruned_filters"]),
                      str(row["bits"]), str(row["size_bits"]))
    return table


def _compare(costs: Any, budget: float, solvers: list[str], constraint: str, seed: int,
             effort: Any, min_keep: float, log: Any) -> dict[str, Any]:
    from woodfisher.qubo import EXACT_MAX_VARIABLES, formulate, lagrange_search, solve
    from woodfisher.qubo.solve import best_decision, check_solver

    for name in solvers:
        check_solver(name)
    if constraint == "lagrange":
        log("searching gamma with sa ...")
        problem, _, _, _ = lagrange_search(costs, budget, "sa", seed=seed, effort=effort,
                                           min_keep=min_keep)
    else:
        problem = formulate(costs, budget, min_keep=min_keep)
    n = problem.bqm.num_variables
    if "exact" in solvers and n > EXACT_MAX_VARIABLES:
        raise ValueError(
            f"solver 'exact' takes at most {EXACT_MAX_VARIABLES} variables; this problem has "
            f"{n}: drop exact from --solvers"
        )
    rows = []
    for name in solvers:
        log(f"solving with {name} ...")
        run = solve(problem.bqm, name, seed=seed, effort=effort)
        decision, pick = best_decision(problem, run.sampleset)
        rows.append({
            "solver": name, "energy": run.energy, "time_s": run.time_s,
            "objective_value": problem.objective_value(decision),
            "size_ratio": problem.size_ratio(decision), "repaired": pick["repaired"],
            "feasible_samples": pick["feasible_samples"],
        })
    best = min(r["energy"] for r in rows)
    for r in rows:
        r["gap"] = r["energy"] - best
    return {"variables": n, "interactions": problem.bqm.num_interactions,
            "gamma": problem.gamma, "penalty": problem.penalty, "solvers": rows}


@app.command()
@user_errors
def qubo(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to compress.")],
    budget: Annotated[
        float, typer.Option(help="Stored bits of the kept weights / their fp32 bits, in (0, 1).")
    ] = 0.1,
    objective: Annotated[
        str, typer.Option(help="fisher (ours: ½E[δᵀFδ]) or magnitude (the paper's).")
    ] = "fisher",
    solver: Annotated[str, typer.Option(help=f"Solver: {_SOLVERS}.")] = "sa",
    solvers: Annotated[
        str | None,
        typer.Option(help="Compare these comma-separated solvers on one QUBO instead (no model "
                          "is written)."),
    ] = None,
    constraint: Annotated[
        str, typer.Option(help="lagrange (the paper's −γ·size, γ searched) or penalty (exact).")
    ] = "lagrange",
    quantizer: Annotated[str, typer.Option(help="rtn (round to nearest) or obq.")] = "rtn",
    bits: Annotated[str, typer.Option(help="Lowest and highest bit width, 'LO,HI'.")] = "2,8",
    min_keep: Annotated[
        float, typer.Option(help="Fraction of each layer's filters never pruned.")
    ] = 0.25,
    beta: Annotated[float, typer.Option(help="Magnitude objective: weight of L_q.")] = 0.01,
    num_grads: Annotated[int, typer.Option(help="Gradients for the Fisher.")] = 500,
    reads: Annotated[int, typer.Option(help="Solver reads (GA/RL: population).")] = 64,
    sweeps: Annotated[
        int, typer.Option(help="SA sweeps per read (GA/RL: reads×sweeps evaluations).")
    ] = 1000,
    tabu_ms: Annotated[int, typer.Option(help="Tabu time per read (ms).")] = 20,
    fill_budget: Annotated[bool, typer.Option(help="Spend budget the solution leaves.")] = True,
    silence: Annotated[
        bool | None,
        typer.Option("--silence/--no-silence",
                     help="Mask pruned channels' bias/BatchNorm too, so `shrink` can remove them "
                          "(default: on)."),
    ] = None,
    layers: Annotated[list[str] | None, typer.Option(help="Module name patterns.")] = None,
    skip: Annotated[list[str] | None, typer.Option(help="Module name patterns to skip.")] = None,
    no_prune: Annotated[
        list[str] | None, typer.Option(help="Layers never pruned (default: the last).")
    ] = None,
    seed: Seed = 0,
    data_dir: DataDir = None,
    out: Annotated[
        Path | None, typer.Option(help="Compressed checkpoint to write (and OUT.json).")
    ] = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Prune filters and pick per-layer bit widths of CHECKPOINT by solving a QUBO."""
    import copy

    from woodfisher.checkpoint import atomic_save_json, check_writable, save_checkpoint
    from woodfisher.compare import pruning_batches
    from woodfisher.train import evaluate

    try:
        from woodfisher.qubo import Effort, compress, qubo_costs
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError(
            f"woodfisher qubo needs the 'qubo' extra ({e}); pip install 'woodfisher[qubo]'"
        ) from None
    log = _stderr_log(quiet)
    bit_range = _parse_bits(bits)
    effort = Effort(reads=reads, sweeps=sweeps, tabu_ms=tabu_ms)
    if out is not None:
        check_writable(out)
        check_writable(out.with_suffix(".json"))
    model, info, splits = _checkpoint_and_data(checkpoint, None, data_dir)
    batches = pruning_batches(splits.train, num_grads, seed)
    options = dict(layers=layers or None, skip=skip or None, no_prune=no_prune or None)
    if solvers is not None:
        names = [s.strip() for s in solvers.split(",") if s.strip()]
        costs = qubo_costs(model, batches, objective, bits=bit_range, beta=beta,
                           num_grads=num_grads, seed=seed, progress=not quiet, **options)
        report = _compare(costs, budget, names, constraint, seed, effort, min_keep, log)
        report.update(checkpoint=str(checkpoint), budget=budget, objective=objective,
                      constraint=constraint, seed=seed)
        if out is not None:
            atomic_save_json(report, out.with_suffix(".json"))
        if json_out:
            typer.echo(json.dumps(report))
            return
        table = Table(title=f"{objective} QUBO, budget {budget:g}: {report['variables']} "
                            f"variables, {report['interactions']} couplings")
        for col in ("solver", "energy", "gap", "time (s)", "objective", "size", "repaired"):
            table.add_column(col, justify="left" if col == "solver" else "right")
        for r in report["solvers"]:
            table.add_row(r["solver"], f"{r['energy']:.6g}", f"{r['gap']:.3g}",
                          f"{r['time_s']:.2f}", f"{r['objective_value']:.4g}",
                          f"{r['size_ratio']:.4f}", str(r["repaired"]))
        _stdout().print(table)
        return
    before = evaluate(model, splits.test)
    compressed = copy.deepcopy(model)
    log(f"formulating ({objective}) and solving ({solver}) ...")
    result = compress(
        compressed, batches, budget=budget, objective=objective, solver=solver, seed=seed,
        constraint=constraint, quantizer=quantizer, fill_budget=fill_budget, silence=silence,
        bits=bit_range,
        min_keep=min_keep, beta=beta, num_grads=num_grads, effort=effort,
        progress=not quiet, **options,
    )
    after = evaluate(compressed, splits.test)
    report = {"checkpoint": str(checkpoint), "model": info["model"]["name"],
              "dataset": splits.name, "before": before, "after": after, **result}
    if out is not None:
        meta = {**info["meta"], "qubo": result, "test_accuracy": after["accuracy"],
                "test_loss": after["loss"]}
        save_checkpoint(out, compressed, info["model"], info["dataset"], meta)
        atomic_save_json(report, out.with_suffix(".json"))
        report["out"] = str(out)
    if json_out:
        typer.echo(json.dumps(report))
        return
    console = _stdout()
    console.print(_layer_table(result, f"{objective} QUBO ({result['solver']}), budget "
                                       f"{budget:g}"))
    console.print(
        f"size {result['size_ratio']:.4f} of fp32 ({result['storage_ratio']:.4f} with scales), "
        f"accuracy {before['accuracy']:.2%} -> {after['accuracy']:.2%}, energy "
        f"{result['energy']:.6g}, solver {result['solver_time_s']:.2f} s"
    )
    if out is not None:
        console.print(f"wrote {out} and {out.with_suffix('.json')}")
