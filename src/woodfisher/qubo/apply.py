"""Apply a plan to the model, and the one-call :func:`compress`.

A plan prunes whole filters with masks (``torch.nn.utils.prune`` state, so the model stays an
ordinary module and the masks multiply into earlier ones) and fake-quantizes every layer to its
width on the shared grid of :mod:`woodfisher.quant`: round to nearest (``"rtn"``), or with
Optimal Brain Quantization's compensation (``"obq"``), which also compensates the pruned
filters through the engine's ``F⁻¹`` (built before pruning).

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> data = [(torch.randn(64, 8), torch.randint(0, 3, (64,)))]
    >>> report = compress(net, data, budget=0.15, objective="fisher", num_grads=64,
    ...                   effort=Effort(reads=8, sweeps=200))
    >>> report["size_ratio"] <= 0.15, [layer["filters"] for layer in report["layers"]]
    (True, [6, 3])
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import dimod
import torch
from torch import nn

from woodfisher.params import effective_weight
from woodfisher.pruning.masks import apply_masks, zero_entries
from woodfisher.quant import fake_quantize_model
from woodfisher.qubo.costs import MAGNITUDE_BETA, Costs, qubo_costs
from woodfisher.qubo.formulation import (
    CONSTRAINTS,
    Decision,
    QuboProblem,
    check_budget,
    formulate,
)
from woodfisher.qubo.solve import (
    Effort,
    best_decision,
    check_solver,
    fill,
    lagrange_search,
    solve,
)

#: How a layer is put on its grid.
QUANTIZERS = ("rtn", "obq")


def plan_modules(model: nn.Module, problem: QuboProblem) -> dict[str, nn.Module]:
    """The modules of ``model`` that the problem's layers name (``model`` may be a copy of the
    model the costs were built on).

    Returns:
        Layer name to module, in the problem's order.

    Raises:
        ValueError: If ``model`` lacks a layer or its shape differs.
    """
    named = dict(model.named_modules())
    out = {}
    for layer in problem.costs.layers:
        mod = named.get(layer.name)
        w = None if mod is None else getattr(mod, "weight", None)
        if w is None or w.shape[0] != layer.filters or w[0].numel() != layer.per_filter:
            raise ValueError(
                f"the model has no layer {layer.name!r} with {layer.filters} filters of "
                f"{layer.per_filter} weights; pass the model the problem was built for"
            )
        out[layer.name] = mod
    return out


def plan_masks(problem: QuboProblem, decision: Decision) -> dict[str, torch.Tensor]:
    """Masks that zero the pruned filters (one per prunable layer).

    Returns:
        Layer name to a bool mask of the weight's shape (False = pruned).
    """
    masks = {}
    for name in problem.free:
        w = effective_weight(problem.costs.modules[name])
        mask = torch.ones_like(w, dtype=torch.bool)
        idx = list(decision.pruned.get(name, ()))
        if idx:
            mask[idx] = False
        masks[name] = mask
    return masks


def silence_channels(
    model: nn.Module, channels: Mapping[str, Sequence[int]], example_inputs: object
) -> dict[str, str | None]:
    """Make pruned filters' channels carry exact zeros: mask their bias and BatchNorm entries.

    Zeroed weights alone leave a BatchNorm'd channel at the constant ``β − γμ/σ``; masking the
    producer's bias and the BatchNorm scale and shift of the channel (``torch.nn.utils.prune``
    state, as ``pattern="channels"`` pruning does) makes it exactly 0, so that
    :func:`woodfisher.shrink.shrink` can remove it. Channels whose group is not removable (a
    residual add ties them to other layers) are left as they are.

    Args:
        model: The model (changed in place).
        channels: Layer name to the output channels to silence.
        example_inputs: A batch the model accepts (traced once with Torch-Pruning).

    Returns:
        Layer name to None (silenced) or why it was left alone.

    Raises:
        ValueError: If torch-pruning is missing or the model cannot be traced.
    """

    from woodfisher.pruning.channels import trace_channels

    todo = {n: list(c) for n, c in channels.items() if len(c)}
    if not todo:
        return {}
    _, _, deps = trace_channels(model, example_inputs)
    mods = dict(model.named_modules())
    out: dict[str, str | None] = {}
    for name, idx in todo.items():
        info = deps.get(name)
        reason = "not traced" if info is None else info.reason
        out[name] = reason
        if reason is not None and not reason.startswith("no layer reads"):
            continue
        params = [(name, "bias")] + [(bn, p) for bn in info.norms for p in ("weight", "bias")]
        for mod_name, pname in params:
            zero_entries(mods[mod_name], pname, idx)
        out[name] = None
    return out


def apply_plan(
    model: nn.Module,
    problem: QuboProblem,
    decision: Decision,
    quantizer: str = "rtn",
    fisher: object | None = None,
    example_inputs: object | None = None,
) -> dict[str, dict[str, int]]:
    """Prune and quantize ``model`` in place as ``decision`` says.

    Args:
        model: The model the problem was built for, or a copy of it.
        problem: The problem.
        decision: The plan.
        quantizer: ``"rtn"`` or ``"obq"``.
        fisher: For ``"obq"``: a :class:`woodfisher.FisherInverse` of ``model``'s weights,
            built before this call.
        example_inputs: A batch of inputs: when given, pruned channels are also silenced
            (:func:`silence_channels`), so that :func:`woodfisher.shrink.shrink` can remove
            them; None leaves biases and BatchNorm alone.

    Returns:
        Per layer: ``bits``, ``storage_bits`` (weights and per-channel scales) and, for layers
        with pruned filters when silencing, ``silenced`` (None, or why not).

    Raises:
        ValueError: On an unknown quantizer or ``"obq"`` without ``fisher``.
    """
    from woodfisher.quant import obq_weights, storage_bits

    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}; choose from {list(QUANTIZERS)}")
    if quantizer == "obq" and fisher is None:
        raise ValueError("quantizer='obq' needs fisher=fisher_inverse(model, data, ...)")
    modules = plan_modules(model, problem)
    masks = plan_masks(problem, decision)
    if quantizer == "rtn":
        apply_masks(model, modules, masks)
        report = fake_quantize_model(modules, decision.bits)
    else:
        new = obq_weights(fisher, decision.bits, masks)
        apply_masks(model, modules, masks, new_weights=new)
        report = {
            name: {"bits": int(b), "storage_bits": storage_bits(new[name], b)}
            for name, b in decision.bits.items()
        }
    if example_inputs is not None:
        for name, why in silence_channels(model, decision.pruned, example_inputs).items():
            report[name]["silenced"] = why
    return report


def layer_report(problem: QuboProblem, decision: Decision) -> list[dict[str, object]]:
    """The per-layer rows of the report.

    Returns:
        One dict per layer: ``name``, ``bits``, ``pruned_filters``, ``filters``,
        ``pruned``, ``weights``, ``size_bits``.
    """
    rows = []
    for layer in problem.costs.layers:
        pruned = list(decision.pruned.get(layer.name, ()))
        kept = layer.filters - len(pruned)
        rows.append({
            "name": layer.name,
            "bits": int(decision.bits[layer.name]),
            "pruned_filters": len(pruned),
            "filters": layer.filters,
            "pruned": pruned,
            "weights": layer.weights,
            "size_bits": kept * layer.per_filter * int(decision.bits[layer.name]),
        })
    return rows


def compress(
    model: nn.Module,
    data: Iterable | None,
    budget: float = 0.1,
    objective: str = "fisher",
    solver: str | dimod.Sampler = "sa",
    seed: int = 0,
    *,
    constraint: str = "lagrange",
    quantizer: str = "rtn",
    fill_budget: bool = True,
    silence: bool | None = None,
    bits: Sequence[int] = (2, 8),
    min_keep: float = 0.25,
    beta: float = MAGNITUDE_BETA,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    no_prune: Sequence[str] | str | None = None,
    num_grads: int | None = None,
    relative_damp: float | None = None,
    block_size: int | None = 128,
    effort: Effort | None = None,
    costs: Costs | None = None,
    progress: bool = False,
) -> dict[str, object]:
    """Prune filters and choose per-layer bit widths by solving a QUBO; change ``model`` in place.

    Args:
        model: The network.
        data: Batches of ``(inputs, targets)`` for the Fisher (``objective="fisher"`` or
            ``quantizer="obq"``); may be None otherwise.
        budget: Stored bits of the kept weights over the fp32 bits of all selected weights.
        objective: ``"fisher"`` (ours) or ``"magnitude"`` (the paper's heuristic).
        solver: A name from :data:`woodfisher.qubo.SOLVERS` or a ``dimod.Sampler``.
        seed: Seed of the gradient pass and the solver.
        constraint: ``"lagrange"`` (the paper's ``−γ·size``, ``γ`` searched) or ``"penalty"``
            (exact slack penalty).
        quantizer: ``"rtn"`` (round to nearest) or ``"obq"`` (OBS-compensated).
        fill_budget: Spend the budget the solution leaves with :func:`woodfisher.qubo.fill`.
        silence: Also mask pruned channels' bias and BatchNorm entries so that
            :func:`woodfisher.shrink.shrink` can remove them (needs torch-pruning and a batch
            of ``data`` to trace); default: when ``data`` is given.
        bits: Lowest and highest width a layer may get.
        min_keep: Fraction of each prunable layer's filters never pruned.
        beta: Weight of the magnitude objective's quantization term.
        layers: Module name patterns to compress (default every Linear/Conv).
        skip: Module name patterns to leave alone.
        no_prune: Layers quantized but never pruned (default the last one).
        num_grads: Gradients for the Fisher (default 500).
        relative_damp: Damp relative to the Fisher's mean diagonal (default 1e-2).
        block_size: Block size of ``F⁻¹`` for ``"obq"`` (whose damp is the engine's default,
            as for pruning).
        effort: Solver budget (default :class:`~woodfisher.qubo.solve.Effort`'s).
        costs: Statistics already built by :func:`~woodfisher.qubo.costs.qubo_costs` for this
            model or an identical copy (then ``objective``, ``bits``, ``beta``, ``layers``,
            ``skip``, ``no_prune``, ``num_grads`` and ``relative_damp`` are theirs).
        progress: Show progress bars.

    Returns:
        A JSON-able report: ``size_ratio``, ``layers`` (per layer ``name``, ``bits``,
        ``pruned_filters``, ``filters``, ...), ``energy``, ``solver``, ``solver_time_s``, and
        ``storage_ratio`` (with the 32-bit scale of every kept channel), ``objective_value``,
        ``feasible_samples``, ``repaired``, ``variables``, ``penalty``, ``gamma``, ``times``,
        ``options``.

    Raises:
        ValueError: On bad options (checked before the model changes).
    """
    from woodfisher.curvature import fisher_inverse

    check_solver(solver)
    check_budget(budget)
    if not 0 <= min_keep <= 1:
        raise ValueError(f"min_keep must be a fraction in [0, 1], got {min_keep!r}")
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; choose from {list(CONSTRAINTS)}")
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}; choose from {list(QUANTIZERS)}")
    if quantizer == "obq" and data is None:
        raise ValueError("quantizer='obq' needs data: batches of (inputs, targets)")
    if silence and data is None:
        raise ValueError("silence=True needs data: a batch of inputs to trace the channels")
    silence = data is not None if silence is None else silence
    effort = effort or Effort()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if costs is None:
        costs = qubo_costs(
            model, data, objective, layers=layers, skip=skip, no_prune=no_prune, bits=bits,
            beta=beta, num_grads=num_grads, relative_damp=relative_damp, seed=seed,
            progress=progress,
        )
    objective = costs.objective
    times["costs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    trace = None
    if constraint == "penalty":
        problem = formulate(costs, budget, min_keep=min_keep)
        times["formulate"] = time.perf_counter() - t0
        run = solve(problem.bqm, solver, seed=seed, effort=effort)
        decision, pick = best_decision(problem, run.sampleset)
        solver_time = run.time_s
    else:
        problem, run, decision, trace = lagrange_search(
            costs, budget, solver, seed=seed, effort=effort, min_keep=min_keep
        )
        _, pick = best_decision(problem, run.sampleset)
        pick = {"feasible_samples": pick["feasible_samples"], "repaired": False,
                "energy": problem.energy(decision)}
        solver_time = sum(t["time_s"] for t in trace)
    solved = decision
    if fill_budget:
        decision = fill(problem, decision)
    times["solve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fisher = None
    if quantizer == "obq":
        fisher = fisher_inverse(model, data, params=plan_modules(model, problem),
                                num_grads=num_grads,
                                block_size=block_size, seed=seed)  # the engine's damp
    example = None
    if silence and any(decision.pruned.values()):
        from woodfisher.gradients import iter_batches

        example = next(iter_batches(data))[0][:2]
    stored = apply_plan(model, problem, decision, quantizer, fisher, example)
    times["apply"] = time.perf_counter() - t0
    fp32 = problem.fp32_bits
    storage = sum(s["storage_bits"] for s in stored.values())
    return {
        "size_ratio": problem.size_ratio(decision),
        "layers": [
            {**row, **({"silenced": stored[row["name"]]["silenced"]}
                       if "silenced" in stored[row["name"]] else {})}
            for row in layer_report(problem, decision)
        ],
        "energy": pick["energy"],
        "solver": run.solver,
        "solver_time_s": solver_time,
        "storage_ratio": storage / fp32,
        "objective_value": problem.objective_value(decision),
        "solution": {"objective_value": problem.objective_value(solved),
                     "size_ratio": problem.size_ratio(solved)},
        "filled": decision != solved,
        "feasible_samples": pick["feasible_samples"],
        "repaired": pick["repaired"],
        "variables": problem.bqm.num_variables,
        "interactions": problem.bqm.num_interactions,
        "penalty": problem.penalty,
        "gamma": problem.gamma,
        "gamma_trace": trace,
        "fp32_bits": fp32,
        "size_bits": problem.size_bits(decision),
        "times": times,
        "options": {
            "budget": budget, "objective": objective, "solver": run.solver, "seed": seed,
            "constraint": constraint, "quantizer": quantizer, "bits": list(costs.bits),
            "fill_budget": fill_budget, "silence": silence,
            "min_keep": min_keep, "size_unit": problem.size_unit,
            "effort": {"reads": effort.reads, "sweeps": effort.sweeps,
                       "tabu_ms": effort.tabu_ms},
            **{k: v for k, v in costs.options.items() if k != "objective"},
        },
    }
