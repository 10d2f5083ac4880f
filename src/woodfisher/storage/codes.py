"""Coding strategies: how one layer's weights become cell targets, and reads become weights.

A strategy is a set of composable tokens (the paper's families; formulas are ours, see
``docs/storage.md``):

- ``naive``: the affine map of ``[min w, max w]`` onto the cell range, one value per cell,
  decoded as if reads were exact. Alone only.
- ``sign``: the sign in one digital bit, the magnitude ``|w|/s`` in the cell; ``pair``: the
  sign by a differential pair of cells (aihwkit style, the unused cell at 0). Without either,
  weights are mapped with an offset (``w = lo + span·u``).
- ``adaptive``: the layer's range ``s`` is chosen (clipping the tail) to minimise the expected
  importance-weighted error under the channel, values are spread by a compander in the
  channel's noise-normalised coordinate, and targets are pre-distorted through the channel's
  mean curve so the decode is corrected (:mod:`woodfisher.storage.mapping`).
- ``split``: digit splitting: ``u = Σ_j d_j L^{-j} + f L^{-(K-1)}`` with ``K = digits`` cells,
  the ``K-1`` high digits at ``L`` discrete levels (decoded by nearest level) and the residual
  ``f`` in the last cell; ``L`` is chosen to minimise the expected error (fine noise ``/L^{K-1}``
  against the chance of misreading a high digit).
- ``magnitude`` / ``fisher``: allocation of repetitions by importance ``w²`` or ``F_ii``
  (:mod:`woodfisher.storage.allocation`); without them every weight gets ``cells`` cells.

Repetition is the ``cells`` budget itself: a copy of a weight's code takes ``unit`` cells
(``digits`` with ``split``, twice that with ``pair``) and ``r`` copies are read and averaged.

Example:
    >>> Strategy.parse("sign,adaptive,fisher").name
    'sign+adaptive+fisher'
    >>> Strategy.parse(["pair", "split"]).unit_cells
    4
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from woodfisher.storage.channel import Channel
from woodfisher.storage.mapping import CellMap, compander

__all__ = ["ALLOCATIONS", "TOKENS", "LayerCode", "Strategy", "build_layer_code"]

TOKENS = ("naive", "sign", "pair", "adaptive", "split", "magnitude", "fisher")
ALLOCATIONS = ("magnitude", "fisher")
GRANULARITIES = ("weight", "row")
#: Bits of one stored scale, compander breakpoint and digit count.
SCALE_BITS, CURVE_BITS, LEVELS_BITS = 32, 8, 8
COMPANDER_BINS = 16
#: A layer gets its own compander only if it stores this many weights per compander bit.
COMPANDER_MIN_WEIGHTS_PER_BIT = 10
MAX_LEVELS = 32
#: Quantiles of |w| tried as the range s by ``adaptive`` (1.0 = no clipping).
#: Weights of a layer beyond which the range search runs on a stratified sample.
SEARCH_SAMPLE = 20000
CLIP_QUANTILES = (1.0,) + tuple(1 - 10 ** (-k / 4) for k in range(4, 21))


@dataclass(frozen=True)
class Strategy:
    """A parsed coding strategy.

    Attributes:
        tokens: The tokens, in canonical order.
        sign: ``"offset"``, ``"digital"`` (``sign``) or ``"pair"``.
        adaptive: Whether ``adaptive`` is on.
        split: Whether ``split`` is on.
        allocation: ``None``, ``"magnitude"`` or ``"fisher"``.
        digits: Cells of one copy of a split code.
        granularity: Allocation groups: ``"row"`` (an output channel) or ``"weight"``.
    """

    tokens: tuple[str, ...]
    sign: str
    adaptive: bool
    split: bool
    allocation: str | None
    digits: int = 2
    granularity: str = "row"

    @classmethod
    def parse(cls, strategy: str | Sequence[str] | Strategy, digits: int = 2,
              granularity: str = "row") -> Strategy:
        """A strategy from ``"naive"``, ``"sign,adaptive"``, ``"sign+fisher"`` or a list.

        Returns:
            The strategy.

        Raises:
            ValueError: On an unknown or repeated token, ``naive`` with others, ``sign`` with
                ``pair``, two allocations, ``digits`` < 2 or an unknown granularity.
        """
        if isinstance(strategy, Strategy):
            return strategy
        if isinstance(strategy, str):
            items = [t.strip() for t in strategy.replace("+", ",").split(",") if t.strip()]
        else:
            items = [str(t).strip() for t in strategy]
        if not items:
            raise ValueError(f"empty strategy; choose tokens from {list(TOKENS)}")
        unknown = [t for t in items if t not in TOKENS]
        if unknown:
            raise ValueError(f"unknown strategy token(s) {unknown}; choose from {list(TOKENS)}")
        if len(set(items)) != len(items):
            raise ValueError(f"strategy {items} repeats a token")
        if "naive" in items and len(items) > 1:
            raise ValueError(
                f"'naive' is the plain code and takes no other token, got {items}; drop 'naive'"
            )
        if "sign" in items and "pair" in items:
            raise ValueError("choose one sign protection: 'sign' (digital bit) or 'pair' (cells)")
        allocs = [t for t in items if t in ALLOCATIONS]
        if len(allocs) > 1:
            raise ValueError(f"choose one allocation of {list(ALLOCATIONS)}, got {allocs}")
        if isinstance(digits, bool) or int(digits) != digits or digits < 2:
            raise ValueError(f"digits must be an integer >= 2 (cells per split code), got "
                             f"{digits!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown allocation granularity {granularity!r}; choose from {list(GRANULARITIES)}"
            )
        order = [t for t in TOKENS if t in items]
        return cls(
            tokens=tuple(order),
            sign="digital" if "sign" in items else "pair" if "pair" in items else "offset",
            adaptive="adaptive" in items,
            split="split" in items,
            allocation=allocs[0] if allocs else None,
            digits=int(digits),
            granularity=granularity,
        )

    @property
    def name(self) -> str:
        """Tokens joined by ``+``."""
        return "+".join(self.tokens)

    @property
    def unit_cells(self) -> int:
        """Cells of one copy of a weight's code."""
        return (self.digits if self.split else 1) * (2 if self.sign == "pair" else 1)


@dataclass
class LayerCode:
    """One layer's code: what is stored, how it decodes, and its expected error.

    Attributes:
        name: Module name.
        shape: Weight shape.
        keep: (numel,) bool, weights stored (False: pruned, no cell).
        target: (n,) the values the code stores (kept weights, quantized if asked).
        scale: (n,) weight units of ``u = 1`` (the magnitude range, or the span of an offset
            code).
        offset: (n,) weight of ``u = 0`` for offset codes (zeros otherwise).
        u: (n,) normalised values in ``[0, 1]`` (after clipping).
        sgn: (n,) +1/-1 for sign and pair codes, else None.
        levels: ``L`` of split codes (0 otherwise).
        var: (n,) variance of a decoded weight from one copy (weight units², local model).
        bias2: (n,) squared deterministic error (clipping, and the decode's bias at the mean
            read, which is 0 for pre-distorted maps and not for ``linear`` ones).
        step: (n,) quantization step for snapping the decode to the grid, or None.
        qmax: Largest grid index for snapping.
        rows: (n,) output channel of each stored weight.
        side_bits: Digital bits of this layer by kind (scales, signs, compander, levels).
        info: What was chosen (range, clipped share, map), JSON-able.
        coarse: Map of the high digits (split codes).
        fine: Map of the value cell (or the residual of a split code).
    """

    name: str
    shape: tuple[int, ...]
    keep: Tensor
    target: Tensor
    scale: Tensor
    offset: Tensor
    u: Tensor
    sgn: Tensor | None
    levels: int
    var: Tensor
    bias2: Tensor
    step: Tensor | None
    qmax: int
    rows: Tensor
    side_bits: dict[str, int]
    info: dict[str, Any]
    coarse: CellMap | None
    fine: CellMap
    strategy: Strategy = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def polarities(self) -> int:
        """Cells per digit of one copy: 2 for pair codes, else 1."""
        return 2 if self.strategy.sign == "pair" else 1

    @property
    def digits(self) -> int:
        """Cells per polarity of one copy."""
        return self.strategy.digits if self.strategy.split else 1

    # -- encode / decode ---------------------------------------------------------------------
    def _polar_values(self) -> Tensor:
        """(n, P) magnitudes each polarity cell stores."""
        if self.polarities == 1:
            return self.u[:, None]
        pos = torch.where(self.sgn > 0, self.u, torch.zeros_like(self.u))
        neg = torch.where(self.sgn < 0, self.u, torch.zeros_like(self.u))
        return torch.stack([pos, neg], 1)

    def slot_targets(self) -> Tensor:
        """Target conductances of one copy of every stored weight.

        Returns:
            (n, P, K) float64 targets (P polarity cells, K digit cells).
        """
        vals = self._polar_values()
        K = self.digits
        if K == 1:
            return self.fine.encode(vals)[..., None]
        L = self.levels
        x = vals * L ** (K - 1)
        D = torch.clamp(torch.floor(x), max=L ** (K - 1) - 1)
        frac = x - D
        cells = []
        for j in range(1, K):
            d = torch.floor(D / L ** (K - 1 - j)) % L
            cells.append(self.coarse.encode(d / (L - 1)))
        cells.append(self.fine.encode(frac))
        return torch.stack(cells, -1)

    def decode(self, reads: Tensor) -> Tensor:
        """Weights from averaged reads of every slot.

        Args:
            reads: (n, P, K) mean read of each slot.

        Returns:
            (n,) decoded weights (float64).
        """
        K = self.digits
        if K == 1:
            mags = self.fine.decode(reads[..., 0])
        else:
            L = self.levels
            mags = self.fine.decode(reads[..., -1]) / L ** (K - 1)
            for j in range(1, K):
                d = torch.round(self.coarse.decode(reads[..., j - 1]) * (L - 1)).clamp(0, L - 1)
                mags = mags + d / L ** j
        if self.polarities == 2:
            w = self.scale * (mags[:, 0] - mags[:, 1])
        elif self.sgn is not None:
            # A magnitude is never negative: the sign bit decides the sign, whatever the read.
            w = self.sgn * self.scale * mags[:, 0].clamp(min=0)
        else:
            w = self.offset + self.scale * mags[:, 0]
        if self.step is not None:
            w = torch.clamp(torch.round(w / self.step), -self.qmax, self.qmax) * self.step
        return w


# ------------------------------------------------------------------------------ building


def _magnitude_var(fine: CellMap, coarse: CellMap | None, u: Tensor, levels: int, digits: int,
                   reads: float) -> Tensor:
    """Variance (u units) of one copy of magnitude ``u``, times ``reads`` for misreads."""
    if coarse is None:
        return fine.var(u)
    L, K = levels, digits
    x = u * L ** (K - 1)
    D = torch.clamp(torch.floor(x), max=L ** (K - 1) - 1)
    var = fine.var(x - D) / L ** (2 * (K - 1))
    # A misread digit is off by one level, an error of L^-j; averaging r reads makes it rarer,
    # so scale by r to keep the allocator's var / r model at the reference reads.
    p = coarse.level_error(L, reads) * reads
    for j in range(1, K):
        d = (torch.floor(D / L ** (K - 1 - j)) % L).long()
        var = var + p[d] / L ** (2 * j)
    return var


def _magnitude_bias(fine: CellMap, u: Tensor, levels: int, digits: int) -> Tensor:
    """Deterministic decode error (u units) of magnitude ``u``: the value cell's bias."""
    if levels == 0:
        return fine.bias(u)
    x = u * levels ** (digits - 1)
    D = torch.clamp(torch.floor(x), max=levels ** (digits - 1) - 1)
    return fine.bias(x - D) / levels ** (digits - 1)


def _code_bias(fine: CellMap, u: Tensor, pair: bool, levels: int, digits: int) -> Tensor:
    bias = _magnitude_bias(fine, u, levels, digits)
    if pair:
        bias = bias - _magnitude_bias(fine, torch.zeros(1, dtype=torch.float64), levels, digits)
    return bias


def _code_var(fine: CellMap, coarse: CellMap | None, u: Tensor, pair: bool, levels: int,
              digits: int, reads: float) -> Tensor:
    var = _magnitude_var(fine, coarse, u, levels, digits, reads)
    if pair:
        zero = _magnitude_var(fine, coarse, torch.zeros(1, dtype=torch.float64), levels, digits,
                              reads)
        var = var + zero
    return var


def _best_levels(fine: CellMap, coarse: CellMap, u: Tensor, imp: Tensor, pair: bool,
                 digits: int, reads: float, only: int | None = None) -> tuple[int, Tensor]:
    """``L`` minimising the importance-weighted variance of a split code, and that variance."""
    best: tuple[float, int, Tensor] | None = None
    for L in range(2, MAX_LEVELS + 1) if only is None else (only,):
        var = _code_var(fine, coarse, u, pair, L, digits, reads)
        cost = float((imp * var).sum())
        if best is None or cost < best[0]:
            best = (cost, L, var)
    assert best is not None
    return best[1], best[2]


def build_layer_code(
    name: str,
    weight: Tensor,
    keep: Tensor,
    strategy: Strategy,
    channel: Channel,
    importance: Tensor | None = None,
    reads: float = 1.0,
    quant_bits: int | None = None,
) -> LayerCode:
    """Design one layer's code: ranges, maps, digit levels, and its expected error.

    Args:
        name: Module name.
        weight: The layer's effective weight (pruned entries 0).
        keep: Bool of ``weight``'s shape, True where a weight is stored.
        strategy: The strategy.
        channel: The cell.
        importance: Importance of each weight (``weight``'s shape); uniform by default.
        reads: Copies per weight the design assumes (the budget per copy size).
        quant_bits: Quantize per output channel to this many bits first (decode snaps to
            the grid), or None.

    Returns:
        The code.
    """
    from woodfisher.quant import fake_quantize, quant_scale

    shape = tuple(weight.shape)
    w_full = weight.detach().to(torch.float64).reshape(shape)
    keep = keep.reshape(-1).to(torch.bool)
    rows_full = torch.arange(shape[0]).repeat_interleave(max(1, w_full[0].numel())) \
        if w_full.ndim > 1 else torch.zeros(w_full.numel(), dtype=torch.long)
    imp_full = (torch.ones(w_full.numel(), dtype=torch.float64) if importance is None
                else importance.detach().to(torch.float64).reshape(-1))
    step = None
    qmax = 0
    side: dict[str, int] = {}
    if quant_bits is not None:
        steps = quant_scale(w_full, quant_bits, axis=0)
        w_full = fake_quantize(w_full, quant_bits, axis=0).reshape(shape)
        qmax = 2 ** (quant_bits - 1) - 1 if quant_bits > 1 else 1
        step_full = steps[rows_full].to(torch.float64)
        step = step_full[keep]
        side["scales"] = SCALE_BITS * len(steps)
    w = w_full.reshape(-1)[keep]
    imp = imp_full[keep]
    rows = rows_full[keep]
    n = w.numel()
    pair = strategy.sign == "pair"
    kind = "companded" if strategy.adaptive else "linear"
    zeros = torch.zeros(n, dtype=torch.float64)
    sgn = None if strategy.sign == "offset" else torch.where(w < 0, -1.0, 1.0).to(torch.float64)
    info: dict[str, Any] = {"map": kind, "stored": n}

    identity = CellMap(channel, kind)
    # A compander costs bins × bits of side information: only layers large enough get one.
    own_curve = (strategy.adaptive and quant_bits is None
                 and n >= COMPANDER_MIN_WEIGHTS_PER_BIT * COMPANDER_BINS * CURVE_BITS)
    coarse = identity if strategy.split else None
    magnitude = strategy.sign != "offset"
    info["own_compander"] = bool(own_curve and not strategy.split)

    def normalise(s: float, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u, scale, offset for range s (values beyond s are clipped)."""
        zeros = torch.zeros_like(w)
        if magnitude:
            return (w.abs() / s).clamp(max=1), zeros + s, zeros
        return ((w / s).clamp(-1, 1) + 1) / 2, zeros + 2 * s, zeros - s

    def bias2(fine: CellMap, u: Tensor, scale: Tensor, offset: Tensor, levels: int,
              w: Tensor) -> Tensor:
        """Squared deterministic error: clipping plus the decode's bias at the mean read."""
        mean_u = u + _code_bias(fine, u, pair, levels, strategy.digits)
        if magnitude:
            return (scale * mean_u - w.abs()) ** 2
        return (offset + scale * mean_u - w) ** 2

    def design(s: float, levels: int | None = None, w: Tensor = w, imp: Tensor = imp
               ) -> tuple[float, dict[str, Any]]:
        u, scale, offset = normalise(s, w)
        if strategy.split:
            L, var = _best_levels(identity, identity, u, imp * scale ** 2, pair,
                                  strategy.digits, reads, levels)
            fine = identity
        else:
            L = 0
            dens_u = torch.cat([u, torch.zeros_like(u)]) if pair else u
            dens_w = torch.cat([imp, imp]) if pair else imp
            curve = compander(dens_u, dens_w, bins=COMPANDER_BINS, slope_bits=CURVE_BITS) \
                if own_curve else None
            fine = CellMap(channel, kind, curve)
            var = _code_var(fine, None, u, pair, 0, 1, reads)
        var = var * scale ** 2
        b2 = bias2(fine, u, scale, offset, L, w)
        cost = float((imp * (b2 + var / reads)).sum())
        return cost, {"u": u, "scale": scale, "offset": offset, "bias2": b2, "var": var,
                      "levels": L, "fine": fine, "s": s}

    if quant_bits is not None:
        # The grid is fixed: u is the grid index, the scale the channel's range, no clipping.
        scale = step * qmax
        if magnitude:
            u = (w.abs() / scale).clamp(max=1)
            offset = zeros
        else:
            u = ((w / scale).clamp(-1, 1) + 1) / 2
            offset, scale = -scale, 2 * scale
        if strategy.split:
            L, var = _best_levels(identity, identity, u, imp * scale ** 2, pair,
                                  strategy.digits, reads)
        else:
            L = 0
            var = _code_var(identity, None, u, pair, 0, 1, reads)
        chosen = {"u": u, "scale": scale, "offset": offset,
                  "bias2": bias2(identity, u, scale, offset, L, w),
                  "var": var * scale ** 2, "levels": L, "fine": identity, "s": None}
        info["quant_bits"] = quant_bits
    elif strategy.sign == "offset" and not strategy.adaptive:
        lo, hi = (float(w.min()), float(w.max())) if n else (0.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        u = (w - lo) / span
        fine = identity
        if strategy.split:
            L, var = _best_levels(identity, identity, u, imp * span ** 2, False,
                                  strategy.digits, reads)
        else:
            L, var = 0, fine.var(u)
        chosen = {"u": u, "scale": zeros + span, "offset": zeros + lo,
                  "bias2": bias2(fine, u, zeros + span, zeros + lo, L, w),
                  "var": var * span ** 2, "levels": L, "fine": fine, "s": None}
        info["range"] = [lo, hi]
        side["scales"] = 2 * SCALE_BITS
    else:
        mags = w.abs()
        top = float(mags.max()) if n else 1.0
        top = top if top > 0 else 1.0
        if strategy.adaptive and n:
            qs = torch.tensor(CLIP_QUANTILES, dtype=torch.float64)
            sample = mags if n <= 1 << 24 else mags[:: n // (1 << 23)]
            cands = sorted({float(v) for v in torch.quantile(sample, qs) if float(v) > 0} | {top})
            # The search runs on a stratified sample of a large layer: every weight in the
            # top 1 % (where clipping acts), and a fixed random draw of the rest, reweighted.
            sw, simp = w, imp
            if n > SEARCH_SAMPLE:
                tail = mags >= torch.quantile(sample, 0.99)
                rest = torch.nonzero(~tail).reshape(-1)
                pick = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0)
                                           )[:SEARCH_SAMPLE]]
                sw = torch.cat([w[tail], w[pick]])
                simp = torch.cat([imp[tail], imp[pick] * (len(rest) / len(pick))])
            # Split codes: levels for the full range, the range for those levels, then the
            # levels again (a joint search would cost ~30× more for the same choice).
            levels = design(top, w=sw, imp=simp)[1]["levels"] if strategy.split else None
            best = min((design(s, levels, sw, simp) for s in cands), key=lambda t: t[0])
            s_best = best[1]["s"]
            levels = design(s_best, None, sw, simp)[1]["levels"] if strategy.split else None
            chosen = design(s_best, levels)[1]
        else:
            chosen = design(top)[1]
        info["range"] = chosen["s"]
        info["clipped"] = float((mags > chosen["s"]).double().mean()) if n else 0.0
        side["scales"] = SCALE_BITS
    if own_curve and not strategy.split:
        side["compander"] = CURVE_BITS * COMPANDER_BINS
    if strategy.split:
        side["levels"] = LEVELS_BITS
        info["levels"] = chosen["levels"]
    if strategy.sign == "digital":
        side["signs"] = n
    return LayerCode(
        name=name, shape=shape, keep=keep, target=w, scale=chosen["scale"],
        offset=chosen["offset"], u=chosen["u"], sgn=sgn, levels=chosen["levels"],
        var=chosen["var"], bias2=chosen["bias2"], step=step, qmax=qmax, rows=rows,
        side_bits=side, info=info, coarse=coarse, fine=chosen["fine"], strategy=strategy,
    )


def describe_code(code: LayerCode) -> dict[str, Any]:
    """A layer code's choices, JSON-able.

    Returns:
        Name, shape, stored weights, map, range, clipped share, levels, side bits.
    """
    return {"name": code.name, "shape": list(code.shape), **code.info,
            "side_bits": dict(code.side_bits),
            "predicted_mse_one_copy": float(code.var.mean()) if code.var.numel() else 0.0,
            "predicted_bias2": float(code.bias2.mean()) if code.bias2.numel() else 0.0,
            "mean_abs_weight": float(code.target.abs().mean()) if code.target.numel() else 0.0}
