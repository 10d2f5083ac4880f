"""Cheap memorization proxies from one trained model, and how well they rank the estimate.

Feldman & Zhang's estimate needs hundreds of training runs. An influence-function view gives a
one-model proxy: removing example ``i`` from ``n`` moves the weights by about
``(1/n) H⁻¹ g_i`` and its own loss by about ``(1/n) g_iᵀ H⁻¹ g_i``, the *self-influence*.
Ours uses the WoodFisher block-wise inverse empirical Fisher for ``H⁻¹``
(:func:`woodfisher.fisher_inverse`); the diagonal Fisher and the identity (squared gradient
norm) are the cheaper baselines, and the loss and the margin of the trained model the
cheapest. Every proxy is oriented so that larger means "more memorized".

Example:
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> X, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    >>> s = self_influence(net, X, y, num_grads=40, block_size=32)
    >>> s.shape, bool((s >= 0).all())
    (torch.Size([40]), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from woodfisher.curvature import CURVATURES, fisher_inverse
from woodfisher.gradients import sample_gradients
from woodfisher.longtail.stats import auroc, spearman

__all__ = ["SELF_INFLUENCE_METHODS", "margins", "proxy_scores", "rank_agreement",
           "self_influence", "self_influences"]

#: Curvatures :func:`self_influence` accepts; ``"identity"`` gives the squared gradient norm.
SELF_INFLUENCE_METHODS = (*CURVATURES, "identity")


def _fisher_batches(X: Tensor, y: Tensor, n: int, seed: int, batch: int = 100) -> list:
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:n]
    return [(X[order[s : s + batch]], y[order[s : s + batch]]) for s in range(0, n, batch)]


def self_influence(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    method: str = "woodfisher",
    *,
    fisher_data: Any = None,
    num_grads: int | None = None,
    block_size: int | None = 500,
    damp: float | None = None,
    relative_damp: float | None = None,
    chunk_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Self-influence ``g_iᵀ F⁻¹ g_i`` of every example under a trained model.

    ``g_i`` is the loss gradient of example ``i`` with respect to the Linear/Conv weights;
    ``F⁻¹`` is built once by :func:`woodfisher.fisher_inverse` from ``fisher_data`` (default:
    ``num_grads`` examples of ``(X, y)`` drawn with ``seed``), then applied to the gradients a
    chunk at a time, so memory stays at ``chunk_size × d`` besides the operator.

    Args:
        model: The trained model (evaluated in eval mode).
        X: (n, ...) inputs.
        y: (n,) labels.
        method: ``"woodfisher"``, ``"diagonal"``, ``"kfac"`` or ``"identity"`` (``‖g_i‖²``).
        fisher_data: Batches for the Fisher; default a seeded sample of ``(X, y)``.
        num_grads: Gradients in the Fisher (default ``min(500, n)``).
        block_size: WoodFisher block size (None for one full block).
        damp: Absolute damp.
        relative_damp: Damp relative to the Fisher's mean diagonal (default 1e-2).
        chunk_size: Examples whose gradients are held at once.
        seed: Seed of the Fisher's sample.
        progress: Show progress bars.

    Returns:
        (n,) float64 self-influence.

    Raises:
        ValueError: On an unknown method or bad data.
    """
    return self_influences(model, X, y, (method,), fisher_data=fisher_data,
                           num_grads=num_grads, block_size=block_size, damp=damp,
                           relative_damp=relative_damp, chunk_size=chunk_size, seed=seed,
                           progress=progress)[method]


def self_influences(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    methods: Sequence[str],
    *,
    fisher_data: Any = None,
    num_grads: int | None = None,
    block_size: int | None = 500,
    damp: float | None = None,
    relative_damp: float | None = None,
    chunk_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """:func:`self_influence` for several curvatures, computing each gradient once.

    Args:
        model: The trained model.
        X: (n, ...) inputs.
        y: (n,) labels.
        methods: Names from :data:`SELF_INFLUENCE_METHODS`.
        fisher_data: See :func:`self_influence` (also the other options).
        num_grads: Gradients in each Fisher.
        block_size: WoodFisher block size.
        damp: Absolute damp.
        relative_damp: Relative damp.
        chunk_size: Examples whose gradients are held at once.
        seed: Seed of the Fisher's sample.
        progress: Show progress bars.

    Returns:
        Method name to (n,) float64 self-influence.

    Raises:
        ValueError: On an unknown method or bad data.
    """
    unknown = [m for m in methods if m not in SELF_INFLUENCE_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown self-influence method(s) {unknown or list(methods)}; choose "
                         f"from {list(SELF_INFLUENCE_METHODS)}")
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X and y must hold the same positive number of examples, got "
                         f"{len(X)} and {len(y)}")
    m = num_grads or min(500, len(X))
    data = fisher_data if fisher_data is not None else _fisher_batches(X, y, m, seed)
    ops = {}
    for method in methods:
        if method == "identity":
            ops[method] = None
            continue
        opts: dict[str, Any] = {"num_grads": m, "damp": damp, "relative_damp": relative_damp}
        if method == "woodfisher":
            opts["block_size"] = block_size
        if method == "kfac":  # K-FAC counts batches and takes an absolute damp only
            opts = {"num_grads": len(data) if hasattr(data, "__len__") else None, "damp": damp}
        ops[method] = fisher_inverse(model, data, method, seed=seed, progress=progress, **opts)
    params = next((op.modules for op in ops.values() if op is not None), None)
    out = {method: torch.empty(len(X), dtype=torch.float64) for method in methods}
    for s in range(0, len(X), chunk_size):
        xs, ys = X[s : s + chunk_size], y[s : s + chunk_size]
        G = sample_gradients(model, (xs, ys), num_grads=len(xs), params=params)
        for method, op in ops.items():
            if op is None:
                out[method][s : s + len(xs)] = G.double().pow(2).sum(1)
            else:
                Q = op.mul(G.T)
                out[method][s : s + len(xs)] = (G.T.to(Q.dtype) * Q).sum(0).double()
    return out


@torch.no_grad()
def margins(model: nn.Module, X: Tensor, y: Tensor, batch_size: int = 2048) -> dict[str, Tensor]:
    """Loss, margin and predictions of a trained model on every example.

    The margin is the true class's logit minus the largest other logit (negative when the
    model is wrong).

    Args:
        model: The model (set to eval mode).
        X: (n, ...) inputs.
        y: (n,) labels.
        batch_size: Examples per forward pass.

    Returns:
        ``{"loss", "margin", "prediction"}``, each (n,).
    """
    model.eval()
    logits = torch.cat([model(X[s : s + batch_size]) for s in range(0, len(X), batch_size)])
    logits = logits.double()
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), -math.inf).amax(1)
    loss = nn.functional.cross_entropy(logits, y, reduction="none")
    return {"loss": loss, "margin": true - other, "prediction": logits.argmax(1)}


def proxy_scores(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    methods: tuple[str, ...] = ("woodfisher", "diagonal", "identity"),
    **fisher_options: Any,
) -> dict[str, Tensor]:
    """Every proxy for one trained model, each oriented so that larger = more memorized.

    Args:
        model: The trained model.
        X: (n, ...) inputs.
        y: (n,) labels.
        methods: Self-influence curvatures to compute.
        **fisher_options: Passed to :func:`self_influence`.

    Returns:
        ``{"loss", "negative margin", "self-influence (METHOD)", ...}``, each (n,) float64.
    """
    base = margins(model, X, y)
    out = {"loss": base["loss"], "negative margin": -base["margin"]}
    scores = self_influences(model, X, y, methods, **fisher_options) if methods else {}
    out.update({f"self-influence ({m})": v for m, v in scores.items()})
    return out


def rank_agreement(
    proxies: dict[str, Tensor], scores: Tensor, top: float = 0.1
) -> dict[str, dict[str, float]]:
    """How well each proxy ranks a memorization estimate.

    Args:
        proxies: Name to (n,) proxy (larger = more memorized).
        scores: (n,) memorization estimates (NaNs are left out).
        top: The "highly memorized" fraction for the AUROC (0.1: the top decile).

    Returns:
        Name to ``{"spearman", "spearman_p", "auroc_top", "top_count"}``: Spearman's ρ with the
        scores, and the AUROC of the proxy for telling the scores above the ``1 - top``
        quantile (the top decile for 0.1) from the rest.

    Raises:
        ValueError: If ``top`` is not in (0, 1) or lengths differ.
    """
    if not 0 < top < 1:
        raise ValueError(f"top must be a fraction in (0, 1), got {top}")
    s = np.asarray(scores, float)
    ok = ~np.isnan(s)
    cut = np.quantile(s[ok], 1 - top)
    # Scores pile up at 0 (never memorized), so "the top decile" is the scores strictly above
    # the 90th percentile (at most 10 %), falling back to >= only if none is above.
    high = s[ok] > cut
    if not high.any():
        high = s[ok] >= cut
    out = {}
    for name, p in proxies.items():
        p = np.asarray(p, float)
        if len(p) != len(s):
            raise ValueError(f"proxy {name!r} has {len(p)} values for {len(s)} scores")
        rho = spearman(p[ok], s[ok])
        out[name] = {"spearman": rho["rho"], "spearman_p": rho["p"],
                     "auroc_top": auroc(p[ok], high), "top_count": int(high.sum())}
    return out
