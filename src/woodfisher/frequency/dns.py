"""Dynamic Network Surgery's rule (Guo et al., NIPS 2016), on DCT coefficients or spatial weights.

The rule, as in the official Caffe code (``compress_conv_layer.cu``): per layer, once at the
start, ``μ = mean |w|`` and ``σ = sqrt(mean w² − μ²)`` over the kept nonzero entries; then at an
iteration where the mask is updated, with ``θ = max(μ + cσ, 0)``,

* a kept entry with ``|w| ≤ 0.9 θ`` is pruned,
* a pruned entry with ``|w| > 1.1 θ`` is spliced back,
* anything else keeps its state (the 0.9/1.1 hysteresis).

The mask is updated with probability ``(1 + γ·iter)^(−power)`` and only while ``iter <
iter_stop``. The forward pass uses ``w ⊙ T``, and the gradient of the masked weights is applied
to all stored weights (pruned ones keep learning, which is what lets them come back): see
:func:`splice_gradients`. FDNP (Liu et al., NeurIPS 2018) applies the same rule to the DCT
coefficients of every kernel; BA-FDNP scales the threshold per frequency band
(:func:`band_factors`).

Ours, beside the paper's fixed ``c``: a compression target. At each update the threshold is
chosen so that the hysteresis rule keeps exactly the target count: with hysteresis scores
``e = |w| / (λ·0.9)`` for kept and ``|w| / (λ·1.1)`` for pruned entries (λ the band factor), the
rule keeps exactly the entries with ``e > θ``, so ``θ`` is the ``(K+1)``-th largest ``e``
(:func:`threshold_for_count`); the implied ``c = (θ − μ)/σ`` is reported.

Example:
    >>> m = torch.tensor([0.05, 0.5, 1.0, 0.95, 0.3])
    >>> kept = torch.tensor([True, True, True, False, False])
    >>> hysteresis_mask(m, kept, 1.0).tolist()   # 0.5 ≤ 0.9 pruned; 0.95 ≤ 1.1 stays out
    [False, False, True, False, False]
    >>> update_probability(10_000, gamma=1e-4, power=1.0)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = [
    "PRUNE_FACTOR",
    "SPLICE_FACTOR",
    "band_factors",
    "dns_moments",
    "hysteresis_mask",
    "hysteresis_scores",
    "splice_gradients",
    "threshold_for_count",
    "update_probability",
]

#: A kept entry is pruned at ``|w| ≤ PRUNE_FACTOR·θ`` (DNS's Caffe code).
PRUNE_FACTOR = 0.9
#: A pruned entry is spliced back at ``|w| > SPLICE_FACTOR·θ``.
SPLICE_FACTOR = 1.1


def dns_moments(values: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
    """DNS's layer statistics: mean and standard deviation of ``|w|`` over kept nonzero entries.

    Args:
        values: A layer's weights (or scores), any shape.
        mask: Same shape, nonzero = kept; None for all kept.

    Returns:
        ``(μ, σ)`` with ``μ = mean |w|`` and ``σ = sqrt(max(mean w² − μ², 0))``; ``(0, 0)`` when
        nothing is kept.
    """
    w = values.detach().double()
    if mask is not None:
        w = w * (mask != 0)
    nz = w != 0
    n = int(nz.sum())
    if n == 0:
        return 0.0, 0.0
    mu = float(w.abs().sum()) / n
    var = float(w.pow(2).sum()) / n - mu * mu
    return mu, math.sqrt(max(var, 0.0))


def hysteresis_mask(magnitude: Tensor, kept: Tensor, threshold: Tensor | float) -> Tensor:
    """DNS's mask update for threshold ``θ`` (broadcast, e.g. per band).

    Args:
        magnitude: ``|w|`` (or any non-negative score).
        kept: The current mask (bool or 0/1).
        threshold: ``θ = max(μ + cσ, 0)`` (times a band factor), a number or a tensor.

    Returns:
        The new bool mask: kept entries stay unless ``≤ 0.9θ``; pruned entries return if
        ``> 1.1θ``.
    """
    kept = kept != 0
    stay = magnitude > PRUNE_FACTOR * threshold
    back = magnitude > SPLICE_FACTOR * threshold
    return torch.where(kept, stay, back)


def hysteresis_scores(magnitude: Tensor, kept: Tensor, factor: Tensor | float = 1.0) -> Tensor:
    """Scores ``e`` with ``hysteresis_mask(m, kept, λθ) == (e > θ)`` for every ``θ ≥ 0``.

    Args:
        magnitude: ``|w|`` (or any non-negative score).
        kept: The current mask.
        factor: The per-entry threshold factor ``λ`` (band factors), positive.

    Returns:
        ``m / (λ·0.9)`` where kept, ``m / (λ·1.1)`` where pruned.
    """
    h = torch.where(kept != 0, PRUNE_FACTOR, SPLICE_FACTOR).to(magnitude.dtype)
    return magnitude / (h * factor)


def threshold_for_count(scores: Tensor, keep: int) -> float:
    """The threshold ``θ`` with exactly ``keep`` entries of ``scores`` strictly above it.

    Ties at the boundary keep all tied entries' fate the same (all above or all not), so the
    count can differ from ``keep`` by the number of ties.

    Args:
        scores: Any shape (flattened).
        keep: Entries to keep, ``0 ≤ keep ≤ numel``.

    Returns:
        The ``(keep+1)``-th largest score (``-inf`` when ``keep == numel``).

    Raises:
        ValueError: If ``keep`` is out of range.
    """
    flat = scores.detach().reshape(-1)
    if not 0 <= keep <= flat.numel():
        raise ValueError(f"keep must be in [0, {flat.numel()}], got {keep}")
    if keep == flat.numel():
        return -math.inf
    return float(torch.topk(flat, keep + 1, sorted=True).values[-1])


def update_probability(iteration: int, gamma: float, power: float) -> float:
    """Probability that DNS updates the masks at ``iteration``: ``(1 + γ·iter)^(−power)``.

    Args:
        iteration: The training iteration (0-based).
        gamma: DNS's γ (1e-4 in its LeNet example).
        power: DNS's power (1 in its LeNet example).

    Returns:
        A probability in (0, 1].
    """
    return float((1.0 + gamma * iteration) ** (-power))


def band_factors(k: int, slope: float) -> Tensor:
    """BA-FDNP's threshold factor per coefficient of a k×k kernel (our rule).

    ``λ_b = exp(slope · (b/(2k−2) − ½))`` for band ``b = u + v``: the highest band's threshold is
    ``e^slope`` times the lowest band's, and the mean log-factor is 0, so ``slope = 0`` is plain
    FDNP. A positive slope prunes high frequencies harder than their magnitude alone would.

    Args:
        k: Kernel size (> 1).
        slope: The log-ratio of the highest to the lowest band's threshold.

    Returns:
        A (k, k) float64 tensor of positive factors.

    Raises:
        ValueError: If ``k < 2`` or ``slope`` is not finite.
    """
    from woodfisher.frequency.dct import band_index

    if k < 2:
        raise ValueError(f"band factors need a kernel size of at least 2, got {k}")
    if not math.isfinite(slope):
        raise ValueError(f"band slope must be a finite number, got {slope}")
    beta = band_index(k).double() / (2 * k - 2)
    return torch.exp(slope * (beta - 0.5))


@contextmanager
def splice_gradients(modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Inside, the gradient of a pruned weight reaches all of ``weight_orig``, pruned entries too.

    ``torch.nn.utils.prune`` computes ``weight = weight_orig ⊙ mask``, so pruned entries get no
    gradient. DNS applies the gradient with respect to the masked weight to every stored weight;
    a forward pre-hook (run after prune's) replaces ``weight`` by the same value with a
    straight-through gradient: ``orig ⊙ mask + (orig − sg(orig)) ⊙ (1 − mask)``.

    Args:
        modules: Modules pruned with ``torch.nn.utils.prune`` (``weight_orig``/``weight_mask``).

    Yields:
        Nothing; the hooks are removed on exit.

    Raises:
        ValueError: If a module has no pruning mask.
    """
    def hook(module: nn.Module, args: object) -> None:
        orig, mask = module.weight_orig, module.weight_mask
        module.weight = orig * mask + (orig - orig.detach()) * (1 - mask)

    missing = [n for n, m in modules.items() if not hasattr(m, "weight_mask")]
    if missing:
        raise ValueError(f"splice_gradients needs pruned modules; {missing} have no weight_mask")
    handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
