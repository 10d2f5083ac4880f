"""Monte Carlo of a model stored on noisy analog cells: accuracy over seeded noise draws.

:func:`simulate` designs the code of every selected layer (:mod:`woodfisher.storage.codes`),
spends the cell budget (uniform repetition, or by importance), programs the cells once per
trial, reads them back through the channel, decodes, and evaluates the decoded model. The
model passed in is never modified; it is copied.

Expected loss increase (second order, around the stored weights): with independent,
zero-mean cell noise ``ε`` and deterministic encoding error ``b`` (clipping),
``E[½ (b+ε)ᵀ F (b+ε)] = ½ bᵀFb + ½ Σ F_ii E[ε_i²]``: the cross terms of ``F`` vanish for the
noise, so the diagonal of the Fisher is exact for the part allocation controls (the report's
``predicted_loss_increase`` uses ``b_i² F_ii`` for the small clipping term too).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from woodfisher.data import synthetic
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> ds = synthetic(n=200, input_shape=(64,), num_classes=3)
    >>> r = simulate(net, ds, strategy="sign", cells=1, trials=2)
    >>> r["cells_per_weight"], round(r["footprint_ratio"], 1)  # 1 cell + a sign bit with ECC
    (2.5, 14.4)
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from woodfisher.params import (
    Target,
    effective_weight,
    owner,
    select_modules,
    weight_mask,
    weight_param,
)
from woodfisher.storage.allocation import allocate
from woodfisher.storage.channel import Channel, make_channel
from woodfisher.storage.codes import LayerCode, Strategy, build_layer_code, describe_code
from woodfisher.storage.footprint import check_side_coding, footprint
from woodfisher.storage.program import program, read_back

__all__ = ["digital_accuracy", "fisher_diagonal", "simulate", "trial_seed"]


def trial_seed(seed: int, trial: int) -> int:
    """Seed of one trial's noise draw, derived from ``(seed, trial)`` (no overlap across seeds).

    Returns:
        A 63-bit integer.
    """
    state = np.random.SeedSequence([int(seed), int(trial)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def fisher_diagonal(
    model: nn.Module,
    data: Iterable,
    modules: Mapping[str, nn.Module] | None = None,
    num_grads: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The diagonal of the damped empirical Fisher, ``F_ii = damp + mean(g_i²)``, per layer.

    Built by the engine (:func:`woodfisher.fisher_inverse` with ``method="diagonal"``).

    Args:
        model: The network.
        data: Batches of ``(inputs, targets)`` (training data, not the evaluation data).
        modules: The layers (default every Linear/Conv).
        num_grads: Per-sample gradients.
        seed: Seed of the gradient pass.
        progress: Show progress.

    Returns:
        Module name to a tensor of the weight's shape.
    """
    from woodfisher.curvature import fisher_inverse

    op = fisher_inverse(model, data, method="diagonal", params=dict(modules) if modules else None,
                        num_grads=num_grads, seed=seed, progress=progress)
    return op.layout.split(1.0 / op.inv.diag())


def _check_inputs(cells: float, trials: int, quant_bits: int | None) -> None:
    if isinstance(trials, bool) or int(trials) != trials or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    if isinstance(cells, bool) or not isinstance(cells, (int, float)) or not math.isfinite(cells):
        raise ValueError(f"cells must be a finite number >= 1, got {cells!r}")
    if cells < 1:
        raise ValueError(f"cells must be >= 1 (analog cells per stored weight), got {cells!r}")
    if quant_bits is not None:
        from woodfisher.quant import check_bits

        check_bits(quant_bits, "quant_bits")


def _importance(strategy: Strategy, modules: Mapping[str, nn.Module],
                fisher: Mapping[str, Tensor] | None) -> dict[str, Tensor | None]:
    if strategy.allocation == "fisher":
        assert fisher is not None
        return {n: fisher[n].detach().to(torch.float64) for n in modules}
    if strategy.allocation == "magnitude":
        return {n: effective_weight(m).to(torch.float64) ** 2 for n, m in modules.items()}
    return {n: None for n in modules}


def _copies(codes: list[LayerCode], strategy: Strategy, cells: float,
            importance: dict[str, Tensor | None]) -> tuple[list[Tensor], Tensor]:
    """Copies per stored weight of each layer, and the copies of each allocation group."""
    unit = strategy.unit_cells
    if strategy.allocation is None:
        r = int(round(cells / unit))
        groups = torch.full((sum(c.target.numel() for c in codes),), r, dtype=torch.long)
        return [torch.full((c.target.numel(),), r, dtype=torch.long) for c in codes], groups
    costs, sizes, index = [], [], []
    offset = 0
    for code in codes:
        imp = importance[code.name]
        imp_kept = (imp.reshape(-1)[code.keep] if imp is not None
                    else torch.ones_like(code.var))
        cost = imp_kept * code.var
        if strategy.granularity == "weight":
            gid = torch.arange(cost.numel())
        else:
            _, gid = torch.unique(code.rows, return_inverse=True)
        ng = int(gid.max()) + 1 if gid.numel() else 0
        costs.append(torch.zeros(ng, dtype=torch.float64).index_add_(0, gid, cost))
        sizes.append(torch.zeros(ng, dtype=torch.float64).index_add_(
            0, gid, torch.full_like(cost, float(unit))))
        index.append(gid + offset)
        offset += ng
    stored = sum(c.target.numel() for c in codes)
    r_groups = allocate(torch.cat(costs), int(math.floor(cells * stored + 1e-9)),
                        torch.cat(sizes))
    return [r_groups[i] for i in index], r_groups


def digital_accuracy(model: nn.Module, data: Any, bits: int | None = None,
                     layers: Sequence[str] | str | None = None,
                     skip: Sequence[str] | str | None = None,
                     batch_size: int = 1000) -> dict[str, float]:
    """Accuracy of error-free digital storage: the model as is, or quantized to ``bits``.

    Returns:
        :func:`woodfisher.evaluate`'s dict for a copy of the model.
    """
    from woodfisher.quant import fake_quantize_model
    from woodfisher.train import evaluate

    net = _copy_model(model)
    if bits is not None:
        fake_quantize_model(select_modules(net, layers, skip), bits)
    return evaluate(net, data, batch_size=batch_size)


def _copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, also of a pruned model whose ``weight`` still carries autograd history."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for value in vars(mod).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _other_params(net: nn.Module, modules: Mapping[str, Target | nn.Module]) -> int:
    """Floats the model needs besides the coded weights (biases, BatchNorm), kept digital."""
    coded = {(id(owner(t)), _attr_of(t)) for t in modules.values()}
    count = 0
    for mod in net.modules():
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if not t.is_floating_point() or name.endswith("_mask"):
                continue
            if (id(mod), name.removesuffix("_orig")) in coded:
                continue
            count += t.numel()
    return count


def _attr_of(target: Target | nn.Module) -> str:
    return target.attr if isinstance(target, Target) else "weight"


def simulate(
    model: nn.Module,
    data: Any,
    strategy: str | Sequence[str] | Strategy = "naive",
    cells: float = 2,
    trials: int = 20,
    channel: Channel | str | None = None,
    seed: int = 0,
    fisher_data: Iterable | None = None,
    *,
    fisher: Mapping[str, Tensor] | None = None,
    quant_bits: int | None = None,
    digits: int = 2,
    granularity: str = "row",
    side_coding: str = "plain",
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    fisher_grads: int = 500,
    batch_size: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Store ``model``'s weights on noisy cells ``trials`` times; accuracy and footprint.

    Args:
        model: The network (left untouched). Pruned layers (``torch.nn.utils.prune`` masks)
            store only their kept weights; the masks are stored digitally.
        data: Evaluation data (a Dataset, DataLoader or iterable of batches).
        strategy: ``"naive"`` or tokens of :data:`woodfisher.storage.codes.TOKENS`, as a list
            or ``"sign,adaptive,fisher"``.
        cells: Analog cells per stored weight: the copies of a uniform code (an integer
            multiple of the code's cells per copy), or the average budget of an allocation.
        trials: Noise draws.
        channel: The cell (a :class:`Channel` or a spec for :func:`make_channel`); default
            :func:`woodfisher.storage.pcm_channel`. Draws come from ``seed``, not from the
            channel's own generator.
        seed: Seed of the noise draws (trial ``t`` uses :func:`trial_seed` ``(seed, t)``).
        fisher_data: Training batches for the Fisher diagonal (needed by ``fisher``; when
            given, the report also predicts the loss increase).
        fisher: A precomputed Fisher diagonal (from :func:`fisher_diagonal`) instead.
        quant_bits: Quantize weights per output channel first (:mod:`woodfisher.quant`); the
            decode snaps to the grid.
        digits: Cells of one copy of a ``split`` code.
        granularity: Allocation groups: ``"row"`` (an output channel; the side information is
            a few bits per row) or ``"weight"``.
        side_coding: Masks and allocation maps ``"plain"`` (bitmap, fixed-length) or
            ``"entropy"`` (ideal entropy coder).
        layers: Module name patterns to store (default every Linear/Conv).
        skip: Module name patterns to leave out.
        fisher_grads: Gradients for the Fisher diagonal.
        batch_size: Evaluation batch size.
        progress: Show a progress bar on stderr.

    Returns:
        A JSON-able report: ``accuracy_mean``, ``accuracy_std`` (sample std over trials),
        ``clean_accuracy`` (the stored model without noise), ``cells_per_weight`` (all cells,
        analog and digital, per weight of the coded layers, pruned included),
        ``digital_bits``, ``footprint_ratio`` (32-bit digital storage with SECDED over this),
        and per-trial results, the digital baselines, predicted and measured errors, and the
        design of every layer.

    Raises:
        ValueError: On bad strategy, cells, trials, channel, quant_bits or a missing Fisher.
    """
    from woodfisher.train import evaluate

    t_start = time.perf_counter()
    strat = Strategy.parse(strategy, digits=digits, granularity=granularity)
    _check_inputs(cells, trials, quant_bits)
    check_side_coding(side_coding)
    unit = strat.unit_cells
    if cells < unit:
        raise ValueError(
            f"cells={cells!r} is below one copy of the {strat.name!r} code ({unit} cells per "
            f"stored weight); use cells >= {unit}"
        )
    if strat.allocation is None and abs(cells / unit - round(cells / unit)) > 1e-9:
        raise ValueError(
            f"cells={cells!r} must be a multiple of {unit} for {strat.name!r} (uniform "
            "repetition); add an allocation ('fisher' or 'magnitude') to spend a fractional "
            "budget"
        )
    chan = make_channel(channel, seed)
    if strat.allocation == "fisher" and fisher is None and fisher_data is None:
        raise ValueError(
            "the 'fisher' allocation needs fisher_data (training batches) or a precomputed "
            "fisher diagonal; do not use the evaluation data"
        )
    net = _copy_model(model)
    modules = select_modules(net, layers, skip)
    original = evaluate(net, data, batch_size=batch_size)
    if quant_bits is not None:
        from woodfisher.quant import fake_quantize_model

        fake_quantize_model(modules, quant_bits)
    clean = evaluate(net, data, batch_size=batch_size) if quant_bits is not None else original
    if fisher is None and fisher_data is not None:
        fisher = fisher_diagonal(net, fisher_data, modules, num_grads=fisher_grads, seed=seed,
                                 progress=progress)
    if fisher is not None:
        missing = [n for n in modules if n not in fisher]
        if missing:
            raise ValueError(f"fisher has no entry for layer(s) {missing}; recompute it for "
                             "the same layers")
    importance = _importance(strat, modules, fisher)
    reads_ref = cells / unit

    codes: list[LayerCode] = []
    for name, mod in modules.items():
        w = effective_weight(mod)
        mask = weight_mask(mod)
        keep = (mask != 0) if mask is not None else torch.ones_like(w, dtype=torch.bool)
        codes.append(build_layer_code(name, w, keep, strat, chan, importance[name], reads_ref,
                                      quant_bits))
    copies, group_copies = _copies(codes, strat, cells, importance)

    memory = program(codes, copies)
    chan.check_targets(memory.targets)
    clean_weights = {n: weight_param(m).detach().clone() for n, m in modules.items()}

    stored = sum(c.target.numel() for c in codes)
    var_pred = torch.cat([(c.bias2 + c.var / r) for c, r in zip(codes, copies, strict=True)]) \
        if codes else torch.zeros(0)
    fisher_kept = (torch.cat([fisher[c.name].detach().reshape(-1).to(torch.float64)[c.keep]
                              for c in codes]) if fisher is not None else None)

    accs, losses, mses, flips = [], [], [], []
    bar = tqdm(range(trials), desc=f"storage {strat.name} ×{cells:g}", file=sys.stderr,
               disable=not progress, leave=False)
    with torch.no_grad():
        for t in bar:
            gen = torch.Generator().manual_seed(trial_seed(seed, t))
            sq, flipped = 0.0, 0
            for code, decoded, mod in zip(codes, read_back(memory, chan, gen), modules.values(),
                                          strict=True):
                sq += float(((decoded - code.target) ** 2).sum())
                flipped += int(((decoded * code.target) < 0).sum())
                full = clean_weights[code.name].clone().to(torch.float64).reshape(-1)
                full[code.keep] = decoded
                weight_param(mod).copy_(full.reshape(code.shape))
            res = evaluate(net, data, batch_size=batch_size)
            accs.append(res["accuracy"])
            losses.append(res["loss"])
            mses.append(sq / max(stored, 1))
            flips.append(flipped)
    for name, mod in modules.items():
        weight_param(mod).data.copy_(clean_weights[name])

    other = _other_params(net, modules)
    groups = group_copies if strat.allocation else None
    foot = footprint(codes, copies, groups, strat.unit_cells, side_coding, other)
    other_coding = "entropy" if side_coding == "plain" else "plain"
    alt = footprint(codes, copies, groups, strat.unit_cells, other_coding, other)
    acc = np.array(accs)
    clean_acc = clean["accuracy"]
    report: dict[str, Any] = {
        "strategy": strat.name,
        "tokens": list(strat.tokens),
        "cells": cells,
        "trials": trials,
        "seed": seed,
        "channel": chan.describe(),
        "quant_bits": quant_bits,
        "digits": strat.digits if strat.split else None,
        "granularity": strat.granularity if strat.allocation else None,
        "side_coding": side_coding,
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if trials > 1 else 0.0,
        "accuracy_min": float(acc.min()),
        "accuracy_max": float(acc.max()),
        "clean_accuracy": clean_acc,
        "original_accuracy": original["accuracy"],
        "within_1pt": float((acc >= clean_acc - 0.01).mean()),
        "loss_mean": float(np.mean(losses)),
        "clean_loss": clean["loss"],
        "accuracies": accs,
        **foot,
        f"footprint_{other_coding}_side": {k: alt[k] for k in (
            "digital_bits", "total_cells", "cells_per_weight", "footprint_ratio")},
        "copies": {str(int(k)): int(v) for k, v in zip(*torch.unique(
            torch.cat(copies), return_counts=True), strict=True)} if copies else {},
        "weight_mse_measured": float(np.mean(mses)),
        "weight_mse_predicted": float(var_pred.mean()) if stored else 0.0,
        "sign_flips_mean": float(np.mean(flips)),
        "loss_increase_mean": float(np.mean(losses)) - clean["loss"],
        "predicted_loss_increase": (0.5 * float((fisher_kept * var_pred).sum())
                                    if fisher_kept is not None else None),
        "layers": [describe_code(c) | {"copies_mean": float(r.double().mean())}
                   for c, r in zip(codes, copies, strict=True)],
        "time_s": time.perf_counter() - t_start,
    }
    return report
