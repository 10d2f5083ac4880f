"""How a normalised value ``u ∈ [0, 1]`` becomes a target conductance, and a read becomes ``û``.

Three maps, from the paper's naive storage to ours (see ``docs/storage.md``):

- ``linear``: ``g = g_min + u·(g_max − g_min)`` and back from the read, as if reads were
  exact (what naive storage does).
- ``corrected``: pre-distortion through the channel's mean curve ``μ``: the target is
  ``g = μ⁻¹(m_lo + u·(m_hi − m_lo))`` so that the *expected read* is affine in ``u``, and the
  affine decode is unbiased, also for the mean of several reads.
- ``companded``: values are spread in the channel's noise-normalised coordinate
  ``z(m) = ∫ dm / σ(m)`` (σ of a read whose mean is ``m``) with a compander ``C``:
  ``z = z_tot·C(u)``. The decoded ``û`` has variance ``1 / (z_tot·C'(u))²`` per read, so for
  values drawn with density ``p`` the mean variance ``∫ p / (z_tot C')²`` is least for
  ``C' ∝ p^{1/3}`` (Bennett's companding law; Lagrange on ``∫ C' = 1``). A uniform ``C`` gives
  levels equally spaced in units of noise, which is what discrete levels want.

Example:
    >>> import torch
    >>> from woodfisher.storage.channel import gaussian_channel
    >>> m = CellMap(gaussian_channel(snr_db=40.0), "corrected")
    >>> m.encode(torch.tensor([0.0, 0.5, 1.0]))
    tensor([ 0.0000, 12.5000, 25.0000], dtype=torch.float64)
    >>> float(m.decode(m.encode(torch.tensor(0.25))))
    0.25
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from woodfisher.storage.channel import Channel

__all__ = ["MAPS", "CellMap", "compander"]

MAPS = ("linear", "corrected", "companded")
#: Grid of target conductances on which the companded map is tabulated.
GRID_POINTS = 1025
#: Points of the uniform read grid that tabulates the companded decode (a lookup table is
#: what a decoder would hold; it is also much faster than two searches per read).
DECODE_POINTS = 8193


def _interp_extrap(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear ``fp(xp)`` at ``x`` (``xp`` increasing), extended by the end slopes."""
    x = torch.as_tensor(x, dtype=torch.float64)
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def compander(
    u: Tensor | None = None,
    weights: Tensor | None = None,
    bins: int = 16,
    smooth: float = 0.5,
    floor: float = 0.1,
    slope_bits: int = 8,
) -> tuple[Tensor, Tensor]:
    """A monotone compander ``C`` on ``[0, 1]`` with slope ``∝ p^{1/3}``.

    ``p`` is the (weighted) histogram of ``u`` on ``bins`` bins, smoothed by a Gaussian of
    ``smooth`` bins and mixed with ``floor`` of the uniform density: a read that strays into an
    empty stretch must not be magnified without bound, and the local error model needs ``C'`` to
    vary slowly on the scale of the noise. The slopes are rounded to ``slope_bits`` bits
    (relative to the largest), which is what the decoder is given. With ``u=None`` the
    compander is the identity.

    Args:
        u: Values in ``[0, 1]``.
        weights: Importance of each value (default 1).
        bins: Histogram bins.
        smooth: Gaussian smoothing width in bins (0: none).
        floor: Share of the uniform density mixed in, in ``(0, 1]``.
        slope_bits: Bits of each stored slope.

    Returns:
        ``(edges, values)``: ``C(edges[j]) = values[j]``, both (bins + 1,), from 0 to 1.
    """
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    if u is None or u.numel() == 0:
        return edges, edges.clone()
    u = u.to(torch.float64).clamp(0, 1)
    w = torch.ones_like(u) if weights is None else weights.to(torch.float64)
    idx = (u * bins).long().clamp(max=bins - 1)
    hist = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, w)
    if smooth > 0:
        half = max(1, int(math.ceil(3 * smooth)))
        k = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float64) / smooth) ** 2)
        padded = torch.nn.functional.pad(hist[None, None], (half, half), mode="reflect"
                                         ) if bins > half else hist[None, None]
        hist = torch.nn.functional.conv1d(padded, (k / k.sum())[None, None]).reshape(-1)[:bins]
    total = float(hist.sum())
    p = hist / total if total > 0 else torch.full_like(hist, 1 / bins)
    p = (1 - floor) * p + floor / bins
    slope = p.pow(1 / 3)
    levels = 2**slope_bits - 1
    slope = (slope / slope.max() * levels).round().clamp(min=1)
    values = torch.cat([torch.zeros(1, dtype=torch.float64), slope.cumsum(0)]) / slope.sum()
    values[-1] = 1.0
    return edges, values


def _grid(channel: Channel, z: bool = False) -> Any:
    """Targets, mean reads and stds on a fine grid (or the noise coordinate ``z``), cached on
    the channel (they depend on nothing else)."""
    cache = channel.__dict__.setdefault("_cellmap_grid", {})
    if "g" not in cache:
        g = torch.linspace(channel.g_min, channel.g_max, GRID_POINTS, dtype=torch.float64)
        m = channel.mean(g)
        if not bool((m[1:] > m[:-1]).all()):
            i = int(torch.nonzero(m[1:] <= m[:-1])[0])
            raise ValueError(
                f"the mean read of channel {channel.name!r} does not increase at "
                f"g={float(g[i]):g} µS, so reads cannot be decoded; use a monotone channel"
            )
        s = channel.std(g).clamp(min=1e-9 * (channel.g_max - channel.g_min))
        dz = 0.5 * (1 / s[1:] + 1 / s[:-1]) * (m[1:] - m[:-1])
        cache["g"] = (g, m, s)
        cache["z"] = torch.cat([torch.zeros(1, dtype=torch.float64), dz.cumsum(0)])
    return cache["z"] if z else cache["g"]


class CellMap:
    """Map between normalised values and one cell of a channel.

    Args:
        channel: The cell.
        kind: ``"linear"``, ``"corrected"`` or ``"companded"`` (see the module docstring).
        curve: ``(edges, values)`` of the compander for ``"companded"``; identity by default.

    Raises:
        ValueError: If ``kind`` is unknown or the channel's mean read does not increase.
    """

    def __init__(self, channel: Channel, kind: str = "corrected",
                 curve: tuple[Tensor, Tensor] | None = None) -> None:
        if kind not in MAPS:
            raise ValueError(f"unknown map {kind!r}; choose from {list(MAPS)}")
        self.channel, self.kind = channel, kind
        g, m, s = _grid(channel)
        self._g, self._m, self._s = g, m, s
        self.m_lo, self.m_hi = float(m[0]), float(m[-1])
        self._z = _grid(channel, z=True)
        self.z_tot = float(self._z[-1])
        self.curve = compander() if curve is None else curve
        self._slopes = (self.curve[1][1:] - self.curve[1][:-1]) / (
            self.curve[0][1:] - self.curve[0][:-1])
        self._lut: Tensor | None = None

    # -- the three maps ----------------------------------------------------------------------
    def mean_read(self, u: Tensor) -> Tensor:
        """The read value that decodes to ``u`` (for ``corrected``/``companded``: the expected
        read of ``encode(u)``; for ``linear``: the nominal target).

        Returns:
            float64 tensor of ``u``'s shape.
        """
        u = torch.as_tensor(u, dtype=torch.float64)
        c = self.channel
        if self.kind == "linear":
            return c.g_min + u * (c.g_max - c.g_min)
        if self.kind == "corrected":
            return self.m_lo + u * (self.m_hi - self.m_lo)
        z = _interp_extrap(u, *self.curve) * self.z_tot
        return _interp_extrap(z, self._z, self._m)

    def encode(self, u: Tensor) -> Tensor:
        """Target conductances for values ``u`` (clamped to ``[0, 1]``).

        Returns:
            float64 targets in ``[g_min, g_max]``.
        """
        u = torch.as_tensor(u, dtype=torch.float64).clamp(0, 1)
        if self.kind == "linear":
            return self.mean_read(u)
        m = self.mean_read(u).clamp(self.m_lo, self.m_hi)
        g = _interp_extrap(m, self._m, self._g)
        return g.clamp(self.channel.g_min, self.channel.g_max)

    def decode(self, y: Tensor) -> Tensor:
        """Values ``û`` from (mean) reads ``y``; not clamped, so that the decode stays unbiased.

        Returns:
            float64 tensor of ``y``'s shape.
        """
        y = torch.as_tensor(y, dtype=torch.float64)
        c = self.channel
        if self.kind == "linear":
            return (y - c.g_min) / (c.g_max - c.g_min)
        if self.kind == "corrected":
            return (y - self.m_lo) / (self.m_hi - self.m_lo)
        if self._lut is None:
            pad = 8 * float(self._s.max())
            self._y0 = self.m_lo - pad
            self._dy = (self.m_hi - self.m_lo + 2 * pad) / (DECODE_POINTS - 1)
            grid = self._y0 + self._dy * torch.arange(DECODE_POINTS, dtype=torch.float64)
            self._lut = self._decode_exact(grid)
        pos = (y - self._y0) / self._dy
        i = pos.floor().clamp(0, DECODE_POINTS - 2)
        t = pos - i
        lo = self._lut[i.long()]
        return lo + t * (self._lut[i.long() + 1] - lo)

    def _decode_exact(self, y: Tensor) -> Tensor:
        z = _interp_extrap(y, self._m, self._z)
        return _interp_extrap(z / self.z_tot, self.curve[1], self.curve[0])

    def bias(self, u: Tensor) -> Tensor:
        """Deterministic decode error at ``u``: ``decode(E[read]) − u``.

        Pre-distorted maps (``corrected``, ``companded``) aim the expected read exactly, so
        their bias is 0 (the companded decode keeps a second-order bias ``O(σ²)``, left out).

        Returns:
            float64 tensor of ``u``'s shape.
        """
        u = torch.as_tensor(u, dtype=torch.float64).clamp(0, 1)
        if self.kind != "linear":
            return torch.zeros_like(u)
        return self.decode(self.channel.mean(self.encode(u))) - u

    def read_std(self, u: Tensor) -> Tensor:
        """Std of one read of ``encode(u)``.

        Returns:
            float64 tensor of ``u``'s shape.
        """
        return self.channel.std(self.encode(u))

    def var(self, u: Tensor) -> Tensor:
        """Variance of ``û`` decoded from one read of ``encode(u)`` (local linearisation).

        Returns:
            float64 tensor of ``u``'s shape.
        """
        u = torch.as_tensor(u, dtype=torch.float64).clamp(0, 1)
        c = self.channel
        if self.kind == "linear":
            return (self.read_std(u) / (c.g_max - c.g_min)) ** 2
        if self.kind == "corrected":
            return (self.read_std(u) / (self.m_hi - self.m_lo)) ** 2
        j = (u * (len(self._slopes))).long().clamp(max=len(self._slopes) - 1)
        return 1.0 / (self.z_tot * self._slopes[j]) ** 2

    def level_error(self, levels: int, reads: float = 1.0) -> Tensor:
        """Probability that level ``k/(levels−1)`` is decoded as another level.

        The decode rounds ``û`` to the nearest level, so the decision thresholds in the read
        domain are ``mean_read`` of the midpoints; reads are Gaussian around ``μ(encode(u))``
        with std ``σ/√reads`` (``reads`` averaged).

        Args:
            levels: Number of levels (>= 2).
            reads: Reads averaged per decision.

        Returns:
            (levels,) probabilities.
        """
        u = torch.linspace(0, 1, levels, dtype=torch.float64)
        mu = self.channel.mean(self.encode(u))
        sd = (self.read_std(u) / math.sqrt(reads)).clamp(min=1e-300)
        mid = self.mean_read((u[1:] + u[:-1]) / 2)
        below = torch.zeros(levels, dtype=torch.float64)
        above = torch.zeros(levels, dtype=torch.float64)
        below[1:] = 0.5 * torch.erfc((mu[1:] - mid) / sd[1:] / math.sqrt(2))
        above[:-1] = 0.5 * torch.erfc((mid - mu[:-1]) / sd[:-1] / math.sqrt(2))
        return below + above

    def describe(self) -> dict[str, Any]:
        """The map, JSON-able.

        Returns:
            ``kind``, the mean-read range and ``z_tot`` (range in units of read noise).
        """
        return {"kind": self.kind, "mean_read_range": [self.m_lo, self.m_hi],
                "z_tot": self.z_tot}
