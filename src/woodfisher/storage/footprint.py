"""Memory accounting: analog cells plus every digital side bit, against digital storage.

Digital bits (ours: signs, masks, scales, companders, digit counts, allocation maps; the
baselines: the weights themselves) are stored error-free in single-level cells (one bit per
cell) protected by a SECDED (72, 64) Hamming code: every started word of 64 data bits takes 72
cells. Analog cells hold one value each. The device calibration (the channel's mean and std per
level) belongs to the memory, not to a model, and is not counted.

Example:
    >>> ecc_cells(64), ecc_cells(65), ecc_cells(32 * 1000)
    (72, 144, 36000)
    >>> mask_bits(1000, 100, "plain"), mask_bits(1000, 1000, "plain")
    (1000, 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from woodfisher.storage.allocation import entropy_bits

if TYPE_CHECKING:  # pragma: no cover
    from woodfisher.storage.codes import LayerCode

__all__ = [
    "SIDE_CODINGS",
    "allocation_bits",
    "digital_baselines",
    "ecc_cells",
    "footprint",
    "mask_bits",
]

ECC_WORD, ECC_DATA = 72, 64
SIDE_CODINGS = ("plain", "entropy")


def check_side_coding(side_coding: str) -> str:
    """Check a side-information coding name.

    Returns:
        ``side_coding``.

    Raises:
        ValueError: If it is not ``"plain"`` or ``"entropy"``.
    """
    if side_coding not in SIDE_CODINGS:
        raise ValueError(f"unknown side_coding {side_coding!r}; choose from {list(SIDE_CODINGS)}")
    return side_coding


def ecc_cells(bits: int, bits_per_cell: int = 1) -> int:
    """Cells to store ``bits`` data bits with SECDED (72, 64).

    Args:
        bits: Data bits.
        bits_per_cell: Bits per digital cell (1: single-level cells).

    Returns:
        ``ceil(ceil(bits / 64) · 72 / bits_per_cell)``.
    """
    words = -(-int(bits) // ECC_DATA)
    return -(-words * ECC_WORD // int(bits_per_cell))


def _h(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def mask_bits(numel: int, kept: int, coding: str = "plain") -> int:
    """Bits of a layer's pruning mask (0 when nothing is pruned).

    Args:
        numel: Weights in the layer.
        kept: Weights stored.
        coding: ``"plain"`` (a bitmap) or ``"entropy"`` (``numel·H(kept/numel)``, the bound an
            arithmetic coder reaches up to a few bits).

    Returns:
        The bits.
    """
    check_side_coding(coding)
    if kept >= numel:
        return 0
    if coding == "plain":
        return int(numel)
    return int(math.ceil(numel * _h(kept / numel)))


def allocation_bits(copies: Tensor, coding: str = "plain") -> int:
    """Bits to tell the decoder how many copies each group has.

    A header lists the distinct counts (8 bits each); then ``plain`` gives every group a
    fixed-length index (``ceil(log2(distinct))`` bits) and ``entropy`` the ideal code
    (``n·H``). One count for all groups costs only the header.

    Returns:
        The bits.
    """
    check_side_coding(coding)
    copies = torch.as_tensor(copies).reshape(-1)
    distinct = int(torch.unique(copies).numel()) if copies.numel() else 0
    header = 8 * distinct
    if distinct <= 1:
        return header
    if coding == "plain":
        return header + copies.numel() * math.ceil(math.log2(distinct))
    return header + entropy_bits(copies)


def digital_baselines(weights: int, stored: int, channels: int, mask: int,
                      other: int = 0) -> dict[str, dict[str, float]]:
    """Cells of the weights stored digitally (SLC, SECDED), error-free.

    Args:
        weights: Weights of the coded layers (pruned ones included).
        stored: Weights kept (not pruned).
        channels: Output channels (one 32-bit scale each for 8-bit weights).
        mask: Bits of the pruning masks (0 for a dense model).
        other: Other parameters (biases, BatchNorm), 32-bit in every variant.

    Returns:
        Per baseline: ``cells`` (weights only), ``cells_all`` (with other parameters) and
        ``cells_per_weight``: ``fp32`` and ``int8`` (every weight), and when pruned
        ``fp32-sparse`` and ``int8-sparse`` (kept weights + mask).
    """
    bits = {"fp32": 32 * weights, "int8": 8 * weights + 32 * channels}
    if mask:
        bits["fp32-sparse"] = 32 * stored + mask
        bits["int8-sparse"] = 8 * stored + 32 * channels + mask
    other_cells = ecc_cells(32 * other) if other else 0
    out = {}
    for name, b in bits.items():
        cells = ecc_cells(b)
        out[name] = {"bits": b, "cells": cells, "cells_all": cells + other_cells,
                     "cells_per_weight": cells / max(weights, 1)}
    return out


def footprint(codes: Sequence[LayerCode], copies: Sequence[Tensor],
              group_copies: Tensor | None, unit_cells: int, side_coding: str = "plain",
              other: int = 0) -> dict[str, Any]:
    """Count the cells of stored codes and compare with digital storage.

    Args:
        codes: The layer codes.
        copies: Per layer, (n,) copies of each stored weight.
        group_copies: Copies of each allocation group (None: uniform, nothing to store).
        unit_cells: Cells of one copy of a weight's code.
        side_coding: ``"plain"`` or ``"entropy"`` masks and allocation maps.
        other: Other parameters of the model (biases, BatchNorm), kept in 32-bit digital.

    Returns:
        ``weights``, ``stored_weights``, ``analog_cells``, ``digital_bits`` (and
        ``digital_bits_by_kind``), ``digital_cells``, ``total_cells``, ``cells_per_weight``
        (all cells per weight of the coded layers), ``footprint_ratio`` (32-bit digital with
        SECDED over this), ``footprint_ratio_int8``, ``footprint_ratio_all_params`` (both
        sides with the other parameters) and the ``baselines``.
    """
    check_side_coding(side_coding)
    numel = sum(math.prod(c.shape) for c in codes)
    stored = sum(c.target.numel() for c in codes)
    side: dict[str, int] = {}
    for code in codes:
        for kind, bits in code.side_bits.items():
            side[kind] = side.get(kind, 0) + bits
        side["masks"] = side.get("masks", 0) + mask_bits(math.prod(code.shape),
                                                         code.target.numel(), side_coding)
    side["allocation"] = allocation_bits(group_copies, side_coding) \
        if group_copies is not None else 0
    analog = sum(int(r.sum()) for r in copies) * unit_cells
    bits = sum(side.values())
    digital = ecc_cells(bits)
    total = analog + digital
    baselines = digital_baselines(numel, stored, sum(c.shape[0] for c in codes),
                                  side["masks"], other)
    other_cells = ecc_cells(32 * other) if other else 0
    return {
        "weights": numel,
        "stored_weights": stored,
        "analog_cells": analog,
        "analog_cells_per_stored_weight": analog / max(stored, 1),
        "digital_bits": bits,
        "digital_bits_by_kind": side,
        "digital_cells": digital,
        "total_cells": total,
        "cells_per_weight": total / max(numel, 1),
        "footprint_ratio": baselines["fp32"]["cells"] / max(total, 1),
        "footprint_ratio_int8": baselines["int8"]["cells"] / max(total, 1),
        "other_params": other,
        "footprint_ratio_all_params": baselines["fp32"]["cells_all"] / max(total + other_cells,
                                                                          1),
        "baselines": baselines,
    }
