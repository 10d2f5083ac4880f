"""RENE's rank search (Aghababaei-Harandi & Amini, arXiv 2409.03555, §4.1–4.3, Algorithm 1).

Per selected layer ``i`` there is a set of candidate ranks ``R_i``, one factorised branch per
candidate (fitted from the pre-trained weight at that rank, each with its own factors) and logits
``α_i`` (zeros at the start). With ``p_i = softmax(α_i)`` the layer runs with the mixed weight
``W_mix = Σ_r p_ir Ŵ_ir`` (equal to mixing the branch outputs, the layer being linear in its
weight); every other weight of the network is frozen.

* rank loss ``L_r = γ · Σ_i (Σ_r p_ir · r / max R_i)^β`` with ``γ = 0.4``, ``β = 0.8``;
* weight step (data-free): ``[Σ_i ‖W_i − W_mix,i‖²] · L_r`` updates the branch factors only;
* logit step: ``L_val · L_r`` updates the logits only, ``L_val`` the cross-entropy of the mixed
  network on a held-out batch;
* schedule: ``warmup`` weight-only steps, then ``iters`` alternating (weight, logit) steps; SGD
  with Nesterov momentum 0.9, learning rate 1e-3 for both; gradients clipped to norm 5;
* coarse-to-fine: ``r̄_i = argmax p_i``, then the candidates ``[r̄_i − s/2, r̄_i + s/2]`` with
  step ``s // factor``, branches and logits re-initialised, while the step stays ≥ 1.

Where the paper is silent or fixed to CIFAR/ImageNet widths we chose (see docs/lowrank.md): the
first grid is relative, ``steps`` candidates ``s, 2s, …`` up to the layer's largest useful rank
with ``s = ceil(useful / steps)`` (the paper's ``{10, 20, …, 100}``, ``s = 10``, ``factor = 10``
on CIFAR); branches start from the decomposition at their rank (HOOI with 5 sweeps for
Tucker-2, 30 CP-ALS iterations for CP, as RENE's code); the held-out batches are whatever
``data`` holds. RENE has no budget of its own: :func:`search` returns its ranks and
:func:`woodfisher.lowrank.decompose` scales them by one factor to meet the budget.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from woodfisher.lowrank.budget import LayerPlan
from woodfisher.lowrank.layers import compose, factorise

__all__ = ["RENE_DEFAULTS", "rank_loss", "search"]

#: The paper's settings (γ, β, learning rate, 20 warm-up and 100 alternating iterations, step
#: division factor 10) and ours (10 first candidates, held-out batch size, fit iterations).
RENE_DEFAULTS: dict[str, Any] = {
    "gamma": 0.4,
    "beta": 0.8,
    "lr": 1e-3,
    "warmup": 20,
    "iters": 100,
    "steps": 10,
    "factor": 10,
    "batch_size": 128,
    "clip": 5.0,
    "tucker_iters": 5,
    "cp_iters": 30,
}


def rank_loss(
    probs: Sequence[torch.Tensor], cands: Sequence[Sequence[int]], gamma: float, beta: float
) -> torch.Tensor:
    """``γ · Σ_i (Σ_r p_ir · r / max R_i)^β``.

    Args:
        probs: Per layer, the softmax over its candidates.
        cands: Per layer, the candidate ranks.
        gamma: Scale γ.
        beta: Exponent β.

    Returns:
        A 0-d tensor.

    Example:
        >>> float(rank_loss([torch.tensor([0.5, 0.5])], [[5, 10]], gamma=1.0, beta=1.0))
        0.75
    """
    total = probs[0].new_zeros(())
    for p, r in zip(probs, cands, strict=True):
        rs = torch.tensor(r, dtype=p.dtype, device=p.device)
        total = total + ((p * rs).sum() / max(r)) ** beta
    return gamma * total


def _first_grid(plan: LayerPlan, steps: int) -> tuple[list[int], int]:
    step = max(1, math.ceil(plan.useful / steps))
    grid = list(range(step, plan.useful + 1, step))
    return (grid or [plan.useful]), step


def _refine(center: int, step: int, factor: int, top: int) -> tuple[list[int], int]:
    new = step // factor
    if new < 1:
        return [center], 0
    lo, hi = max(1, center - step // 2), min(top, center + step // 2)
    grid = sorted(set(range(lo, hi + 1, new)) | {center})
    return grid, new


def _held_out(data: Iterable, batch_size: int, count: int) -> list[tuple[torch.Tensor, ...]]:
    from woodfisher.data import as_batches

    batches = list(itertools.islice(as_batches(data, batch_size), count))
    if not batches:
        raise ValueError("RENE's logit step needs held-out data: data= gave no batch")
    return batches


def search(
    model: nn.Module,
    plans: Sequence[LayerPlan],
    data: Iterable,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Run RENE's search and return the rank it selects for every planned layer.

    Args:
        model: The pre-trained model (not changed).
        plans: The layers (from :func:`woodfisher.lowrank.budget.plan_layers`).
        data: Held-out ``(x, y)`` batches (or a Dataset) for the logit step.
        options: Overrides of :data:`RENE_DEFAULTS`.
        seed: Seed of the search.
        progress: Show a progress bar.

    Returns:
        ``(ranks, info)``: layer name to rank, and per-round grids, choices and losses.

    Raises:
        ValueError: On unknown options or missing data.
    """
    from woodfisher.pruning import bake

    opts = {**RENE_DEFAULTS, **(options or {})}
    unknown = set(opts) - set(RENE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown RENE options {sorted(unknown)}; known: {sorted(RENE_DEFAULTS)}")
    torch.manual_seed(seed)
    frozen = bake(_copy(model)).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    batches = _held_out(data, opts["batch_size"], opts["iters"])
    feed = itertools.cycle(batches)
    targets = {p.name: frozen.get_submodule(p.name).weight.detach() for p in plans}
    grids, steps = {}, {}
    for p in plans:
        grids[p.name], steps[p.name] = _first_grid(p, opts["steps"])
    rounds = []
    chosen: dict[str, int] = {}
    bar = tqdm(desc="RENE search", file=sys.stderr, disable=not progress, leave=False)
    while True:
        picked, info = _round(frozen, plans, grids, targets, feed, opts, bar)
        chosen.update(picked)
        rounds.append(info)
        for p in plans:
            grids[p.name], steps[p.name] = _refine(
                chosen[p.name], steps[p.name], opts["factor"], p.useful
            )
        if all(len(g) == 1 for g in grids.values()):
            break
    bar.close()
    return chosen, {"options": opts, "rounds": rounds}


def _mixed(plans, branches, alphas, detach_branches: bool, detach_alpha: bool):
    """``W_mix = Σ_r p_r Ŵ_r`` of every layer."""
    out = {}
    for i, p in enumerate(plans):
        probs = torch.softmax(alphas[i].detach() if detach_alpha else alphas[i], 0)
        ws = [compose(b, detach=detach_branches) for b in branches[i]]
        out[p.name] = sum(pr * w for pr, w in zip(probs, ws, strict=True))
    return out


def _round(frozen, plans, grids, targets, feed, opts, bar) -> tuple[dict[str, int], dict]:
    """One search over the current grids: warm-up, alternating steps, argmax."""
    iters = {"tucker2": opts["tucker_iters"], "cp": opts["cp_iters"]}
    branches = nn.ModuleList(
        nn.ModuleList(factorise(p.module, p.method, r, iters=iters.get(p.method))
                      for r in grids[p.name])
        for p in plans
    )
    alphas = nn.ParameterList(nn.Parameter(torch.zeros(len(grids[p.name]))) for p in plans)
    cands = [grids[p.name] for p in plans]
    opt_w = torch.optim.SGD(branches.parameters(), lr=opts["lr"], momentum=0.9, nesterov=True)
    opt_a = torch.optim.SGD(alphas.parameters(), lr=opts["lr"], momentum=0.9, nesterov=True)

    def probs(detach: bool):
        return [torch.softmax(a.detach() if detach else a, 0) for a in alphas]

    val_losses, weight_losses = [], []
    for it in range(opts["warmup"] + opts["iters"]):
        # Weight step (data-free): reconstruct the pre-trained weights, scaled by L_r.
        scale = rank_loss(probs(True), cands, opts["gamma"], opts["beta"])
        mix = _mixed(plans, branches, alphas, detach_branches=False, detach_alpha=True)
        recon = sum((targets[p.name] - mix[p.name]).square().sum() for p in plans)
        opt_w.zero_grad(set_to_none=True)
        (recon * scale).backward()
        nn.utils.clip_grad_norm_(branches.parameters(), opts["clip"])
        opt_w.step()
        weight_losses.append(float(recon.detach()))
        bar.update()
        if it < opts["warmup"]:
            continue
        # Logit step: held-out cross-entropy of the mixed network, scaled by L_r.
        x, y = next(feed)
        mix = _mixed(plans, branches, alphas, detach_branches=True, detach_alpha=False)
        weights = {f"{name}.weight": w for name, w in mix.items()}
        val = nn.functional.cross_entropy(torch.func.functional_call(frozen, weights, (x,)), y)
        opt_a.zero_grad(set_to_none=True)
        (val * rank_loss(probs(False), cands, opts["gamma"], opts["beta"])).backward()
        nn.utils.clip_grad_norm_(alphas.parameters(), opts["clip"])
        opt_a.step()
        val_losses.append(float(val.detach()))
    final = probs(True)
    chosen = {}
    for i, p in enumerate(plans):
        # A NaN softmax would make argmax pick the smallest rank silently.
        if not torch.isfinite(final[i]).all():
            raise ValueError(f"RENE search diverged at layer {p.name}; lower options['lr']")
        chosen[p.name] = grids[p.name][int(final[i].argmax())]
    return chosen, {
        "grids": {p.name: list(grids[p.name]) for p in plans},
        "chosen": dict(chosen),
        "probs": {p.name: [round(float(v), 4) for v in final[i]] for i, p in enumerate(plans)},
        "final_val_loss": val_losses[-1] if val_losses else None,
        "final_weight_loss": weight_losses[-1],
    }


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
