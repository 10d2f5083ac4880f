"""How much memory building a block-wise inverse Fisher takes, known before allocating it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from woodfisher.fisher.base import make_blocks

ALGORITHMS = ("auto", "fast", "woodbury")

# Blocks of one size are processed in chunks of at most this many gathered gradient entries,
# so that the working memory of the fast path stays bounded whatever d is.
CHUNK_ELEMENTS = 1 << 25


def format_bytes(n: float) -> str:
    """Human-readable size (``12.3 MiB``).

    Returns:
        The formatted string.

    Example:
        >>> format_bytes(3 * 2**20)
        '3.0 MiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


@dataclass(frozen=True)
class MemoryPlan:
    """The largest allocations of one way of building the inverse.

    Attributes:
        path: Which route is taken, e.g. ``"fast path, sample space (m <= B)"``.
        total_bytes: Peak estimate: kept tensors plus the largest working set.
        parts: Bytes of each named allocation.
        block_size: The block size the plan is for (None = the full matrix).
    """

    path: str
    total_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    block_size: int | None = None

    def __str__(self) -> str:
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items())
        return f"{self.path}: {format_bytes(self.total_bytes)} ({detail})"


def plan_memory(
    d: int,
    m: int,
    block_size: int | None,
    layout_sizes: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    algorithm: str = "auto",
) -> MemoryPlan:
    """Bytes of the biggest allocations needed to build the inverse empirical Fisher.

    Blocks with more entries than gradients (``m ≤ B``) are kept in sample space (an (m, B)
    factor per block); the others as dense (B, B) inverses. The (m, d) gradients are counted
    too, since the inverse keeps them.

    Args:
        d: Number of parameters.
        m: Number of gradients.
        block_size: Entries per block, None for the full matrix.
        layout_sizes: Layer sizes (blocks never cross a layer); default one layer of ``d``.
        dtype: Floating point type of the computation.
        algorithm: ``"auto"``/``"fast"`` or ``"woodbury"``.

    Returns:
        The plan.

    Raises:
        ValueError: If the algorithm is unknown or the sizes do not sum to ``d``.

    Example:
        >>> str(plan_memory(1000, 10, 100, dtype=torch.float64))  # doctest: +ELLIPSIS
        'fast path, sample space (m <= B): 250.0 KiB (gradients 78.1 KiB, ...)'
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {list(ALGORITHMS)}")
    sizes = list(layout_sizes) if layout_sizes is not None else [d]
    if sum(sizes) != d:
        raise ValueError(f"layout sizes {sizes} sum to {sum(sizes)}, but d = {d}")
    item = torch.empty((), dtype=dtype).element_size()
    counts = Counter(e - s for s, e in make_blocks(sizes, block_size))
    parts = {"gradients": m * d * item}
    if algorithm == "woodbury":
        big = max(counts, default=0)
        parts["inverse blocks"] = sum(n * b * b for b, n in counts.items()) * item
        parts["working"] = (2 * big * big + m * big) * item
        path = "woodbury recursion (reference)"
    else:
        kept, working, routes = 0, 0, set()
        for b, n in counts.items():
            chunk = max(1, min(n, CHUNK_ELEMENTS // max(1, m * b)))
            gathered = chunk * m * b
            if m <= b:
                routes.add("sample space (m <= B)")
                kept += n * m * b
                working = max(working, gathered + 2 * chunk * m * m)
            else:
                routes.add("dense Cholesky (m > B)")
                kept += n * b * b
                working = max(working, gathered + 2 * chunk * b * b)
        parts["inverse factors"] = kept * item
        parts["working"] = working * item
        path = "fast path, " + " + ".join(sorted(routes, reverse=True))
    return MemoryPlan(path, sum(parts.values()), parts, block_size)


def suggest_block_size(
    d: int,
    m: int,
    block_size: int | None,
    layout_sizes: Sequence[int] | None,
    dtype: torch.dtype,
    algorithm: str,
    max_memory: int,
) -> int | None:
    """The largest candidate block size below ``block_size`` whose plan fits ``max_memory``.

    Returns:
        A block size, or None if no candidate fits.
    """
    if block_size is not None and not isinstance(block_size, int):
        block_size = max((b for b in block_size if b is not None), default=None)
    top = block_size if block_size is not None else d
    cands = {top // 2**k for k in range(1, 12)} | {
        10000, 5000, 2000, 1000, 500, 200, 100, 50, 20, 10, 5, 1
    }
    for b in sorted((c for c in cands if 1 <= c < top), reverse=True):
        if plan_memory(d, m, b, layout_sizes, dtype, algorithm).total_bytes <= max_memory:
            return b
    return None
