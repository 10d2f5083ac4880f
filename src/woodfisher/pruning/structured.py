"""One pruning step for a pattern: score groups, pick them globally, update, mask.

:func:`make_plan` turns a pattern and a target into a :class:`StructuredPlan` (the groups of
:mod:`~woodfisher.pruning.patterns` and :mod:`~woodfisher.pruning.channels`, the MACs each weight
takes part in, block sizes that keep groups inside one curvature block); ``prune()`` calls its
:meth:`~StructuredPlan.step` instead of the unstructured step. Everything is computed before the
model changes, as in the unstructured path.

Selection is global by default: one threshold over all groups of all layers, on the group's
saliency divided by what it removes (its number of weights for ``target="params"``, its MACs for
``target="flops"``), so groups of different sizes compete fairly.

Channels are removed through their consumer when one layer reads them (the OBS set ``Q`` is
the consumer's input columns and the update compensates in the consumer's other columns; the
producer's row, bias and BatchNorm entries then carry nothing anyone reads and are zeroed
without changing the loss). Otherwise ``Q`` is the producer's row, compensated in its own layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from woodfisher.flops import count_flops
from woodfisher.params import Layout, flat_masks, flat_weights
from woodfisher.pruning import obs
from woodfisher.pruning.group_obs import (
    _solve,
    group_saliency,
    nm_best_subsets,
    nm_capped_selection,
    select_groups,
)
from woodfisher.pruning.masks import apply_masks, compute_masks, zero_entries
from woodfisher.pruning.patterns import (
    Pattern,
    aligned_block_sizes,
    block_groups,
    matrix_shape,
    misfit,
    nm_groups,
)

__all__ = ["TARGETS", "Family", "StructuredPlan", "make_plan"]

#: What ``sparsity`` counts: the selected weights, or the model's multiply-accumulates.
TARGETS = ("params", "flops")


@dataclass
class Family:
    """Groups of one layer (the producer, for channels), all of one size.

    Attributes:
        layer: Layer name (for layerwise selection and the report).
        obs: (G, g) flat indices of each group's OBS set ``Q`` (zeroed with ``δ_Q = −w_Q``).
        dead: (G, z) flat indices zeroed with the group that nothing reads afterwards (their
            removal costs nothing, so they are pinned, not compensated for).
        channel_params: ``(module name, parameter name)`` whose entry ``j`` goes with group ``j``
            (bias, BatchNorm scale and shift).
        compensated_in: The layer whose other weights absorb the OBS update.
        consumers: Layers reading the channels (channels only).
    """

    layer: str
    obs: Tensor
    dead: Tensor
    channel_params: list[tuple[str, str]] = field(default_factory=list)
    compensated_in: str | None = None
    consumers: list[str] = field(default_factory=list)

    def members(self) -> Tensor:
        """(G, g + z) every flat index a group zeroes."""
        return torch.cat([self.obs, self.dead], dim=1)


@dataclass
class StructuredPlan:
    """Everything a patterned prune needs besides the curvature.

    Attributes:
        pattern: The pattern.
        target: ``"params"`` or ``"flops"``.
        layout: The selected weights' layout.
        families: Group families (block, channels, unstructured with a FLOP target).
        nm_index: (G, M) flat indices of the N:M runs (N:M only).
        skipped: Layer name to why the pattern does not apply there.
        macs_per_weight: (d,) MACs each weight takes part in, per example (None without
            example inputs).
        total_macs: The model's MACs per example (all layers), or None.
        whole_layers: Per layer, whether it is one curvature block (compensating consumers).
        modules: Every module of the model by name (for channel parameters).
    """

    pattern: Pattern
    target: str
    layout: Layout
    families: list[Family]
    nm_index: Tensor | None
    skipped: dict[str, str]
    macs_per_weight: Tensor | None
    total_macs: int | None
    whole_layers: list[bool]
    modules: dict[str, nn.Module]

    # -- sizes and progress ----------------------------------------------------------------
    def block_sizes(self, block_size: int | None) -> int | None | list[int | None]:
        """Curvature block sizes that keep every group inside one block.

        Returns:
            An int, None or one size per layer (see :func:`aligned_block_sizes`).
        """
        fitting = [name not in self.skipped for name in self.layout.names]
        return aligned_block_sizes(
            self.pattern, self.layout.shapes, block_size, fitting, self.whole_layers
        )

    def progress(self, modules: dict[str, nn.Module]) -> float:
        """Where pruning stands, in the units of ``sparsity``.

        Returns:
            The removed fraction of MACs (``target="flops"``), of the N:M layers' weights (N:M)
            or of the selected weights.
        """
        present = flat_masks(modules)
        self._to(present.device)
        if self.target == "flops":
            removed = float((self.macs_per_weight * (~present)).sum())
            return removed / self.total_macs if self.total_macs else 0.0
        if self.nm_index is not None:
            return float((~present[self.nm_index]).sum()) / self.nm_index.numel()
        return float((~present).sum()) / self.layout.d

    # -- one step --------------------------------------------------------------------------
    def step(self, modules, layout, method, curv, target, scope, update) -> dict[str, object]:
        """Prune to ``target`` (in the units of :meth:`progress`); returns the step's stats."""
        import time

        t0 = time.perf_counter()
        w = flat_weights(modules)
        present = flat_masks(modules)
        self._to(w.device)
        inv, grad = curv.inv, curv.mean_grad
        inv_grad = inv.mul(grad.to(inv.dtype)) if grad is not None else None
        shift = inv_grad if method.needs_mean_grad else None
        dead = torch.zeros_like(present)
        chosen_channels: dict[int, Tensor] = {}
        if self.nm_index is not None:
            remove, sal_sum, groups = self._nm_select(w, present, inv, grad, inv_grad, shift,
                                                      method, target)
        else:
            remove, dead, sal_sum, groups, chosen_channels = self._group_select(
                w, present, inv, shift, target, scope
            )
        t_select = time.perf_counter() - t0

        t0 = time.perf_counter()
        used = update
        zero = remove | dead | ~present
        if update == "none" or inv is None:
            delta = -torch.where(zero, w, torch.zeros_like(w))
        elif update == "independent":
            delta = self._independent(w, remove, groups, inv, grad)
        else:
            try:
                values = torch.where(dead & ~remove, torch.zeros_like(w), -w)
                delta = inv.constrained_min(
                    zero, values.to(inv.dtype), None if grad is None else grad.to(inv.dtype)
                )
            except NotImplementedError:
                used = "independent"
                delta = self._independent(w, remove, groups, inv, grad)
        new_w = obs.finish_update(w, delta, zero)
        applied = (new_w - w).to(delta.dtype)
        if method.needs_mean_grad:
            const = -0.5 * float(torch.dot(grad.double(), inv_grad.double()))
            sal_sum += const
        if curv.fmul is not None:
            # Dead entries are read by nobody afterwards: their change costs nothing.
            live = torch.where(dead & ~remove, torch.zeros_like(applied), applied)
            predicted, by = obs.quadratic_model(live, curv.fmul, grad), "quadratic-model"
        elif inv is not None:
            predicted, by = sal_sum, "saliency-sum"
        else:
            predicted, by = None, "none"
        masks = compute_masks(modules, ~zero)
        apply_masks(None, modules, masks, layout.split(new_w))
        for f_i, channels in chosen_channels.items():
            self._mask_channel_params(self.families[f_i], channels)
        return {
            "update": used,
            "saliency_sum": sal_sum,
            "predicted": predicted,
            "by": by,
            "selection": t_select,
            "update_time": time.perf_counter() - t0,
        }

    def _to(self, device: torch.device) -> None:
        """Keep the index tensors where the weights are (the model's device)."""
        for fam in self.families:
            fam.obs, fam.dead = fam.obs.to(device), fam.dead.to(device)
        if self.nm_index is not None:
            self.nm_index = self.nm_index.to(device)
        if self.macs_per_weight is not None:
            self.macs_per_weight = self.macs_per_weight.to(device)

    def _costs(self, members: Tensor, alive: Tensor) -> Tensor:
        if self.target == "flops":
            return (self.macs_per_weight[members] * alive).sum(1)
        return alive.sum(1).double()

    def _group_select(self, w, present, inv, shift, target, scope):
        scores, costs, elig, sals, spans = [], [], [], [], []
        for fam in self.families:
            blocks = inv.principal_blocks(fam.obs) if inv is not None else None
            sal = group_saliency(
                w[fam.obs], blocks, None if shift is None else shift[fam.obs]
            ).double()
            members = fam.members()
            alive = present[members]
            cost = self._costs(members, alive)
            score = torch.where(cost > 0, sal / cost.clamp(min=1e-30),
                                torch.full_like(sal, math.inf))
            scores.append(score)
            costs.append(cost)
            elig.append(alive.any(1) & (cost > 0))
            sals.append(sal)
            spans.append(sal.numel())
        score, cost, eligible = torch.cat(scores), torch.cat(costs), torch.cat(elig)
        if scope == "layerwise":
            chosen = torch.zeros_like(eligible)
            start = 0
            for n in spans:
                gone = int((~eligible[start : start + n]).sum())
                k = max(0, round(target * n) - gone)
                sl = slice(start, start + n)
                chosen[sl] = select_groups(score[sl], torch.ones(n), eligible[sl], k)
                start += n
        else:
            chosen = self._global_select(score, eligible, present, target)
        remove = torch.zeros_like(present)
        dead = torch.zeros_like(present)
        groups, channels, sal_sum, start = [], {}, 0.0, 0
        for f_i, (fam, n) in enumerate(zip(self.families, spans, strict=True)):
            pick = chosen[start : start + n]
            start += n
            if not pick.any():
                continue
            remove[fam.obs[pick].reshape(-1)] = True
            if fam.dead.shape[1]:
                dead[fam.dead[pick].reshape(-1)] = True
            groups.append(fam.obs[pick])
            sal_sum += float(sals[f_i][pick].sum())
            if fam.channel_params:
                channels[f_i] = pick.nonzero().reshape(-1)
        dead &= ~remove
        return remove & present, dead & present, sal_sum, groups, channels

    def _removed(self, zero: Tensor) -> float:
        if self.target == "flops":
            return float((self.macs_per_weight * zero).sum())
        return float(zero.sum())

    def _global_select(self, score, eligible, present, target) -> Tensor:
        """Lowest scores first until the target is met, counting shared weights once.

        Groups can share weights (a layer's row of one channel and its column of another), so
        the first pass may fall short; later passes top it up with the next groups in order.
        """
        goal = target * (self.total_macs if self.target == "flops" else self.layout.d)
        if self.target == "params":
            goal = round(goal)
        members = [fam.members() for fam in self.families]
        sizes = [m.shape[0] for m in members]
        zero = ~present
        chosen = torch.zeros_like(eligible)
        for _ in range(100):
            need = goal - self._removed(zero)
            if need <= 1e-9 * max(goal, 1):
                break
            cost = torch.cat([self._costs(m, ~zero[m]) for m in members])
            new = select_groups(score, cost, eligible & ~chosen & (cost > 0), need)
            if not new.any():
                break
            chosen |= new
            for m, part in zip(members, torch.split(new, sizes), strict=True):
                zero[m[part].reshape(-1)] = True
        return chosen

    def _nm_select(self, w, present, inv, grad, inv_grad, shift, method, target):
        idx = self.nm_index
        pres = present[idx]
        n_keep = self.pattern.n
        need = round(target * idx.numel()) - int((~pres).sum())
        final = target >= self.pattern.implied_sparsity - 1e-9
        if final:
            blocks = inv.principal_blocks(idx) if inv is not None else None
            zero_g, sal = nm_best_subsets(
                w[idx], blocks, pres, n_keep, None if shift is None else shift[idx]
            )
            new = zero_g & pres
            sal_sum = float(sal.sum())
        else:
            inv_diag = inv.diag() if inv is not None else None
            single = method.saliency(w, inv, inv_diag, grad, inv_grad)
            new = nm_capped_selection(single[idx].double(), pres, n_keep, max(0, need))
            sal_sum = float(single[idx][new].double().sum())
        remove = torch.zeros_like(present)
        remove[idx[new]] = True
        return remove, sal_sum, None

    def _independent(self, w, remove, groups, inv, grad) -> Tensor:
        if groups is None:  # N:M runs: the paper's single-weight rule
            return obs.independent_update(w, remove, inv, grad)
        wd = w.to(inv.dtype)
        base = -inv.mul(grad.to(inv.dtype)) if grad is not None else torch.zeros_like(wd)
        v = torch.zeros_like(wd)
        for index in groups:
            blocks = inv.principal_blocks(index)
            gap = -wd[index] - base[index]
            v[index.reshape(-1)] = _solve(blocks, gap).reshape(-1)
        return base + inv.mul(v)

    def _mask_channel_params(self, fam: Family, channels: Tensor) -> None:
        for mod_name, pname in fam.channel_params:
            zero_entries(self.modules[mod_name], pname, channels)

    # -- other importance measures ---------------------------------------------------------
    def select_by_scores(
        self, scores: list[Tensor], modules: dict[str, nn.Module], target: float
    ) -> Tensor:
        """Groups to remove for externally given scores (one tensor per family), globally.

        The same stopping rule as :meth:`step` (removed weights or MACs reach ``target``,
        shared weights counted once), so other importance measures compare at equal cost.

        Args:
            scores: Per family, (G,) scores; lower goes first.
            modules: The selected modules.
            target: In the units of :meth:`progress`.

        Returns:
            (total groups,) bool, in family order.
        """
        present = flat_masks(modules)
        eligible = torch.cat([present[f.members()].any(1) for f in self.families])
        return self._global_select(torch.cat(scores).double(), eligible, present, target)

    def remove_groups(self, modules: dict[str, nn.Module], chosen: Tensor) -> None:
        """Zero the chosen groups (weights, bias and BatchNorm entries), without any update.

        Args:
            modules: The selected modules.
            chosen: (total groups,) bool, as from :meth:`select_by_scores`.
        """
        zero = ~flat_masks(modules)
        start = 0
        picks = []
        for fam in self.families:
            n = fam.obs.shape[0]
            pick = chosen[start : start + n]
            start += n
            zero[fam.members()[pick].reshape(-1)] = True
            picks.append(pick)
        apply_masks(None, modules, compute_masks(modules, ~zero))
        for fam, pick in zip(self.families, picks, strict=True):
            if fam.channel_params and pick.any():
                self._mask_channel_params(fam, pick.nonzero().reshape(-1))

    # -- report ----------------------------------------------------------------------------
    def report(self, modules: dict[str, nn.Module]) -> dict[str, object]:
        """What the pattern did: groups removed per layer, compensation, MACs.

        Returns:
            A JSON-able dict.
        """
        present = flat_masks(modules)
        out: dict[str, object] = {"pattern": str(self.pattern), "target": self.target,
                                  "skipped": dict(self.skipped)}
        if self.nm_index is not None:
            pres = present[self.nm_index]
            out["nm_satisfied"] = bool((pres.sum(1) <= self.pattern.n).all())
            out["nm_layers"] = [n for n in self.layout.names if n not in self.skipped]
        elif self.families:
            rows = []
            for fam in self.families:
                gone = int((~present[fam.members()]).all(1).sum())
                row = {"layer": fam.layer, "groups": int(fam.obs.shape[0]), "removed": gone}
                if self.pattern.kind == "channels":
                    row.update({
                        "consumers": fam.consumers,
                        "compensated_in": fam.compensated_in,
                        # Exact: the OBS set is everything the channel feeds (one consumer).
                        "exact": fam.compensated_in is not None,
                    })
                rows.append(row)
            out["groups"] = rows
        if self.macs_per_weight is not None:
            removed = float((self.macs_per_weight * (~present)).sum())
            out["flops"] = {"total_macs": self.total_macs, "removed_macs": round(removed),
                            "removed_fraction": removed / self.total_macs
                            if self.total_macs else 0.0}
        return out


def _macs_per_weight(model, layout, example_inputs) -> tuple[Tensor, int]:
    report = count_flops(model, example_inputs)
    by_name = report.by_name()
    parts = []
    for name, size in zip(layout.names, layout.sizes, strict=True):
        mpw = by_name[name].macs_per_weight if name in by_name else 0.0
        parts.append(torch.full((size,), float(mpw), dtype=torch.float64))
    return torch.cat(parts), report.total_macs


def make_plan(
    model: nn.Module,
    modules: dict[str, nn.Module],
    layout: Layout,
    pattern: Pattern,
    target: str,
    example_inputs: object | None,
    explicit: bool = False,
) -> StructuredPlan | None:
    """Groups, MAC counts and block alignment for ``pattern`` on the selected layers.

    Args:
        model: The whole model (traced for channels and MACs; not changed).
        modules: The selected modules (layout order).
        layout: Their layout.
        pattern: The parsed pattern.
        target: ``"params"`` or ``"flops"``.
        example_inputs: A batch for tracing and counting MACs (None: no MAC counts).
        explicit: The user named the layers, so a layer the pattern does not fit is an error
            (otherwise it is skipped and reported).

    Returns:
        The plan, or None for unstructured pruning with a parameter target (the classic path).

    Raises:
        ValueError: For an unknown target, ``target="flops"`` without example inputs or with
            N:M, a named layer the pattern does not fit, or a pattern that fits no layer.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {list(TARGETS)}")
    if not pattern.structured and target == "params":
        return None
    if target == "flops" and example_inputs is None:
        raise ValueError(
            "target='flops' needs an example input to count MACs; pass example_inputs "
            "(a batch the model accepts)"
        )
    if target == "flops" and pattern.kind == "nm":
        raise ValueError(
            f"pattern {pattern} fixes the sparsity of every layer it fits (N/M kept); use "
            "target='params'"
        )
    skipped: dict[str, str] = {}
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        why = misfit(pattern, shape)
        if why:
            if explicit:
                raise ValueError(
                    f"pattern {pattern} does not fit layer {name!r}: {why}; skip that layer "
                    "or choose another pattern"
                )
            skipped[name] = why
    mpw, total = (None, None)
    if example_inputs is not None:
        mpw, total = _macs_per_weight(model, layout, example_inputs)
    whole = [False] * len(layout.names)
    families: list[Family] = []
    nm_index = None
    offsets = dict(zip(layout.names, layout.offsets, strict=True))
    shapes = dict(zip(layout.names, layout.shapes, strict=True))
    if pattern.kind == "nm":
        parts = [nm_groups(pattern, shapes[n], offsets[n]) for n in layout.names
                 if n not in skipped]
        nm_index = torch.cat(parts) if parts else None
    elif pattern.kind == "block":
        families = [Family(n, block_groups(pattern, shapes[n], offsets[n]),
                           torch.empty(0, 0, dtype=torch.long))
                    for n in layout.names if n not in skipped]
        for fam in families:
            fam.dead = torch.empty(fam.obs.shape[0], 0, dtype=torch.long)
    elif pattern.kind == "channels":
        families, skipped, whole = _channel_families(model, modules, layout, example_inputs)
    else:  # unstructured with a FLOP target: every weight is its own group
        families = [
            Family(n, torch.arange(o, o + s).reshape(-1, 1), torch.empty(s, 0, dtype=torch.long))
            for n, o, s in zip(layout.names, layout.offsets, layout.sizes, strict=True)
        ]
    if nm_index is None and not families:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise ValueError(f"pattern {pattern} fits no selected layer ({reasons})")
    return StructuredPlan(pattern, target, layout, families, nm_index, skipped, mpw, total,
                          whole, dict(model.named_modules()))


def _channel_families(model, modules, layout, example_inputs):
    from woodfisher.pruning.channels import consumer_flat_index, trace_channels

    if example_inputs is None:
        raise ValueError("pattern='channels' needs an example input to trace the model")
    _, _, deps = trace_channels(model, example_inputs)
    offsets = dict(zip(layout.names, layout.offsets, strict=True))
    shapes = dict(zip(layout.names, layout.shapes, strict=True))
    skipped: dict[str, str] = {}
    families: list[Family] = []
    whole_names: set[str] = set()
    for name in layout.names:
        info = deps.get(name)
        if info is None or info.reason:
            skipped[name] = info.reason if info else "not traced"
            continue
        rows, cols = matrix_shape(shapes[name])
        row_idx = offsets[name] + torch.arange(rows * cols).reshape(rows, cols)
        consumer_idx = {}
        for cons, per in info.consumers.items():
            if cons in offsets:
                widths = {len(p) for p in per}
                if len(widths) != 1:
                    skipped[name] = f"channels read unevenly by {cons}"
                    break
                consumer_idx[cons] = torch.stack(
                    [consumer_flat_index(shapes[cons], offsets[cons], p) for p in per]
                )
        if name in skipped:
            continue
        selected_consumers = [c for c in info.consumers if c in consumer_idx]
        if len(info.consumers) == 1 and selected_consumers:
            comp = selected_consumers[0]
            obs_idx = consumer_idx[comp]
            dead = row_idx
            whole_names.add(comp)
        else:
            comp = None
            obs_idx = row_idx
            others = [consumer_idx[c] for c in selected_consumers]
            dead = torch.cat(others, dim=1) if others else torch.empty(rows, 0, dtype=torch.long)
        params = []
        if getattr(modules[name], "bias", None) is not None:
            params.append((name, "bias"))
        for bn in info.norms:
            params += [(bn, "weight"), (bn, "bias")]
        families.append(Family(name, obs_idx, dead, params, comp, list(info.consumers)))
    whole = [n in whole_names for n in layout.names]
    return families, skipped, whole
