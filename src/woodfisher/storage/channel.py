"""Analog memory cells as seeded channels: a programmed conductance in, a noisy read out.

A :class:`Channel` is a callable on target conductances ``g`` in µS (inside its range
``[g_min, g_max]``) that returns one noisy read per target. Besides sampling, a channel knows
the statistics of one read, ``mean(g)`` and ``std(g)``: the coding strategies use them to place
values where the cell is reliable and to correct the decode (the read-out electronics of a real
device are calibrated the same way, by programming each level many times and reading it back).

Channels (see ``docs/storage.md`` for the sources):

- :func:`pcm_channel` (the default): the phase-change-memory model of IBM's aihwkit
  (``PCMLikeNoiseModel``, Nandakumar et al. ICECS 2019). Programming noise
  ``σ(ĝ) = max(−1.1731 ĝ² + 1.9650 ĝ + 0.2635, 0)`` µS for ``ĝ = g/g_max``, ``g_max = 25`` µS,
  reads clipped at 0 µS; optionally drift ``g·(t/t₀)^(−ν)`` at ``drift_time`` seconds after
  programming and accumulated 1/f read noise, as aihwkit models them.
- :func:`gaussian_channel`: ``y = g + N(0, σ²)`` with ``σ`` set by a signal-to-noise ratio.
- :func:`table_channel`: a measured table (mean and std of the reads per programmed level),
  linearly interpolated between levels; reads are Gaussian with those moments.

Example:
    >>> import torch
    >>> read = pcm_channel(seed=0)
    >>> y = read(torch.full((100000,), 12.5))
    >>> round(float(y.mean()), 1), round(float(y.std()), 2)
    (12.5, 0.96)
    >>> round(float(read.std(torch.tensor([0.0, 25.0]))[1]), 3)  # σ at g_max
    1.055
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHANNELS",
    "Channel",
    "GaussianChannel",
    "PCMChannel",
    "TableChannel",
    "gaussian_channel",
    "make_channel",
    "pcm_channel",
    "table_channel",
]

#: Reference g_max of aihwkit's programming-noise fit (µS).
PCM_G_MAX = 25.0
#: aihwkit's programming-noise polynomial in ĝ = g/g_max: c0 + c1 ĝ + c2 ĝ².
PCM_PROG_COEFF = (0.26348, 1.9650, -1.1731)
#: Levels and reads per level used to characterise a channel whose moments have no closed form.
CHARACTERISE_LEVELS = 129
CHARACTERISE_READS = 20000
CHARACTERISE_SEED = 20240601
# Characterisations by channel parameters (seed excluded): every channel with the same
# parameters gets the same table, computed once per process.
_TABLES: dict[str, tuple[Tensor, Tensor, Tensor]] = {}


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``fp(xp)`` at ``x`` (``xp`` increasing), clamped ends."""
    x = x.to(xp.dtype)
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    t = ((x.clamp(xp[0], xp[-1]) - x0) / (x1 - x0)).clamp(0, 1)
    return f0 + t * (f1 - f0)


def _normal_pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2))


class Channel:
    """A seeded model of one kind of analog cell.

    Subclasses implement :meth:`_sample` and, where they have closed forms, :meth:`mean` and
    :meth:`std`; otherwise the moments come from a Monte-Carlo characterisation with a fixed
    seed (:data:`CHARACTERISE_LEVELS` levels × :data:`CHARACTERISE_READS` reads).

    Args:
        g_min: Lowest target conductance (µS).
        g_max: Highest target conductance (µS).
        seed: Seed of the channel's own generator (used when no generator is passed).

    Attributes:
        name: Short name used in reports.
    """

    name = "channel"

    def __init__(self, g_min: float, g_max: float, seed: int = 0) -> None:
        if not (math.isfinite(g_min) and math.isfinite(g_max)) or not g_max > g_min:
            raise ValueError(
                f"a channel needs finite g_min < g_max, got g_min={g_min!r}, g_max={g_max!r}"
            )
        self.g_min, self.g_max, self.seed = float(g_min), float(g_max), int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._table: tuple[Tensor, Tensor, Tensor] | None = None

    # -- sampling ---------------------------------------------------------------------------
    def __call__(self, g: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noisy reads of the targets ``g`` (µS), one read per entry.

        Args:
            g: Target conductances in ``[g_min, g_max]``.
            generator: Source of randomness; the channel's own seeded generator by default.

        Returns:
            Reads (float64, ``g``'s shape).

        Raises:
            ValueError: If a target is not finite or outside ``[g_min, g_max]``.
        """
        g = torch.as_tensor(g, dtype=torch.float64)
        self.check_targets(g)
        return self._sample(g, self.generator if generator is None else generator)

    def check_targets(self, g: Tensor) -> None:
        """Raise unless every target is finite and inside the channel's range.

        Raises:
            ValueError: Naming the offending value and the range.
        """
        if g.numel() == 0:
            return
        if not torch.isfinite(g).all():
            raise ValueError("target conductances contain NaN or Inf")
        lo, hi = float(g.min()), float(g.max())
        tol = 1e-9 * (self.g_max - self.g_min)
        if lo < self.g_min - tol or hi > self.g_max + tol:
            raise ValueError(
                f"target conductances must lie in [{self.g_min:g}, {self.g_max:g}] µS for "
                f"{self.name}, got values in [{lo:g}, {hi:g}]; map the weights into the range"
            )

    def _sample(self, g: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    # -- statistics of one read --------------------------------------------------------------
    def table(self) -> tuple[Tensor, Tensor, Tensor]:
        """The channel's characterisation: levels, mean and std of the reads at each level.

        Returns:
            Three float64 tensors of equal length (levels increasing from g_min to g_max).
        """
        if self._table is None:
            key = repr(sorted((k, v) for k, v in self.describe().items() if k != "seed"))
            if key not in _TABLES:
                levels = torch.linspace(self.g_min, self.g_max, CHARACTERISE_LEVELS,
                                        dtype=torch.float64)
                gen = torch.Generator().manual_seed(CHARACTERISE_SEED)
                reads = self._sample(levels.repeat(CHARACTERISE_READS, 1), gen)
                _TABLES[key] = (levels, reads.mean(0), reads.std(0))
            self._table = _TABLES[key]
        return self._table

    def mean(self, g: Tensor) -> Tensor:
        """Expected read of target ``g``.

        Returns:
            float64 tensor of ``g``'s shape.
        """
        levels, means, _ = self.table()
        return _interp(torch.as_tensor(g, dtype=torch.float64), levels, means)

    def std(self, g: Tensor) -> Tensor:
        """Standard deviation of one read of target ``g``.

        Returns:
            float64 tensor of ``g``'s shape.
        """
        levels, _, stds = self.table()
        return _interp(torch.as_tensor(g, dtype=torch.float64), levels, stds)

    def describe(self) -> dict[str, Any]:
        """The channel's parameters, JSON-able.

        Returns:
            A dict with at least ``name``, ``g_min`` and ``g_max``.
        """
        return {"name": self.name, "g_min": self.g_min, "g_max": self.g_max, "seed": self.seed}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"


class PCMChannel(Channel):
    """aihwkit's statistical PCM model (see the module docstring); targets in [0, g_max].

    Args:
        g_max: Largest conductance in µS (the noise fit scales with ``g_max / 25``).
        read_noise: Add the accumulated 1/f read noise of aihwkit's model.
        drift_time: Seconds between the end of programming and the read (0: no drift).
        t0: Drift reference time in seconds (aihwkit: 20 s).
        t_read: Read duration of the 1/f fit in seconds (aihwkit: 250 ns).
        prog_noise_scale: Multiplier of the programming noise.
        seed: Seed of the channel's generator.
    """

    name = "pcm"

    def __init__(
        self,
        g_max: float = PCM_G_MAX,
        read_noise: bool = False,
        drift_time: float = 0.0,
        t0: float = 20.0,
        t_read: float = 250e-9,
        prog_noise_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(0.0, g_max, seed)
        for what, value in (("drift_time", drift_time), ("prog_noise_scale", prog_noise_scale)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
        for what, value in (("t0", t0), ("t_read", t_read)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        self.read_noise, self.drift_time = bool(read_noise), float(drift_time)
        self.t0, self.t_read, self.prog_noise_scale = float(t0), float(t_read), prog_noise_scale

    def prog_std(self, g: Tensor) -> Tensor:
        """Programming-noise std (µS) at target ``g``: aihwkit's polynomial, floored at 0.

        Returns:
            float64 tensor of ``g``'s shape.
        """
        gh = torch.as_tensor(g, dtype=torch.float64) / self.g_max
        c0, c1, c2 = PCM_PROG_COEFF
        poly = (c0 + c1 * gh + c2 * gh * gh).clamp(min=0)
        return self.prog_noise_scale * poly * (self.g_max / PCM_G_MAX)

    @property
    def _closed_form(self) -> bool:
        return not self.read_noise and self.drift_time == 0

    def _sample(self, g: Tensor, generator: torch.Generator) -> Tensor:
        z = torch.randn(g.shape, generator=generator, dtype=torch.float64)
        g_prog = (g + self.prog_std(g) * z).clamp(min=0)
        if self._closed_form:
            return g_prog
        t = self.drift_time + self.t0
        g_read = g_prog
        if self.drift_time > 0:
            rel = (g / self.g_max).clamp(min=1e-7).log()
            mu = (-0.0155 * rel + 0.0244).clamp(0.049, 0.1)
            sig = (-0.0125 * rel - 0.0059).clamp(0.008, 0.045)
            nu = (mu + sig * torch.randn(g.shape, generator=generator, dtype=torch.float64)).abs()
            g_read = g_prog * (t / self.t0) ** (-nu)
        if self.read_noise:
            q_s = (0.0088 / (g_prog / self.g_max).pow(0.65).clamp(min=1e-3)).clamp(max=0.2)
            sig_read = q_s * math.sqrt(math.log((t + self.t_read) / (2 * self.t_read)))
            noise = torch.randn(g.shape, generator=generator, dtype=torch.float64)
            g_read = g_read + g_read.abs() * sig_read * noise
        return g_read.clamp(min=0)

    def mean(self, g: Tensor) -> Tensor:
        """Expected read; closed form (a Gaussian clipped at 0) without drift and read noise.

        Returns:
            float64 tensor of ``g``'s shape.
        """
        if not self._closed_form:
            return super().mean(g)
        g = torch.as_tensor(g, dtype=torch.float64)
        s = self.prog_std(g).clamp(min=1e-300)
        a = g / s
        return g * _normal_cdf(a) + s * _normal_pdf(a)

    def std(self, g: Tensor) -> Tensor:
        """Std of one read; closed form without drift and read noise.

        Returns:
            float64 tensor of ``g``'s shape.
        """
        if not self._closed_form:
            return super().std(g)
        g = torch.as_tensor(g, dtype=torch.float64)
        s = self.prog_std(g).clamp(min=1e-300)
        a = g / s
        second = (g * g + s * s) * _normal_cdf(a) + g * s * _normal_pdf(a)
        return (second - self.mean(g) ** 2).clamp(min=0).sqrt()

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {**super().describe(), "read_noise": self.read_noise,
                "drift_time": self.drift_time, "t0": self.t0, "t_read": self.t_read,
                "prog_noise_scale": self.prog_noise_scale}


class GaussianChannel(Channel):
    """``y = g + N(0, σ²)`` with one σ for every level (reads are not clipped).

    Args:
        sigma: Noise std in µS.
        g_max: Range ``[0, g_max]`` µS.
        seed: Seed of the channel's generator.
    """

    name = "gaussian"

    def __init__(self, sigma: float, g_max: float = PCM_G_MAX, seed: int = 0) -> None:
        super().__init__(0.0, g_max, seed)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number of µS, got {sigma!r}")
        self.sigma = float(sigma)

    def _sample(self, g: Tensor, generator: torch.Generator) -> Tensor:
        return g + self.sigma * torch.randn(g.shape, generator=generator, dtype=torch.float64)

    def mean(self, g: Tensor) -> Tensor:  # noqa: D102
        return torch.as_tensor(g, dtype=torch.float64).clone()

    def std(self, g: Tensor) -> Tensor:  # noqa: D102
        return torch.full_like(torch.as_tensor(g, dtype=torch.float64), self.sigma)

    @property
    def snr_db(self) -> float:
        """Range-to-noise ratio ``20·log10(g_max / σ)`` in dB."""
        return 20 * math.log10(self.g_max / self.sigma)

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {**super().describe(), "sigma": self.sigma, "snr_db": self.snr_db}


class TableChannel(Channel):
    """A measured channel: mean and std of the reads at programmed levels, interpolated.

    Args:
        levels: Programmed conductances (µS), strictly increasing, at least two.
        means: Mean read at each level, strictly increasing (else the decode is ambiguous).
        stds: Std of the reads at each level, ``>= 0``.
        seed: Seed of the channel's generator.

    Raises:
        ValueError: On lengths that differ, fewer than two levels, non-finite values, levels
            or means that do not increase, or a negative std.
    """

    name = "table"

    def __init__(
        self, levels: Sequence[float], means: Sequence[float], stds: Sequence[float],
        seed: int = 0,
    ) -> None:
        lv, mu, sd = (torch.as_tensor(v, dtype=torch.float64).reshape(-1)
                      for v in (levels, means, stds))
        if not len(lv) == len(mu) == len(sd) or len(lv) < 2:
            raise ValueError(
                "a channel table needs levels, means and stds of one length >= 2, got "
                f"lengths {len(lv)}, {len(mu)}, {len(sd)}"
            )
        for what, v in (("levels", lv), ("means", mu), ("stds", sd)):
            if not torch.isfinite(v).all():
                raise ValueError(f"channel table {what} contain NaN or Inf")
        for what, v in (("levels", lv), ("means", mu)):
            bad = torch.nonzero(v[1:] <= v[:-1]).reshape(-1)
            if len(bad):
                i = int(bad[0])
                raise ValueError(
                    f"channel table {what} must increase strictly (monotone reads decode "
                    f"uniquely), but entry {i + 1} ({float(v[i + 1]):g}) <= entry {i} "
                    f"({float(v[i]):g}); merge or remove the non-monotone levels"
                )
        if (sd < 0).any():
            i = int(torch.nonzero(sd < 0)[0])
            raise ValueError(
                f"channel table stds must be >= 0, got {float(sd[i]):g} at level {float(lv[i]):g}"
            )
        super().__init__(float(lv[0]), float(lv[-1]), seed)
        self._table = (lv, mu, sd)

    def _sample(self, g: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(g.shape, generator=generator, dtype=torch.float64)
        return self.mean(g) + self.std(g) * noise

    @classmethod
    def from_csv(cls, path: str | Path, seed: int = 0) -> TableChannel:
        """Read a table from a CSV file with columns ``level,mean,std`` (header optional).

        Returns:
            The channel.

        Raises:
            ValueError: If the file cannot be read or parsed.
        """
        rows: list[list[float]] = []
        try:
            with open(path, newline="") as f:
                for i, row in enumerate(csv.reader(f)):
                    if not row or row[0].strip().startswith("#"):
                        continue
                    try:
                        rows.append([float(v) for v in row[:3]])
                    except ValueError:
                        if i == 0:  # a header line
                            continue
                        raise ValueError(
                            f"{path}:{i + 1}: expected three numbers, got {row}"
                        ) from None
        except OSError as e:
            raise ValueError(f"cannot read channel table {path}: {e.strerror}") from None
        if any(len(r) < 3 for r in rows):
            raise ValueError(f"{path}: every row needs three columns: level, mean, std")
        columns = [[r[k] for r in rows] for k in range(3)]
        return cls(*columns, seed=seed)

    def describe(self) -> dict[str, Any]:  # noqa: D102
        lv, mu, sd = self._table
        return {**super().describe(), "levels": lv.tolist(), "means": mu.tolist(),
                "stds": sd.tolist()}


def pcm_channel(
    seed: int = 0,
    *,
    g_max: float = PCM_G_MAX,
    read_noise: bool = False,
    drift_time: float = 0.0,
    prog_noise_scale: float = 1.0,
) -> PCMChannel:
    """The default channel: aihwkit's PCM programming noise, optionally drift and read noise.

    Args:
        seed: Seed of the channel's generator.
        g_max: Largest conductance (µS).
        read_noise: Add aihwkit's accumulated 1/f read noise.
        drift_time: Seconds after programming at which the cells are read (0: no drift).
        prog_noise_scale: Multiplier of the programming noise.

    Returns:
        The channel; ``pcm_channel(seed=0)(g)`` returns noisy reads of ``g``.
    """
    return PCMChannel(g_max=g_max, read_noise=read_noise, drift_time=drift_time,
                      prog_noise_scale=prog_noise_scale, seed=seed)


def gaussian_channel(snr_db: float = 30.0, seed: int = 0, *, g_max: float = PCM_G_MAX
                     ) -> GaussianChannel:
    """Additive Gaussian noise with range-to-noise ratio ``snr_db = 20·log10(g_max/σ)``.

    Args:
        snr_db: Ratio of the range to the noise std, in dB (30 dB: σ = g_max / 31.6).
        seed: Seed of the channel's generator.
        g_max: Range ``[0, g_max]`` µS.

    Returns:
        The channel.

    Raises:
        ValueError: If ``snr_db`` is not finite.
    """
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be a finite number of dB, got {snr_db!r}")
    return GaussianChannel(g_max / 10 ** (snr_db / 20), g_max=g_max, seed=seed)


def table_channel(levels: Sequence[float], means: Sequence[float], stds: Sequence[float],
                  seed: int = 0) -> TableChannel:
    """A channel from measured read statistics per programmed level (see :class:`TableChannel`).

    Returns:
        The channel.
    """
    return TableChannel(levels, means, stds, seed=seed)


#: Channel kinds :func:`make_channel` understands.
CHANNELS = ("pcm", "gaussian", "table")


def make_channel(spec: str | Channel | None, seed: int = 0) -> Channel:
    """A channel from a short text spec (what the CLI's ``--channel`` takes).

    Specs: ``pcm`` (default), ``pcm:drift=86400,read`` (drift after one day, read noise),
    ``pcm:scale=2`` (twice the programming noise), ``gaussian:snr=30`` (dB),
    ``table:FILE.csv`` (columns level, mean, std).

    Args:
        spec: The spec, a channel (returned as is) or None for ``pcm``.
        seed: Seed of the channel's generator.

    Returns:
        The channel.

    Raises:
        ValueError: On an unknown kind or option.

    Example:
        >>> make_channel("pcm:drift=3600,read").describe()["drift_time"]
        3600.0
    """
    if isinstance(spec, Channel):
        return spec
    text = (spec or "pcm").strip()
    kind, _, rest = text.partition(":")
    if kind == "table":
        if not rest:
            raise ValueError("channel 'table' needs a file: table:PATH.csv (level,mean,std)")
        return TableChannel.from_csv(rest, seed=seed)
    opts: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, _, value = part.partition("=")
        opts[key] = value
    allowed = {"pcm": {"drift", "read", "scale", "gmax"}, "gaussian": {"snr", "gmax"}}
    if kind not in allowed:
        raise ValueError(f"unknown channel {kind!r} in {text!r}; choose from {list(CHANNELS)}")
    unknown = sorted(set(opts) - allowed[kind])
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for channel {kind!r}; allowed: {sorted(allowed[kind])}"
        )

    def number(key: str, default: float) -> float:
        if key not in opts:
            return default
        try:
            return float(opts[key])
        except ValueError:
            raise ValueError(f"channel option {key}= needs a number, got {opts[key]!r}") from None

    g_max = number("gmax", PCM_G_MAX)
    if kind == "gaussian":
        return gaussian_channel(number("snr", 30.0), seed=seed, g_max=g_max)
    return pcm_channel(seed, g_max=g_max, read_noise="read" in opts,
                       drift_time=number("drift", 0.0), prog_noise_scale=number("scale", 1.0))
