"""What pruning a filter and coarsening a layer's grid cost: the statistics behind the QUBO.

Two objectives, both as a quadratic form over filter-pruning decisions plus, per layer, a cost
of each bit width:

- ``"magnitude"`` — the paper's heuristic (Wang et al. 2025, as far as it is public): with
  ``a_i`` the mean ``|w|`` of filter ``i``, pruning costs ``Σ_layers (Σ_i a_i p_i)²``, so the
  filters of one layer couple through ``a_i a_j``. The paper's quantization cost is not public;
  ours mirrors the squared pruning cost: ``β (Σ_i a_i)² (r / r_max)²`` for ``r`` bits removed.
- ``"fisher"`` — ours: the second-order model ``½ E[δᵀFδ]`` with ``F`` the empirical Fisher
  ``damp·I + GᵀG/m`` from the engine's per-sample gradients. Pruning filter ``i`` is
  ``δ_i = −w_i``; with per-sample scores ``t_si = g_sᵀδ_i``, the couplings are
  ``J_ij = ½ (TᵀT/m)_ij`` (+ ``½ damp |w_i|²`` on the diagonal), across layers too, since no
  block approximation is needed for ``F`` itself (only ``F⁻¹`` needs one). Rounding to ``b`` bits
  is zero-mean noise of variance ``step²/12`` per weight, so it adds ``½ Σ_j F_jj step_j²/12``
  (for 1 bit, whose grid has no zero, the actual squared error) and no cross terms.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> costs = qubo_costs(net, None, objective="magnitude")
    >>> [(layer.name, layer.filters, layer.per_filter, layer.prunable) for layer in costs.layers]
    [('0', 3, 4, True), ('2', 2, 3, False)]
    >>> costs.bits, costs.quant["0"].shape  # one cost per bit width 2..8
    ((2, 8), torch.Size([7]))
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from woodfisher.params import effective_weight, select_modules
from woodfisher.quant import MAX_BITS, fake_quantize, quant_scale

#: Objectives :func:`qubo_costs` builds.
OBJECTIVES = ("magnitude", "fisher")
#: Default damp of the fisher objective, relative to the Fisher's mean diagonal. Much larger
#: than pruning's 1e-2: pruning a whole filter is a large step, and a small damp lets the
#: empirical Fisher call it cheap (chosen on a validation split, bench/qubo.py).
QUBO_RELATIVE_DAMP = 1.0
#: Default weight of the magnitude objective's quantization term (chosen the same way; 0.01 and
#: 0.1 tied there).
MAGNITUDE_BETA = 0.01


@dataclass(frozen=True)
class LayerCosts:
    """One layer's part of the problem.

    Attributes:
        name: Module name.
        filters: Output channels (rows of a Linear weight, output channels of a Conv).
        per_filter: Weights per filter.
        prunable: Whether its filters are decision variables.
    """

    name: str
    filters: int
    per_filter: int
    prunable: bool

    @property
    def weights(self) -> int:
        """Weights of the layer."""
        return self.filters * self.per_filter


@dataclass
class Costs:
    """Objective statistics of a model, independent of the budget.

    Attributes:
        objective: ``"magnitude"`` or ``"fisher"``.
        layers: The selected layers, in order.
        prune: (nf, nf) symmetric matrix ``J`` over all filters of the prunable layers, in
            order (layer by layer); the pruning cost of a set ``P`` is ``Σ_{i,j∈P} J_ij``.
        quant: Layer name to a tensor of the cost of the layer at each bit width ``b`` of
            ``bits`` (index ``b − bits[0]``), charged on all its weights.
        bits: The lowest and highest bit width.
        single: (nf,) cost of pruning each filter alone (``J_ii``), used to rank filters.
        modules: Layer name to module.
        options: What the statistics were built with (seed, gradients, damp, β).
    """

    objective: str
    layers: list[LayerCosts]
    prune: Tensor
    quant: dict[str, Tensor]
    modules: dict[str, nn.Module]
    bits: tuple[int, int]
    options: dict[str, object] = field(default_factory=dict)
    parts: dict[str, object] | None = None

    def with_relative_damp(self, relative_damp: float) -> Costs:
        """The same Fisher statistics with another damp (no new gradients).

        Both costs are linear in the damp: ``J = J_EF + damp·½ diag(|w_i|²)`` and
        ``quant = quant_EF + damp·quant_I``.

        Args:
            relative_damp: Damp as a multiple of the Fisher's mean diagonal, > 0.

        Returns:
            New costs.

        Raises:
            ValueError: For magnitude costs or a damp that is not > 0.
        """
        if self.parts is None:
            raise ValueError("only fisher costs have a damp")
        if not (isinstance(relative_damp, (int, float)) and relative_damp > 0):
            raise ValueError(f"relative_damp must be a number > 0, got {relative_damp!r}")
        damp = float(relative_damp) * float(self.parts["scale"])
        ef, ident = self.parts["prune"]
        quant = {n: e + damp * i for n, (e, i) in self.parts["quant"].items()}
        options = {**self.options, "relative_damp": float(relative_damp), "damp": damp}
        return Costs(self.objective, self.layers, ef + damp * ident, quant, self.modules,
                     self.bits, options, self.parts)

    @property
    def single(self) -> Tensor:
        """Cost of pruning each filter alone."""
        return self.prune.diagonal().clone()

    def filter_slices(self) -> dict[str, slice]:
        """Where each prunable layer's filters sit in :attr:`prune`.

        Returns:
            Layer name to a slice of the filter index.
        """
        out, at = {}, 0
        for layer in self.layers:
            if layer.prunable:
                out[layer.name] = slice(at, at + layer.filters)
                at += layer.filters
        return out


def _matrix(w: Tensor) -> Tensor:
    """A weight as (filters, weights per filter)."""
    return w.reshape(w.shape[0], -1)


def _prunable(names: Sequence[str], no_prune: Sequence[str] | str | None) -> list[bool]:
    if no_prune is None:
        # The last layer's filters are the outputs (classes): never a decision.
        return [i < len(names) - 1 for i in range(len(names))]
    patterns = [no_prune] if isinstance(no_prune, str) else list(no_prune)
    return [not any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names]


def check_bit_range(bits: Sequence[int]) -> tuple[int, int]:
    """Check a ``(lowest, highest)`` bit width pair.

    Returns:
        The pair as ints.

    Raises:
        ValueError: If it is not two integers ``1 <= lo <= hi <= 16`` at most 8 apart.
    """
    try:
        lo, hi = (int(b) for b in bits)
        ok = all(int(b) == b and not isinstance(b, bool) for b in bits) and 1 <= lo <= hi
        ok = ok and hi <= MAX_BITS
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"bits must be (lowest, highest) bit widths with 1 <= lowest <= highest <= "
            f"{MAX_BITS}, got {bits!r}"
        )
    if hi - lo >= 8:
        raise ValueError(
            f"bits={bits!r} spans {hi - lo + 1} widths; at most 8 (3 code bits) are encoded"
        )
    return lo, hi


def expected_noise(w: Tensor, fdiag: Tensor, bits: Sequence[int]) -> Tensor:
    """``½ Σ_j F_jj E[e_j²]`` of rounding ``w`` to each bit width in ``bits``.

    Args:
        w: A layer's weight.
        fdiag: The Fisher diagonal, in ``w``'s shape.
        bits: Bit widths.

    Returns:
        One expected loss increase per width.
    """
    rows, fd = _matrix(w.double()), _matrix(fdiag.double())
    per_channel = fd.sum(1)
    out = torch.empty(len(bits), dtype=torch.float64)
    for i, b in enumerate(bits):
        if b == 1:
            err = fake_quantize(rows, 1) - rows
            out[i] = 0.5 * float((fd * err.square()).sum())
        else:
            step = quant_scale(rows, b)
            out[i] = 0.5 * float((per_channel * step.square()).sum()) / 12
    return out


def qubo_costs(
    model: nn.Module,
    data: Iterable | None,
    objective: str = "fisher",
    *,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    no_prune: Sequence[str] | str | None = None,
    bits: Sequence[int] = (2, 8),
    beta: float = MAGNITUDE_BETA,
    num_grads: int | None = None,
    relative_damp: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Costs:
    """The pruning couplings and quantization costs of ``model``'s Linear/Conv layers.

    Args:
        model: The network (not changed).
        data: Batches of ``(inputs, targets)`` for the Fisher (unused by ``"magnitude"``).
        objective: ``"magnitude"`` (the paper's heuristic) or ``"fisher"`` (ours).
        layers: Module name patterns to compress (default every Linear/Conv).
        skip: Module name patterns to leave alone.
        no_prune: Patterns of layers that are quantized but never pruned; default the last
            selected layer (its outputs are the classes).
        bits: The lowest and highest bit width a layer may get.
        beta: Weight of the magnitude objective's quantization term (default
            :data:`MAGNITUDE_BETA`).
        num_grads: Per-sample gradients for the Fisher (default the engine's 500).
        relative_damp: Damp as a multiple of the Fisher's mean diagonal (default
            :data:`QUBO_RELATIVE_DAMP`).
        seed: Seed of the gradient pass.
        progress: Show a progress bar.

    Returns:
        The statistics.

    Raises:
        ValueError: On an unknown objective, a bad ``beta`` or bit range, missing data for
            ``"fisher"``, or no prunable layer.
    """
    from woodfisher.curvature import CURVATURE_DEFAULTS, relative_damp_scale
    from woodfisher.gradients import sample_gradients

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {list(OBJECTIVES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    lo, hi = check_bit_range(bits)
    widths = list(range(lo, hi + 1))
    modules = select_modules(model, layers, skip)
    names = list(modules)
    flags = _prunable(names, no_prune)
    weights = {n: effective_weight(m) for n, m in modules.items()}
    specs = [
        LayerCosts(n, int(w.shape[0]), int(w[0].numel()), flag)
        for (n, w), flag in zip(weights.items(), flags, strict=True)
    ]
    if not any(flags):
        raise ValueError(
            f"no layer has filters to prune: no_prune={no_prune!r} covers all of {names}"
        )
    options: dict[str, object] = {"objective": objective}
    quant: dict[str, Tensor] = {}
    if objective == "magnitude":
        blocks = []
        for spec in specs:
            a = _matrix(weights[spec.name].double()).abs().mean(1)
            scale = float(a.sum()) ** 2
            # r = hi - b bits removed, relative to the most that can be removed.
            top = max(hi - lo, 1)
            quant[spec.name] = torch.tensor(
                [beta * scale * ((hi - b) / top) ** 2 for b in widths], dtype=torch.float64
            )
            if spec.prunable:
                blocks.append(torch.outer(a, a).cpu())
        prune = torch.block_diag(*blocks)
        options["beta"] = float(beta)
        return Costs(objective, specs, prune, quant, modules, (lo, hi), options)

    if data is None:
        raise ValueError("objective='fisher' needs data: batches of (inputs, targets)")
    m = num_grads or int(CURVATURE_DEFAULTS["num_grads"])
    rel = float(QUBO_RELATIVE_DAMP if relative_damp is None else relative_damp)
    G = sample_gradients(model, data, num_grads=m, params=modules, seed=seed, progress=progress)
    scale = relative_damp_scale(G)
    scores, sq_norms, parts, at = [], [], {}, 0
    for spec in specs:
        w = weights[spec.name].double()
        size = w.numel()
        g = G[:, at : at + size].double()
        if spec.prunable:
            # t_si = g_sᵀ δ_i with δ_i = −w_i: the loss change of pruning filter i, sample s.
            scores.append(-(g.reshape(m, spec.filters, spec.per_filter) * _matrix(w)).sum(-1))
            sq_norms.append(_matrix(w).square().sum(1))
        ef = expected_noise(w, g.square().mean(0).reshape(w.shape), widths)
        parts[spec.name] = (ef, expected_noise(w, torch.ones_like(w), widths))
        at += size
    del G
    # The statistics are small: keep them on the CPU, where the formulation reads them.
    T = torch.cat(scores, dim=1).cpu()
    ident = 0.5 * torch.diag(torch.cat(sq_norms)).cpu()
    parts = {n: (e.cpu(), i.cpu()) for n, (e, i) in parts.items()}
    options.update(num_grads=m, seed=seed)
    base = Costs(objective, specs, ident, {}, modules, (lo, hi), options,
                 {"prune": (0.5 * T.T @ T / m, ident), "quant": parts, "scale": scale})
    return base.with_relative_damp(rel)
