"""OBS-compensated quantization (Optimal Brain Quantization, Frantar & Alistarh, NeurIPS 2022).

Weights are fixed one at a time, in order; each fixed weight's error is compensated by the
Optimal Brain Surgeon step on the weights not yet fixed, and the weight is then removed from
the inverse curvature:

.. math::

    δ = -\\frac{w_j - \\hat w_j}{[F^{-1}]_{jj}} F^{-1} e_j, \\qquad
    F^{-1} \\leftarrow F^{-1} - \\frac{F^{-1} e_j e_j^T F^{-1}}{[F^{-1}]_{jj}}.

A weight to prune is "quantized" to 0, so pruning and quantization share one routine (the
Optimal Brain Compression view); entries to zero go first, so that every quantized weight
absorbs their compensation. For a quadratic loss the result equals fixing the weights one by one
and re-solving the constrained minimum of ``½ (x − w)ᵀ F (x − w)`` each time, which is how the
tests check it. Blocks of ``F⁻¹`` never cross a layer, so layers are independent and blocks of
one size are processed together.

The grid is :func:`woodfisher.quant.fake_quantize`'s: per output channel, symmetric, its step
taken from the weights before compensation (as GPTQ does).

Example:
    >>> import torch
    >>> w = torch.tensor([[0.30, -0.92, 0.51]], dtype=torch.float64)
    >>> hinv = torch.eye(3, dtype=torch.float64)[None]  # F = I: no coupling, plain rounding
    >>> obq_blocks(w, hinv, torch.full((1, 3), 0.25, dtype=torch.float64), bits=4)
    tensor([[ 0.2500, -1.0000,  0.5000]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from woodfisher.curvature import FisherInverse
from woodfisher.params import effective_weight
from woodfisher.quant.uniform import check_bits, quant_scale

__all__ = ["obq_blocks", "obq_weights", "round_to_grid"]


def round_to_grid(w: Tensor, step: Tensor, bits: int) -> Tensor:
    """Nearest point of the symmetric grid ``step·{-q..q}`` (1 bit: ``sign(w)·step``).

    Args:
        w: Values.
        step: Grid step of each value (broadcast with ``w``).
        bits: Bit width, 1..16.

    Returns:
        The rounded values, as :func:`woodfisher.quant.fake_quantize` rounds them.
    """
    if bits == 1:
        return torch.sign(w) * step
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / step), -qmax, qmax) * step


def obq_blocks(
    w: Tensor, hinv: Tensor, step: Tensor, bits: int, zero: Tensor | None = None
) -> Tensor:
    """Quantize independent blocks with OBS compensation (the pure core).

    Args:
        w: (nb, B) weights of ``nb`` blocks.
        hinv: (nb, B, B) inverse curvature of each block (symmetric positive definite).
        step: (nb, B) grid step of each weight.
        bits: Bit width, 1..16.
        zero: (nb, B) bool, weights to set to exactly 0 (pruned) instead of rounding; they are
            fixed first.

    Returns:
        (nb, B) weights on the grid (zeros where ``zero``), in ``w``'s dtype.

    Raises:
        ValueError: If the shapes disagree.
    """
    bits = check_bits(bits)
    if w.ndim != 2 or hinv.shape != (*w.shape, w.shape[1]) or step.shape != w.shape:
        raise ValueError(
            f"expected w (nb, B), hinv (nb, B, B), step (nb, B); got {tuple(w.shape)}, "
            f"{tuple(hinv.shape)}, {tuple(step.shape)}"
        )
    nb, size = w.shape
    zero = torch.zeros_like(w, dtype=torch.bool) if zero is None else zero.to(torch.bool)
    # Pruned entries first (stable, so the rest keeps its natural order).
    order = torch.argsort((~zero).to(torch.int8), dim=1, stable=True)
    rows = torch.arange(nb, device=w.device)[:, None]
    x = w.to(torch.float64)[rows, order].clone()
    s = step.to(torch.float64)[rows, order]
    z = zero[rows, order]
    H = hinv.to(torch.float64)[rows[:, :, None], order[:, :, None], order[:, None, :]].clone()
    fixed = torch.empty_like(x)
    tiny = torch.finfo(torch.float64).tiny
    for j in range(size):
        # Entries before j are fixed (their rows of H are 0): work on the trailing part only.
        col = H[:, j:, j].clone()  # (nb, B - j)
        d = col[:, 0].clamp_min(tiny)
        rounded = round_to_grid(x[:, j], s[:, j], bits)
        target = torch.where(z[:, j], torch.zeros_like(rounded), rounded)
        x[:, j:] -= ((x[:, j] - target) / d)[:, None] * col
        fixed[:, j] = target  # later updates leave round-off on x[:, j]; keep the target
        H[:, j:, j:].baddbmm_(col[:, :, None], (col / d[:, None])[:, None, :], alpha=-1)
    out = torch.empty_like(x)
    out[rows, order] = fixed
    return out.to(w.dtype)


def obq_weights(
    fisher: FisherInverse,
    bits: Mapping[str, int],
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """New weights for the layers named in ``bits``: prune ``masks``, quantize the rest, with OBS.

    Computes only; apply the result with :func:`woodfisher.pruning.masks.apply_masks` (as
    ``new_weights``, with the same masks), or copy it into the weights.

    Args:
        fisher: The inverse curvature of the model's weights (:func:`woodfisher.fisher_inverse`),
            built before pruning, so that pruned weights are compensated too.
        bits: Layer name to bit width (1..16); other layers are left out.
        masks: Layer name to a mask of the weight's shape (0 = prune); exact zeros of the current
            weights stay zero in any case.

    Returns:
        Layer name to the new weight (weight's shape and dtype).

    Raises:
        ValueError: If a layer is unknown, a width is outside 1..16 or a mask has the wrong
            shape.
    """
    layout = fisher.layout
    masks = dict(masks or {})
    for name in list(bits) + list(masks):
        if name not in layout.names:
            raise ValueError(f"unknown layer {name!r}; the Fisher covers {list(layout.names)}")
    for name, b in bits.items():
        check_bits(b, f"bits[{name!r}]")
    offsets = dict(zip(layout.names, layout.offsets, strict=True))
    out = {}
    for name, b in bits.items():
        mod = fisher.modules[name]
        w = effective_weight(mod)
        keep = masks.get(name)
        if keep is not None and tuple(keep.shape) != tuple(w.shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(keep.shape)}, weight {tuple(w.shape)}"
            )
        kept = w if keep is None else w * (keep != 0)
        flat_w = w.reshape(-1)
        zero = (kept == 0).reshape(-1)
        # One step per output channel, from the weights that stay.
        step = quant_scale(kept, b).repeat_interleave(w[0].numel())
        start, stop = offsets[name], offsets[name] + w.numel()
        blocks = [(i, s, e) for i, (s, e) in enumerate(fisher.inv.blocks) if start <= s < stop]
        new = flat_w.clone()
        by_size: dict[int, list[tuple[int, int, int]]] = {}
        for blk in blocks:
            by_size.setdefault(blk[2] - blk[1], []).append(blk)
        for group in by_size.values():
            idx = torch.stack([torch.arange(s - start, e - start, device=flat_w.device)
                               for _, s, e in group])
            hinv = torch.stack([fisher.inv.block(i) for i, _, _ in group]).to(torch.float64)
            new[idx] = obq_blocks(flat_w[idx], hinv, step[idx], b, zero[idx]).to(new.dtype)
        out[name] = new.reshape(w.shape)
    return out
