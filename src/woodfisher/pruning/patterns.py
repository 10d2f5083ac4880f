"""Pruning patterns: which weights go together, and curvature blocks that respect them.

A pattern turns the flat vector of selected weights (see :class:`woodfisher.params.Layout`) into
groups that are removed together:

- ``"unstructured"``: every weight alone (the default);
- ``"N:M"`` (``"2:4"``, ``"4:8"``): every run of M consecutive weights along the input dimension
  of a row (Conv: the flattened ``in_channels·kh·kw`` axis) keeps at most N;
- ``"block:RxC"`` (``"block:1x4"``, ``"block:4x4"``): whole R×C tiles of the weight matrix
  (rows = output units, columns = the flattened input axis);
- ``"channels"``: whole output channels with their bias and following BatchNorm entries
  (built in :mod:`woodfisher.pruning.channels`).

Group OBS scores a group ``Q`` by ``½ w_Qᵀ([F⁻¹]_QQ)⁻¹ w_Q``, which needs every group inside one
diagonal block of the curvature: :func:`aligned_block_sizes` rounds the block size per layer to
whole M-runs, whole tile rows or whole layers.

Example:
    >>> p = parse_pattern("2:4")
    >>> str(p), p.implied_sparsity
    ('2:4', 0.5)
    >>> nm_groups(p, (2, 8), offset=0).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    >>> block_groups(parse_pattern("block:2x2"), (2, 4), offset=0).tolist()
    [[0, 1, 4, 5], [2, 3, 6, 7]]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PATTERNS",
    "Pattern",
    "aligned_block_sizes",
    "block_groups",
    "matrix_shape",
    "misfit",
    "nm_groups",
    "parse_pattern",
]

#: The pattern forms :func:`parse_pattern` accepts (N, M, R, C positive integers).
PATTERNS = ("unstructured", "N:M", "block:RxC", "channels")


@dataclass(frozen=True)
class Pattern:
    """A parsed pruning pattern.

    Attributes:
        kind: ``"unstructured"``, ``"nm"``, ``"block"`` or ``"channels"``.
        n: N of N:M (weights kept per run).
        m: M of N:M (run length).
        rows: R of block:RxC.
        cols: C of block:RxC.
    """

    kind: str
    n: int = 1
    m: int = 1
    rows: int = 1
    cols: int = 1

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.rows}x{self.cols}"
        return self.kind

    @property
    def implied_sparsity(self) -> float | None:
        """``1 − N/M`` for N:M (the sparsity inside every layer it fits), else None."""
        return 1 - self.n / self.m if self.kind == "nm" else None

    @property
    def structured(self) -> bool:
        """Whether weights are removed in groups (anything but unstructured)."""
        return self.kind != "unstructured"


def parse_pattern(spec: str | Pattern | None) -> Pattern:
    """Parse ``"unstructured"``, ``"N:M"``, ``"block:RxC"`` or ``"channels"``.

    Args:
        spec: The pattern text (or an already parsed pattern; None means unstructured).

    Returns:
        The pattern.

    Raises:
        ValueError: For a malformed pattern, N > M, N or M < 1, a tile side < 1.

    Example:
        >>> parse_pattern("block:1x4")
        Pattern(kind='block', n=1, m=1, rows=1, cols=4)
    """
    if spec is None:
        return Pattern("unstructured")
    if isinstance(spec, Pattern):
        return spec
    text = str(spec).strip().lower()
    if text in ("unstructured", "channels"):
        return Pattern(text)
    nm = re.fullmatch(r"(\d+):(\d+)", text)
    if nm:
        n, m = int(nm[1]), int(nm[2])
        if n < 1 or m < 1 or n >= m:
            raise ValueError(
                f"pattern {spec!r}: N:M keeps N of every M weights, so 1 <= N < M is needed "
                "(e.g. '2:4')"
            )
        return Pattern("nm", n=n, m=m)
    blk = re.fullmatch(r"block:(\d+)x(\d+)", text)
    if blk:
        r, c = int(blk[1]), int(blk[2])
        if r < 1 or c < 1 or r * c < 2:
            raise ValueError(
                f"pattern {spec!r}: a block needs positive sides and at least 2 weights "
                "(e.g. 'block:1x4', 'block:4x4')"
            )
        return Pattern("block", rows=r, cols=c)
    raise ValueError(
        f"unknown pattern {spec!r}; choose from {list(PATTERNS)} (e.g. 'unstructured', '2:4', "
        "'block:4x4', 'channels')"
    )


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """A weight's shape seen as a matrix: (output units, flattened input axis).

    Every Linear/Conv weight (and a bare ``(out, in)`` parameter) is stored row-major with the
    output units first, so row ``r`` is the contiguous run ``[r·cols, (r+1)·cols)`` of its flat
    entries. This is the one place that decides which axis is "a row".

    Returns:
        ``(rows, cols)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return (1, shape[0] if shape else 1)
    return shape[0], math.prod(shape[1:])


def misfit(pattern: Pattern, shape: Sequence[int]) -> str | None:
    """Why a weight of ``shape`` cannot take ``pattern`` (None when it can).

    Returns:
        A short reason, or None.
    """
    rows, cols = matrix_shape(shape)
    if pattern.kind == "nm" and cols % pattern.m:
        return f"input width {cols} is not a multiple of M={pattern.m}"
    if pattern.kind == "block" and (rows % pattern.rows or cols % pattern.cols):
        return f"shape {rows}x{cols} is not a multiple of the {pattern.rows}x{pattern.cols} tile"
    return None


def nm_groups(pattern: Pattern, shape: Sequence[int], offset: int) -> Tensor:
    """Flat indices of every run of M consecutive weights of one layer.

    Args:
        pattern: An N:M pattern.
        shape: The layer's weight shape (must fit, see :func:`misfit`).
        offset: The layer's start in the flat vector.

    Returns:
        (rows·cols/M, M) long tensor.
    """
    rows, cols = matrix_shape(shape)
    return torch.arange(offset, offset + rows * cols).reshape(-1, pattern.m)


def block_groups(pattern: Pattern, shape: Sequence[int], offset: int) -> Tensor:
    """Flat indices of every R×C tile of one layer, tiles in row-major order.

    Args:
        pattern: A block pattern.
        shape: The layer's weight shape (must fit).
        offset: The layer's start in the flat vector.

    Returns:
        (number of tiles, R·C) long tensor.
    """
    rows, cols = matrix_shape(shape)
    r, c = pattern.rows, pattern.cols
    idx = torch.arange(offset, offset + rows * cols).reshape(rows // r, r, cols // c, c)
    return idx.permute(0, 2, 1, 3).reshape(-1, r * c)


def _round_to(block_size: int, unit: int) -> int:
    return max(unit, round(block_size / unit) * unit)


def aligned_block_sizes(
    pattern: Pattern,
    shapes: Sequence[Sequence[int]],
    block_size: int | None,
    fitting: Sequence[bool] | None = None,
    whole: Sequence[bool] | None = None,
) -> int | None | list[int | None]:
    """Per-layer curvature block sizes so that every group lies inside one block.

    Blocks start at each layer's first weight, so a block size that is a multiple of the group's
    footprint keeps groups whole: M for N:M, C for 1×C tiles, R whole rows for R×C tiles, one
    row for channels compensated in their own layer, and the whole layer for a layer whose
    input columns are removed (a column crosses every row).

    Args:
        pattern: The pattern.
        shapes: Weight shape of every layer, in layout order.
        block_size: The requested size (None: one block over everything, which fits any group).
        fitting: Per layer, whether the pattern is applied there (others keep ``block_size``).
        whole: Per layer, whether it must be one block (channels compensated in it).

    Returns:
        ``block_size`` unchanged when nothing needs aligning, else one size per layer.

    Example:
        >>> aligned_block_sizes(parse_pattern("2:4"), [(3, 8)], 10)
        [8]
        >>> aligned_block_sizes(parse_pattern("block:2x2"), [(4, 6)], 10)
        [12]
    """
    if pattern.kind == "channels" and block_size is None:
        # Whole layers, never one block across layers: a channel's OBS set (the consumer's
        # columns) and its dead producer row then never share a block, so pinning the row
        # leaves the group's saliency unchanged.
        return [None] * len(shapes)
    if block_size is None or not pattern.structured:
        return block_size
    out: list[int | None] = []
    for i, shape in enumerate(shapes):
        rows, cols = matrix_shape(shape)
        if whole is not None and whole[i]:
            out.append(None)
        elif fitting is not None and not fitting[i]:
            out.append(block_size)
        elif pattern.kind == "nm":
            out.append(_round_to(block_size, pattern.m))
        elif pattern.kind == "block":
            unit = pattern.cols if pattern.rows == 1 else pattern.rows * cols
            out.append(_round_to(block_size, unit))
        else:  # channels, removed as rows of this layer
            out.append(_round_to(block_size, cols))
    return out
