"""The default path of WoodFisher pruning: block inverses from streamed Grams, refreshed over
the kept weights and downdated in between.

``prune()`` reaches a sparsity in several steps (``recompute``). The paper's recomputation
resamples the gradients and rebuilds every block inverse at each step. Here the gradients are
streamed into each block's Gram matrix (never held whole) and the blocks are inverted at matmul
speed. Before the steps that :func:`refresh_steps` names (by default every step, which is the
paper's recomputation) the Fisher is re-estimated at the weights reached so far, over the kept
weights only; a step that is not followed by a refresh removes its weights from the inverse by
a Schur complement (:class:`woodfisher.fisher.dense.DenseBlockInverse`), which is also where
the exact joint OBS update comes from, at ``2B²|Q|`` flops for the ``|Q|`` weights it removes.

The same code runs on one process and on ``P`` (:class:`woodfisher.distributed.Group`): each
rank owns a contiguous range of blocks, receives the gradient columns of its blocks, inverts,
scores and updates them, and the global threshold is a distributed k-th value. The masks equal
the single-process masks; every rank ends with the whole pruned model.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from woodfisher.distributed import Group, chunk_owner
from woodfisher.fisher.dense import GramAccumulator, make_units, unit_ranges
from woodfisher.params import Layout, flat_masks, flat_weights, weight_param
from woodfisher.plan import RECOMPUTE_BY, downdate_applies
from woodfisher.pruning.masks import apply_masks, compute_masks
from woodfisher.pruning.obs import obs_saliency
from woodfisher.pruning.select import _count, select_by_sparsity
from woodfisher.streaming import CHUNK_BYTES, chunk_rows, gradient_chunks, num_chunks


def _local_rows(
    group: Group,
    model: nn.Module,
    data: Iterable,
    modules: dict[str, nn.Module],
    num_grads: int,
    rows: int,
    bounds: Sequence[tuple[int, int]],
    options: Mapping,
    columns: Tensor | None = None,
) -> Iterator[Tensor]:
    """This rank's columns of every gradient chunk, in chunk order (all-to-all for P > 1).

    ``columns`` picks flat entries: each chunk is then ``G[:, columns]``, and ``bounds`` are
    the ranks' shares of those columns.
    """
    chunks = gradient_chunks(
        model, data, num_grads, rows=rows, loss_fn=options["loss_fn"],
        samples_per_grad=options["samples_per_grad"], params=modules, seed=options["seed"],
        which=lambda j: chunk_owner(j, group.world) == group.rank,
        progress=options["progress"] and group.rank == 0, columns=columns,
    )
    if not group.distributed:
        for _, _, G in chunks:
            yield G
        return
    total = num_chunks(num_grads, rows)
    lo, hi = bounds[group.rank]
    d = bounds[-1][1]
    for t in range(0, total, group.world):
        ids = [t + r for r in range(group.world)]
        sizes = [min(rows, num_grads - j * rows) if j < total else 0 for j in ids]
        if ids[group.rank] < total:
            _, _, G = next(chunks)
        else:
            G = torch.zeros(0, d, dtype=_dtype(modules), device=group.device)
        pieces = [G[:, a:b] for a, b in bounds]
        got = group.exchange(pieces, [n * (hi - lo) for n in sizes])
        for n, piece in zip(sizes, got, strict=True):
            if n:
                yield piece.reshape(n, hi - lo)


def _flat_range(units, a: int, b: int, d: int) -> tuple[int, int]:
    if b > a:
        return units[a].start, units[b - 1].stop
    start = units[a].start if a < len(units) else d
    return start, start


def _dtype(modules: dict[str, nn.Module]) -> torch.dtype:
    return weight_param(next(iter(modules.values()))).dtype


def select_sharded(
    group: Group,
    scores: Tensor,
    present: Tensor,
    lo: int,
    layout: Layout,
    sparsity: float,
    scope: str,
    overrides: Mapping[str, float] | None,
) -> Tensor:
    """:func:`~woodfisher.pruning.select.select_by_sparsity` over ranks' shards of the vector.

    Args:
        group: The ranks; shard of this rank = flat indices ``[lo, lo + len(scores))``.
        scores: This rank's scores.
        present: This rank's still-present flags.
        lo: First flat index of the shard.
        layout: The whole layout.
        sparsity: Target.
        scope: ``"global"`` or ``"layerwise"``.
        overrides: Per-layer targets.

    Returns:
        This rank's newly removed flags.
    """
    if not group.distributed:
        return select_by_sparsity(scores, present, layout, sparsity, scope, overrides)
    overrides = dict(overrides or {})
    hi = lo + scores.numel()
    remove = torch.zeros_like(present)
    rest = torch.zeros_like(present)
    for name, off, size in zip(layout.names, layout.offsets, layout.sizes, strict=True):
        a, b = max(off, lo) - lo, min(off + size, hi) - lo
        sl = slice(a, b) if a < b else slice(0, 0)
        if name in overrides or scope == "layerwise":
            s = overrides.get(name, sparsity)
            pruned = int(group.all_sum((~present[sl]).sum().reshape(1))[0])
            k = _count(s, size, pruned, f"layer {name!r}")
            remove[sl] = group.select_lowest(scores[sl], present[sl], k)
        else:
            rest[sl] = True
    counts = group.all_sum(torch.stack([rest.sum(), (rest & ~present).sum()]))
    if int(counts[0]):
        k = _count(sparsity, int(counts[0]), int(counts[1]), "the ranked layers")
        remove |= group.select_lowest(scores, rest & present, k)
    return remove


def refresh_steps(targets: Sequence[float], kept: float, below: float) -> set[int]:
    """The steps that start from a fresh Fisher estimate.

    Step ``k > 0`` re-estimates the Fisher at the weights reached so far when it starts with at
    most ``below`` of the weights the prune started with (kept ``1 − targets[k−1]`` of all
    against ``kept`` at the start). Such a refresh costs at most ``below²`` of the first
    build's Gram flops and ``below³`` of its inversion, so late refreshes are cheap. A one-time
    Fisher goes stale as the OBS updates move the weights; how much that costs depends on the
    model (docs/scale.md), hence the default of 1.

    Args:
        targets: Sparsity after each step.
        kept: Fraction of the weights present at the start.
        below: The threshold; 0 never refreshes, 1 refreshes before every step but the first.

    Returns:
        The step numbers.

    Example:
        >>> sorted(refresh_steps([0.5, 0.75, 0.875, 0.9], 1.0, 0.25))
        [2, 3]
    """
    return {
        k for k in range(1, len(targets))
        if 1.0 - targets[k - 1] <= below * kept + 1e-12
    }


def run_downdate(
    model: nn.Module,
    modules: dict[str, nn.Module],
    layout: Layout,
    data: Iterable,
    targets: Sequence[float],
    per_layer: Sequence[Mapping[str, float] | None],
    scope: str,
    update: str,
    options: Mapping,
    group: Group | None = None,
) -> dict[str, object]:
    """Prune ``modules`` through ``targets`` with one downdated Fisher; apply the result.

    Args:
        model: The model (eval mode).
        modules: Selected modules (layout order).
        layout: Their layout.
        data: Batches for the gradients.
        targets: Sparsity after each step.
        per_layer: Per step, the overridden layers' targets (or None).
        scope: ``"global"`` or ``"layerwise"``.
        update: ``"joint"``, ``"independent"`` or ``"none"``.
        options: ``prune()``'s resolved options (``num_grads``, ``samples_per_grad``,
            ``block_size``, ``damp``, ``relative_damp``, ``seed``, ``loss_fn``, ``progress``,
            optionally ``chunk_bytes``).
        group: The ranks (default: one process).

    Returns:
        The stats ``prune()`` reports (``update``, ``saliency_sum``, ``predicted``, ``by``,
        ``steps``, ``damp``, ``relative_damp``, ``times``), plus ``ranks`` (per-rank
        ``lo``/``hi``) and ``plan`` numbers.
    """
    group = group or Group.local()
    m, d = options["num_grads"], layout.d
    dtype = _dtype(modules)
    device = weight_param(next(iter(modules.values()))).device
    units = make_units(layout.sizes, options["block_size"])
    ranges = unit_ranges(units, group.world)
    bounds = [_flat_range(units, a, b, d) for a, b in ranges]
    u0, u1 = ranges[group.rank]
    lo, hi = bounds[group.rank]
    item = torch.empty((), dtype=dtype).element_size()
    rows = chunk_rows(m, d, item, options.get("chunk_bytes") or CHUNK_BYTES)
    times = {"gradients": 0.0, "inverse": 0.0, "selection": 0.0, "update": 0.0}

    def estimate(acc: GramAccumulator) -> tuple[float, float | None]:
        """Sum the gradients at the model's weights now into ``acc``; return the absolute
        and the relative damp."""
        t0 = time.perf_counter()
        # Only the entries compacted accumulators read are computed (for Linear weights that
        # is the kept fraction of the work) and exchanged: every rank's picks, in rank order,
        # which is unit order, so each rank's share is one contiguous run of the columns.
        mine = any(p is not None for p in acc.positions)
        picked = bool(group.all_sum(torch.tensor([float(mine)], device=device))[0] > 0)
        columns, shares = None, bounds
        if picked:
            local = acc.columns() + lo
            columns = group.all_gather_cat(local)
            counts = [c[0] for c in group.all_gather_ints([local.numel()])]
            ends = list(itertools.accumulate(counts))
            shares = [(e - c, e) for c, e in zip(counts, ends, strict=True)]
        with group.phase_of("gradients"):
            for part in _local_rows(group, model, data, modules, m, rows, shares, options,
                                    columns):
                if picked:
                    acc.add_columns(part)
                else:
                    acc.add(part)
        times["gradients"] += time.perf_counter() - t0
        # The damp's scale from every block's diagonal, summed in block order on every rank
        # (removed weights have zero gradients: the mean over all d, as the paper's rebuild).
        sums = group.all_gather_cat(acc.diag_sums().to(device))
        scale = float(sums.sum()) / (m * d) if d else 0.0
        scale = scale if scale > 0 and scale == scale and scale != float("inf") else 1.0
        if options["damp"] is None:
            return options["relative_damp"] * scale, options["relative_damp"]
        return float(options["damp"]), None

    w = flat_weights(modules)[lo:hi].to(dtype).clone()
    present = flat_masks(modules)[lo:hi].clone()
    w = torch.where(present, w, torch.zeros_like(w))
    kept = float(group.all_sum(present.sum().double().reshape(1))[0]) / d if d else 1.0
    refresh = refresh_steps(targets, kept, options.get("refresh", 0.0))

    def factored(k: int) -> bool:
        # Step k needs no downdate when the next step refreshes or k is the last; the estimate
        # it uses then keeps only its Cholesky factor's inverse: a third fewer flops.
        return k + 1 in refresh or k + 1 == len(targets)

    acc = GramAccumulator(units[u0:u1], dtype, device)
    damp, rel = estimate(acc)
    t0 = time.perf_counter()
    with group.phase_of("inverse"):
        inv = acc.finish(m, damp, factored(0))
    times["inverse"] = time.perf_counter() - t0
    inv.forget(present)  # weights pruned before: decoupled already; compact them away
    saliency_sum, predicted, steps = 0.0, 0.0, []
    for k, (target, overrides) in enumerate(zip(targets, per_layer, strict=True)):
        if k in refresh:
            # A fresh Fisher at the weights reached so far (the same samples), over the kept
            # rows and columns only: (kept/B)² of a first build's flops.
            apply_masks(None, modules, compute_masks(modules, group.all_gather_cat(present)),
                        layout.split(group.all_gather_cat(w)))
            acc = inv.regram()
            damp, rel = estimate(acc)
            t0 = time.perf_counter()
            with group.phase_of("inverse"):
                inv.refresh(acc, m, damp, factored(k))
            times["inverse"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with group.phase_of("selection"):
            scores = obs_saliency(w, inv.diag())
            remove = select_sharded(group, scores, present, lo, layout, target, scope, overrides)
        times["selection"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with group.phase_of("update"):
            # The last step, and one before a refresh, need the update but not the downdate.
            delta, value = inv.eliminate(
                remove, w, "independent" if update == "none" else update,
                downdate=not factored(k),
            )
            if update != "none":
                w = w + delta
            present &= ~remove
            w = torch.where(present, w, torch.zeros_like(w))
            local = torch.stack([
                scores[remove].double().sum(), torch.tensor(value, dtype=torch.float64,
                                                            device=scores.device),
                (~present).sum().double(),
            ])
            total = group.all_sum(local)
        times["update"] += time.perf_counter() - t0
        saliency_sum += float(total[0])
        predicted += float(total[1])
        steps.append(float(total[2]) / d)

    t0 = time.perf_counter()
    with group.phase_of("assemble"):
        w_full = group.all_gather_cat(w)
        keep = group.all_gather_cat(present)
        # Every rank ends with the same model; the masks multiply into any earlier ones.
        apply_masks(None, modules, compute_masks(modules, keep), layout.split(w_full))
    times["update"] += time.perf_counter() - t0
    return {
        "update": update,
        "saliency_sum": saliency_sum,
        "predicted": predicted if update == "joint" else saliency_sum,
        "by": "quadratic-model" if update == "joint" else "saliency-sum",
        "steps": steps,
        "damp": damp,
        "relative_damp": rel,
        "times": times,
        "path": "downdate",
        "ranks": [{"lo": a, "hi": b} for a, b in bounds],
        "chunk_rows": rows,
        "inverse_bytes": inv.memory_bytes(),
    }


__all__ = ["RECOMPUTE_BY", "downdate_applies", "refresh_steps", "run_downdate", "select_sharded"]
