"""Quantization shared by the compressors (QUBO, low rank, storage, long-tail analysis).

Round-to-nearest, symmetric, per output channel (:mod:`woodfisher.quant.uniform`). Exact zeros
stay zero at every bit width, so a pruned weight costs no level and stays pruned. The same grid
with Optimal Brain Quantization's compensation (each rounding error absorbed by the weights not
yet rounded, through the engine's ``F⁻¹``) is :mod:`woodfisher.quant.obq`; fine-tuning on the
grid (straight-through) is :func:`quant_aware`.
"""

from woodfisher.quant.obq import obq_blocks, obq_weights, round_to_grid
from woodfisher.quant.ste import quant_aware
from woodfisher.quant.uniform import (
    MAX_BITS,
    check_bits,
    fake_quantize,
    fake_quantize_model,
    quant_scale,
    storage_bits,
)

__all__ = [
    "MAX_BITS",
    "check_bits",
    "fake_quantize",
    "fake_quantize_model",
    "obq_blocks",
    "obq_weights",
    "round_to_grid",
    "quant_aware",
    "quant_scale",
    "storage_bits",
]
