"""Quantization shared by the compressors (QUBO, low rank, storage, long-tail analysis).

Round-to-nearest, symmetric, per output channel (:mod:`woodfisher.quant.uniform`). Exact zeros
stay zero at every bit width, so a pruned weight costs no level and stays pruned.
"""

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
    "quant_scale",
    "storage_bits",
]
