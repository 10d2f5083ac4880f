"""Model size in bits after low rank, pruning of the factors and quantization.

Weights of Linear/Conv layers cost ``bits`` per nonzero entry plus a 32-bit scale per output
channel (:func:`woodfisher.quant.storage_bits`; 32 bits and no scale when unquantized), plus a
one-bit-per-entry mask for pruned layers. Every other floating tensor of the state (biases,
BatchNorm parameters and running statistics) costs 32 bits per entry.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    >>> size_bits(net)["bits"]  # 12 weights + 3 biases + 2·3 BN params + 2·3 BN stats
    864
    >>> size_bits(net, bits=4)["bits"]  # 12 × 4 + 3 scales × 32 + the rest
    624
"""

from __future__ import annotations

from torch import nn

__all__ = ["quantize", "size_bits"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def size_bits(model: nn.Module, bits: int | None = None) -> dict[str, int]:
    """Bits to store ``model`` with its Linear/Conv weights at ``bits`` (None: float32).

    Args:
        model: Any model (pruned or not).
        bits: Bit width of the Linear/Conv weights, or None for 32-bit floats.

    Returns:
        ``{"bits", "weight_bits", "other_bits", "mask_bits", "weights", "nonzero_weights"}``.
    """
    from woodfisher.params import effective_weight, weight_mask
    from woodfisher.quant import storage_bits

    weight_bits = mask_bits = weights = nonzero = 0
    counted = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, _LAYERS):
            continue
        w = effective_weight(mod)
        weights += w.numel()
        nonzero += int((w != 0).sum())
        weight_bits += storage_bits(w, bits) if bits is not None else 32 * int((w != 0).sum())
        if weight_mask(mod) is not None:
            mask_bits += w.numel()
        prefix = f"{name}." if name else ""
        counted |= {f"{prefix}weight", f"{prefix}weight_orig", f"{prefix}weight_mask"}
    other = sum(
        32 * t.numel() for k, t in model.state_dict().items()
        if k not in counted and t.is_floating_point()
    )
    return {"bits": weight_bits + mask_bits + other, "weight_bits": weight_bits,
            "other_bits": other, "mask_bits": mask_bits, "weights": weights,
            "nonzero_weights": nonzero}


def quantize(model: nn.Module, bits: int) -> dict[str, dict[str, int]]:
    """Fake-quantize every Linear/Conv weight of ``model`` in place (per-channel, symmetric).

    Factorised layers are ordinary Linear/Conv2d modules, so each factor gets its own grid.

    Args:
        model: The model.
        bits: Bit width, 1..16.

    Returns:
        Per layer, :func:`woodfisher.quant.fake_quantize_model`'s report.
    """
    from woodfisher.params import select_layers
    from woodfisher.quant import fake_quantize_model

    return fake_quantize_model(select_layers(model), bits)
