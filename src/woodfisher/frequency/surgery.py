"""The stateful side of dynamic pruning: one :class:`DynamicPruner` holds every layer's mask state.

Masks are ``torch.nn.utils.prune`` state (``weight_orig``/``weight_mask``) on each selected
module, so a model in the middle of dynamic pruning is an ordinary pruned model: it saves,
loads, evaluates and bakes like any other. The pruner adds what DNS needs beyond the mask: the
layer statistics ``(μ, σ)``, the per-coefficient band factors of BA-FDNP, and optional
second-order score scales (:mod:`woodfisher.frequency.saliency`).

Example:
    >>> from woodfisher.frequency.layers import DCTConv2d
    >>> _ = torch.manual_seed(0)
    >>> conv = DCTConv2d(4, 8, 3)
    >>> pruner = DynamicPruner({"conv": conv}, band_slope=1.0)
    >>> pruner.update(density=0.25)
    >>> pruner.kept()
    {'conv': 72}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from woodfisher.frequency.dns import (
    band_factors,
    dns_moments,
    hysteresis_mask,
    hysteresis_scores,
    threshold_for_count,
)
from woodfisher.frequency.layers import DCTConv2d

__all__ = ["ALLOCATIONS", "DynamicPruner", "band_kept_fractions"]

#: How a compression target is shared between layers: ``"score"`` — one threshold on the raw
#: scores of all layers (global magnitude, or global OBS saliency with the second-order
#: criterion); ``"global"`` — one ``c`` for all layers (each layer's scores in units of its own
#: ``σ`` from its ``μ``, DNS's normalisation); ``"uniform"`` — every layer at the target ratio.
ALLOCATIONS = ("score", "global", "uniform")


def band_kept_fractions(module: nn.Module) -> list[float]:
    """Fraction of coefficients kept in each band ``u + v`` of a DCTConv2d.

    Args:
        module: A DCTConv2d (pruned or not).

    Returns:
        One fraction per band (2k−1 of them, low to high frequency).
    """
    from woodfisher.frequency.dct import band_index, band_sizes

    k = module.kernel_size[0]
    mask = getattr(module, "weight_mask", None)
    kept = torch.ones(k, k) if mask is None else (mask != 0).double().mean(dim=(0, 1)).cpu()
    sums = torch.bincount(band_index(k).reshape(-1), weights=kept.reshape(-1).double(),
                          minlength=2 * k - 1)
    return (sums / torch.tensor(band_sizes(k), dtype=torch.float64)).tolist()


class DynamicPruner:
    """DNS masks of a set of modules, updated by the rule of :mod:`woodfisher.frequency.dns`.

    Args:
        modules: Module name to module (Conv2d or DCTConv2d); each gets an all-ones
            ``torch.nn.utils.prune`` mask if it has none.
        c: DNS's ``c`` for updates without a target (``θ = max(μ + cσ, 0)``).
        allocation: How a target is shared, one of :data:`ALLOCATIONS`.
        band_slope: BA-FDNP's slope (:func:`~woodfisher.frequency.dns.band_factors`), applied
            to DCTConv2d layers; 0 for plain FDNP (and always for spatial layers).

    Raises:
        ValueError: If ``allocation`` is unknown or ``modules`` is empty.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        c: float = 0.0,
        allocation: str = "score",
        band_slope: float = 0.0,
    ) -> None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}; choose from {list(ALLOCATIONS)}")
        if not modules:
            raise ValueError("dynamic pruning needs at least one layer; none was selected")
        self.modules = dict(modules)
        self.c = float(c)
        self.allocation = allocation
        self.factors: dict[str, Tensor | float] = {}
        for name, mod in self.modules.items():
            if not hasattr(mod, "weight_mask"):
                prune.custom_from_mask(mod, "weight", torch.ones_like(mod.weight))
            w = mod.weight_orig
            if isinstance(mod, DCTConv2d) and band_slope != 0:
                self.factors[name] = band_factors(mod.kernel_size[0], band_slope).to(w)
            else:
                self.factors[name] = 1.0
        self.scales: dict[str, Tensor] = {}
        self.moments: dict[str, tuple[float, float]] = {}
        self.layer_c: dict[str, float] = {}

    # -- scores ----------------------------------------------------------------------------
    def scores(self, name: str) -> Tensor:
        """The layer's score: ``|w|``, times the second-order scale when one is set.

        Returns:
            A non-negative tensor of the weight's shape (detached).
        """
        s = self.modules[name].weight_orig.detach().abs()
        scale = self.scales.get(name)
        return s * scale if scale is not None else s

    def set_scales(self, scales: Mapping[str, Tensor] | None) -> None:
        """Score entries by ``|w|·scale`` (e.g. ``1/sqrt([F⁻¹]_qq)``); None for ``|w|``.

        The layer statistics are recomputed, since they are statistics of the scores.

        Args:
            scales: Module name to a positive tensor of the weight's shape, or None.
        """
        self.scales = {n: s.detach() for n, s in (scales or {}).items()}
        self.init_moments()

    def init_moments(self) -> None:
        """Take DNS's ``(μ, σ)`` of every layer's scores over its kept entries (once, at start)."""
        self.moments = {
            n: dns_moments(self.scores(n), m.weight_mask) for n, m in self.modules.items()
        }

    # -- the update ------------------------------------------------------------------------
    def masks(self) -> dict[str, Tensor]:
        """Current masks (bool) by module name.

        Returns:
            Module name to a bool tensor of the weight's shape.
        """
        return {n: m.weight_mask != 0 for n, m in self.modules.items()}

    def kept(self) -> dict[str, int]:
        """Entries kept per layer.

        Returns:
            Module name to a count.
        """
        return {n: int(mask.sum()) for n, mask in self.masks().items()}

    @torch.no_grad()
    def update(self, density: float | None = None) -> None:
        """One DNS mask update of every layer.

        Args:
            density: Fraction of entries to keep over all layers (a compression target); None
                for DNS's own rule with ``θ = max(μ + cσ, 0)``.

        Raises:
            ValueError: If ``density`` is outside (0, 1].
        """
        if not self.moments:
            self.init_moments()
        if density is None:
            new = {}
            for n, mod in self.modules.items():
                mu, sigma = self.moments[n]
                theta = max(mu + self.c * sigma, 0.0)
                new[n] = hysteresis_mask(self.scores(n), mod.weight_mask,
                                         theta * self.factors[n])
                self.layer_c[n] = self.c
        elif not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        elif self.allocation == "score":
            e = {n: hysteresis_scores(self.scores(n), mod.weight_mask, self.factors[n])
                 for n, mod in self.modules.items()}
            flat = torch.cat([t.reshape(-1) for t in e.values()])
            theta = threshold_for_count(flat, max(1, round(density * flat.numel())))
            new = {n: t > theta for n, t in e.items()}
            self.layer_c = {n: self._implied_c(n, theta) for n in e}
        elif self.allocation == "uniform":
            new = {}
            for n, mod in self.modules.items():
                e = hysteresis_scores(self.scores(n), mod.weight_mask, self.factors[n])
                theta = threshold_for_count(e, max(1, round(density * e.numel())))
                new[n] = e > theta
                self.layer_c[n] = self._implied_c(n, theta)
        else:
            z = {}
            for n, mod in self.modules.items():
                e = hysteresis_scores(self.scores(n), mod.weight_mask, self.factors[n])
                mu, sigma = self.moments[n]
                z[n] = (e - mu) / (sigma if sigma > 0 else 1.0)
            flat = torch.cat([t.reshape(-1) for t in z.values()])
            c = threshold_for_count(flat, max(1, round(density * flat.numel())))
            new = {n: t > c for n, t in z.items()}
            self.layer_c = {n: c for n in z}
        for n, mask in new.items():
            self.modules[n].weight_mask.copy_(mask)

    def _implied_c(self, name: str, theta: float) -> float:
        mu, sigma = self.moments[name]
        if not math.isfinite(theta):
            return -math.inf
        return (theta - mu) / sigma if sigma > 0 else 0.0

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs beyond the model: statistics, implied ``c`` and score scales.

        Returns:
            Plain values and tensors (loadable with ``weights_only=True``).
        """
        return {
            "moments": {n: list(v) for n, v in self.moments.items()},
            "layer_c": dict(self.layer_c),
            "scales": {n: s.cpu().clone() for n, s in self.scales.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (masks come back with the model's state dict).

        Args:
            state: A dict from :meth:`state_dict`.
        """
        self.moments = {n: (float(v[0]), float(v[1])) for n, v in state["moments"].items()}
        self.layer_c = {n: float(v) for n, v in state["layer_c"].items()}
        self.scales = {
            n: s.to(self.modules[n].weight_orig) for n, s in state.get("scales", {}).items()
        }
