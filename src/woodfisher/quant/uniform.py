"""Uniform symmetric fake quantization, per output channel (round to nearest).

With ``b`` bits a channel with largest magnitude ``s`` uses the grid ``step·{-q, …, q}``,
``q = 2^(b-1) - 1``, ``step = s / q``; the expected squared error of a weight is about
``step² / 12``. One bit is the sign times the channel's mean magnitude (a binary grid has no
zero: exact zeros are kept as zeros there too, their mask being stored apart).

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 0.3, -1.0], [2.0, 0.9, 0.0]])
    >>> fake_quantize(w, 2)
    tensor([[ 0.,  0., -1.],
            [ 2.,  0.,  0.]])
    >>> storage_bits(w, 4)  # 4 nonzero weights × 4 bits + 2 scales × 32 bits
    80
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

MAX_BITS = 16
SCALE_BITS = 32


def check_bits(bits: int, what: str = "bits") -> int:
    """Check a bit width.

    Returns:
        ``bits`` as int.

    Raises:
        ValueError: If it is not an integer in 1..16.
    """
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def _channels(w: Tensor, axis: int | None) -> Tensor:
    """``w`` as (channels, rest): channels along ``axis``, or one channel for None."""
    if axis is None or w.ndim < 2:
        return w.reshape(1, -1)
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def quant_scale(w: Tensor, bits: int, axis: int | None = 0) -> Tensor:
    """Step of the grid of each channel (for ``bits = 1``: the channel's mean magnitude).

    Args:
        w: The weight.
        bits: Bit width, 1..16.
        axis: The channel axis (output channels: 0), or None for one scale per tensor.

    Returns:
        (channels,) steps; 1 where a channel is all zero (any step keeps it zero).
    """
    bits = check_bits(bits)
    c = _channels(w.detach(), axis).abs()
    if bits == 1:
        nz = (c != 0).sum(1).clamp(min=1)
        step = c.sum(1) / nz
    else:
        step = c.amax(1) / (2 ** (bits - 1) - 1)
    return torch.where(step > 0, step, torch.ones_like(step))


def fake_quantize(
    w: Tensor, bits: int, axis: int | None = 0, scale: Tensor | None = None
) -> Tensor:
    """Round ``w`` to its per-channel symmetric grid and return the dequantized values.

    Args:
        w: The weight.
        bits: Bit width, 1..16.
        axis: The channel axis, or None for one grid per tensor.
        scale: (channels,) steps to use instead of :func:`quant_scale`'s.

    Returns:
        A tensor of ``w``'s shape and dtype on the grid; zeros of ``w`` stay zero.
    """
    bits = check_bits(bits)
    step = quant_scale(w, bits, axis) if scale is None else scale
    c = _channels(w.detach(), axis)
    s = step.to(c.dtype).reshape(-1, 1)
    if bits == 1:
        q = torch.sign(c) * s
    else:
        qmax = 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(c / s), -qmax, qmax) * s
    q = torch.where(c == 0, torch.zeros_like(q), q)
    if axis is None or w.ndim < 2:
        return q.reshape(w.shape)
    moved = w.movedim(axis, 0).shape
    return q.reshape(moved).movedim(0, axis)


def storage_bits(w: Tensor, bits: int, axis: int | None = 0) -> int:
    """Bits to store ``w`` quantized: ``bits`` per nonzero entry plus a 32-bit step per channel.

    Count before quantizing: an entry that rounds to 0 still takes a code; exact zeros of the
    input are read as pruned.

    A pruning mask, when there is one, is counted by the caller (it is shared with other
    encodings).

    Returns:
        The number of bits.
    """
    bits = check_bits(bits)
    channels = 1 if axis is None or w.ndim < 2 else w.shape[axis]
    return int((w != 0).sum()) * bits + channels * SCALE_BITS


def fake_quantize_model(
    modules: Mapping[str, nn.Module], bits: int | Mapping[str, int]
) -> dict[str, dict[str, int]]:
    """Fake-quantize the weights of ``modules`` in place (``weight_orig`` when pruned).

    Args:
        modules: Module name to a module with a ``weight`` (e.g. from
            :func:`woodfisher.params.select_modules`).
        bits: One width for all, or module name to width (modules not named are left alone).

    Returns:
        Per module: ``bits`` and ``storage_bits``.

    Raises:
        ValueError: If a width is outside 1..16 or names an unknown module.
    """
    from woodfisher.params import Target, effective_weight, owner, weight_mask, weight_param

    widths = {n: bits for n in modules} if isinstance(bits, int) else dict(bits)
    for name, b in widths.items():
        if name not in modules:
            raise ValueError(f"bits names unknown module {name!r}; known: {sorted(modules)}")
        check_bits(b, f"bits[{name!r}]")
    report = {}
    with torch.no_grad():
        for name, b in widths.items():
            mod = modules[name]
            w = effective_weight(mod)
            q = fake_quantize(w, b)
            weight_param(mod).copy_(q)
            mask = weight_mask(mod)
            if mask is not None:
                # on the owning module: a Target (what select_modules gives) is read-only
                attr = mod.attr if isinstance(mod, Target) else "weight"
                setattr(owner(mod), attr, weight_param(mod) * mask)
            report[name] = {"bits": int(b), "storage_bits": storage_bits(w, b)}
    return report
