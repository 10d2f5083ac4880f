"""``decompose``: a new, factorised model under a parameter or FLOP budget.

The input model is left untouched. The returned model carries its report in the attribute
``lowrank`` (plain data: per-layer ranks, weights, MACs, effective ranks, relative errors, the
layers left dense and why, the rule's own information); :func:`checkpoint_spec` turns it into a
model spec from which :func:`woodfisher.load_checkpoint` rebuilds the factorised architecture.

Example:
    >>> import torch
    >>> from woodfisher.models import build_model
    >>> net = build_model("mlpnet", input_shape=(1, 8, 8))
    >>> small = decompose(net, params=0.3, method="svd", ranks="uniform")
    >>> [(row["name"], row["rank"]) for row in small.lowrank["layers"]]
    [('fc1', 16), ('fc2', 22)]
    >>> small.lowrank["skipped"][0]["reason"][:10], round(small.lowrank["budget"]["achieved"], 3)
    ('classifier', 0.297)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from woodfisher.lowrank import rules
from woodfisher.lowrank.budget import BUDGETS, check_reachable, plan_layers, total_cost
from woodfisher.lowrank.layers import compose, factorise, factorised_layers
from woodfisher.lowrank.measures import effective_rank

__all__ = ["RANK_RULES", "checkpoint_spec", "decompose"]


def _rene(plans, kind, budget, ctx):
    from woodfisher.lowrank.rene import search

    opts = dict(ctx.options.get("rene") or {})
    given = opts.pop("ranks", None)
    if given is not None:  # a previous search's ranks: RENE has no budget, so reuse it
        found, info = {p.name: int(given[p.name]) for p in plans}, {"reused": True}
    else:
        if ctx.data is None:
            raise ValueError("ranks='rene' needs data= (held-out batches for the logit step)")
        found, info = search(ctx.model, plans, ctx.data, opts, ctx.seed, ctx.progress)
    raw_cost = total_cost(plans, {p.name: p.cheaper(found[p.name], kind) for p in plans}, kind)
    ranks, c = rules.proportional(plans, kind, budget, {n: float(r) for n, r in found.items()})
    return ranks, {**info, "rene_ranks": found, "rene_fraction": raw_cost / total_cost(
        plans, {}, kind), "scale": c}


#: Rank rule name -> ``rule(plans, kind, budget, ctx) -> (ranks, info)``.
RANK_RULES: dict[str, Callable] = {
    "uniform": rules.uniform,
    "energy": rules.energy,
    "erank": rules.erank,
    "l1": rules.l1,
    "fisher": rules.fisher,
    "rene": _rene,
}


def _example(model: nn.Module, data: Iterable | None) -> torch.Tensor:
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        first = next(iter(model.parameters()))
        return torch.zeros(1, *shape, dtype=first.dtype, device=first.device)
    if data is not None:
        from woodfisher.data import as_batches

        x, _ = next(iter(as_batches(data, 1)))
        return x[:1]
    raise ValueError(
        "cannot tell the model's input shape: it has no input_shape attribute; pass data="
    )


def _explicit(plans, ranks: int | dict[str, int]) -> dict[str, int | None]:
    names = {p.name for p in plans}
    if isinstance(ranks, dict):
        unknown = sorted(set(ranks) - names)
        if unknown:
            raise ValueError(
                f"ranks name layers that are not factorised: {unknown}; factorised: {sorted(names)}"
            )
    out = {}
    for p in plans:
        r = ranks.get(p.name) if isinstance(ranks, dict) else ranks
        if r is not None and (isinstance(r, bool) or not isinstance(r, int)
                              or not 1 <= r <= p.max_rank):
            raise ValueError(
                f"rank of layer {p.name} must be an integer in 1..{p.max_rank} (its full "
                f"{p.method} rank), got {r!r}"
            )
        out[p.name] = r
    return out


def decompose(
    model: nn.Module,
    params: float | None = None,
    flops: float | None = None,
    method: str = "tucker2",
    ranks: str | int | dict[str, int] = "uniform",
    data: Iterable | None = None,
    *,
    weighting: str | None = None,
    layers: list[str] | str | None = None,
    skip: list[str] | str | None = None,
    min_weights: int = 512,
    keep_classifier: bool = True,
    curvature: str = "diagonal",
    num_grads: int = 256,
    block_size: int | None = 500,
    rene: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Factorise the selected layers of a copy of ``model`` to meet a budget.

    Args:
        model: The trained dense model (not changed).
        params: Fraction of the selected layers' weights to keep, in (0, 1].
        flops: Fraction of the selected layers' MACs to keep (instead of ``params``).
        method: Convolutions: ``"svd"``, ``"tucker2"`` or ``"cp"`` (Linear layers and 1×1
            convolutions use SVD).
        ranks: A rule of :data:`RANK_RULES` (``uniform``, ``energy``, ``erank``, ``l1``,
            ``fisher``, ``rene``), one rank for every layer, or layer name to rank (layers not
            named stay dense); explicit ranks take no budget.
        data: Held-out ``(x, y)`` batches: needed by ``fisher``, ``rene`` and
            ``weighting="fisher"``.
        weighting: None, or ``"fisher"`` for Fisher-weighted decompositions (weights from the
            diagonal of the Fisher, see :func:`~woodfisher.lowrank.layers.fisher_scales`).
        layers: ``fnmatch`` patterns of the layers to factorise (default every Linear/Conv2d).
        skip: Patterns of layers to keep dense.
        min_weights: Layers with fewer weights stay dense.
        keep_classifier: Keep the layer that produces the output dense (RENE's default).
        curvature: Fisher of the ``fisher`` rule: ``"diagonal"`` or ``"woodfisher"`` (blocks).
        num_grads: Gradients sampled for the Fisher.
        block_size: WoodFisher block size.
        rene: Options of the RENE search (see :data:`woodfisher.lowrank.rene.RENE_DEFAULTS`);
            ``{"ranks": report["rule"]["rene_ranks"]}`` reuses an earlier search's ranks (the
            search has no budget, so one search serves every budget).
        seed: Seed of every random choice.
        progress: Show progress bars.

    Returns:
        A new model; its ``lowrank`` attribute holds the report.

    Raises:
        ValueError: On an unknown method/rule, a budget outside (0, 1] or below the smallest
            reachable one, both or neither budget with a rule, ranks out of range, or a rule
            that needs data without it.
    """
    if (params is None) == (flops is None) and isinstance(ranks, str):
        raise ValueError(
            f"give exactly one budget, params= or flops= (fractions in (0, 1]), for ranks="
            f"{ranks!r}; got params={params!r}, flops={flops!r}"
        )
    if not isinstance(ranks, str) and (params is not None or flops is not None):
        raise ValueError("explicit ranks take no budget: drop params=/flops=, or use a rank rule")
    if isinstance(ranks, str) and ranks not in RANK_RULES:
        raise ValueError(f"unknown rank rule {ranks!r}; choose from {sorted(RANK_RULES)}")
    if weighting not in (None, "fisher"):
        raise ValueError(f"weighting must be None or 'fisher', got {weighting!r}")
    kind = "params" if params is not None or flops is None else "flops"
    fraction = params if kind == "params" else flops
    plans, skipped = plan_layers(model, method, _example(model, data), layers, skip, min_weights,
                                 keep_classifier)
    ctx = rules.RuleContext(
        model=model, data=data, weighting=weighting, curvature=curvature, num_grads=num_grads,
        block_size=block_size, seed=seed, progress=progress, options={"rene": rene},
    )
    budget = None
    if isinstance(ranks, str):
        budget = check_reachable(plans, kind, fraction)
        chosen, info = RANK_RULES[ranks](plans, kind, budget, ctx)
    else:
        chosen, info = _explicit(plans, ranks), {}
    new = copy.deepcopy(model)
    rows = []
    for plan in plans:
        rank = chosen.get(plan.name)
        erank = rules.spectral_measures(plan)["erank"]
        if rank is None:
            skipped.append({"name": plan.name, "reason": "kept dense by the rank rule"})
            continue
        rw, cw = ctx.scales(plans, plan)
        seq = factorise(plan.module, plan.method, rank, rw, cw)
        new.set_submodule(plan.name, seq)
        w = plan.module.weight.detach()
        err = float((compose(seq) - w).norm() / w.norm().clamp_min(1e-30))
        rows.append({
            "name": plan.name, "method": plan.method, "rank": rank,
            "ranks": [m.weight.shape[0] for m in list(seq)[:-1]],
            "params": plan.params(rank), "dense_params": plan.dense_params,
            "macs": plan.macs(rank), "dense_macs": plan.dense_macs,
            "erank": erank, "full_rank": plan.max_rank, "rel_error": err,
        })
    selected = {"params": sum(p.dense_params for p in plans),
                "flops": sum(p.dense_macs for p in plans)}
    achieved = {k: total_cost(plans, chosen, "params" if k == "params" else "macs")
                / selected[k] for k in BUDGETS}
    info = {k: v for k, v in info.items() if k != "spectra"}
    total = sum(p.numel() for p in model.parameters())
    new.lowrank = {
        "method": method, "ranks": ranks if isinstance(ranks, str) else "explicit",
        "weighting": weighting, "seed": seed,
        "budget": {"kind": kind, "fraction": fraction, "achieved": achieved[kind]}
        if budget is not None else None,
        "params_fraction": achieved["params"], "flops_fraction": achieved["flops"],
        "model_params_fraction": sum(p.numel() for p in new.parameters()) / max(total, 1),
        "layers": rows, "skipped": skipped, "rule": _plain(info),
    }
    return new


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def checkpoint_spec(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """A model spec that rebuilds ``model``'s factorised layers on load.

    Args:
        model: A model returned by :func:`decompose` (possibly fine-tuned, pruned, quantized).
        spec: The dense model's spec (``name``, ``input_shape``, ``num_classes``, ``kwargs``).

    Returns:
        ``spec`` plus ``modules`` (the generic descriptions
        :func:`woodfisher.checkpoint.load_checkpoint` rebuilds) and ``lowrank`` (method and
        ranks per layer).
    """
    from woodfisher.models import module_spec

    found = factorised_layers(model)
    names = [row["name"] for row in getattr(model, "lowrank", {}).get("layers", [])] or list(found)
    return {
        **spec,
        "modules": {**spec.get("modules", {}),
                    **{n: module_spec(model.get_submodule(n)) for n in names}},
        "lowrank": {n: {"method": found[n]["method"], "ranks": found[n]["ranks"]} for n in names},
    }


def describe_model(model: nn.Module) -> list[dict[str, Any]]:
    """Per factorised layer: method, ranks, weights and the effective rank of its product.

    Returns:
        One dict per factorised layer.
    """
    rows = []
    for name, summary in factorised_layers(model).items():
        w = compose(model.get_submodule(name))
        rows.append({"name": name, **summary, "erank": effective_rank(w)})
    return rows
