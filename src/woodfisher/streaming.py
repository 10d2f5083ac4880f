"""The per-sample gradient pass in chunks of rows, so that the (m, d) gradients are never whole.

Chunk ``j`` holds gradient rows ``j·c … j·c + c − 1`` (``c`` = :func:`chunk_rows`), computed
from the same samples whoever computes it; a process of a distributed job computes only the
chunks it is given (:mod:`woodfisher.distributed`) and skips the samples of the others, so the
set of gradients does not depend on the number of processes. The chunk size depends only on
``m``, ``d`` and the dtype (never on the number of processes), because the order in which
chunks are summed fixes the last bits of the Fisher.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> data = [(torch.randn(5, 4), torch.randint(0, 2, (5,))) for _ in range(2)]
    >>> [(j, lo, tuple(G.shape)) for j, lo, G in gradient_chunks(net, data, 10, rows=4)]
    [(0, 0, (4, 18)), (1, 4, (4, 18)), (2, 8, (2, 18))]
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch  # noqa: F401  (the module doctest uses it)
from torch import Tensor, nn
from tqdm import tqdm

from woodfisher.gradients import iter_batches, sample_gradients, take_samples

#: Bytes of one chunk of gradient rows (the plan's default; a chunk is at least 1 row). A GPU
#: with room to spare can take bigger chunks: set ``WOODFISHER_CHUNK_BYTES`` (the same value on
#: every rank of a job, since the chunk size fixes the order of the sums).
CHUNK_BYTES = int(os.environ.get("WOODFISHER_CHUNK_BYTES", 1 << 28))
#: Rows per vectorised call inside a chunk (bounds the vmap pass's working memory).
VMAP_ROWS = 64


def chunk_rows(num_grads: int, d: int, itemsize: int = 4, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as fit ``budget`` bytes, spread evenly over the chunks.

    Args:
        num_grads: ``m``.
        d: Columns (selected weights).
        itemsize: Bytes per entry.
        budget: Bytes a chunk may take.

    Returns:
        The chunk size ``c ≥ 1``.

    Example:
        >>> chunk_rows(1000, 266_200)   # MLPNet 784-300-100-10, float32: 4 chunks of 250 rows
        250
    """
    fit = max(1, min(num_grads, budget // max(1, d * itemsize)))
    return math.ceil(num_grads / math.ceil(num_grads / fit))


def num_chunks(num_grads: int, rows: int) -> int:
    """Number of chunks of ``rows`` rows in ``num_grads`` gradients.

    Returns:
        ``ceil(num_grads / rows)``.
    """
    return math.ceil(num_grads / rows)


def gradient_chunks(
    model: nn.Module,
    data: Iterable,
    num_grads: int,
    *,
    rows: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    samples_per_grad: int = 1,
    params: Sequence[str] | dict[str, nn.Module] | None = None,
    seed: int = 0,
    which: Callable[[int], bool] | None = None,
    progress: bool = False,
    columns: Tensor | None = None,
) -> Iterator[tuple[int, int, Tensor]]:
    """Per-sample gradients, one chunk of rows at a time.

    Args:
        model: The network (see :func:`woodfisher.gradients.sample_gradients`).
        data: Batches of ``(inputs, targets)``; row ``i`` comes from samples
            ``i·s … i·s + s − 1`` in order.
        num_grads: Rows ``m`` in all.
        rows: Rows per chunk (see :func:`chunk_rows`).
        loss_fn: Mean loss; default cross-entropy.
        samples_per_grad: ``s``.
        params: Which weights (as for ``sample_gradients``).
        seed: Seed of randomness inside the model (the same for every chunk).
        which: ``which(j)`` is True for the chunks this process computes; default all.
        progress: A progress bar over the rows computed here.
        columns: Only these flat indices (see ``sample_gradients``).

    Yields:
        ``(j, first_row, G_j)`` with ``G_j`` of shape (rows of chunk j, d), in chunk order.

    Raises:
        ValueError: If the data runs out or a gradient is not finite.
    """
    if isinstance(rows, bool) or int(rows) != rows or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    s = samples_per_grad
    stream, buffer = iter_batches(data), []
    total = num_chunks(num_grads, rows)
    mine = [j for j in range(total) if which is None or which(j)]
    bar = tqdm(total=sum(min(rows, num_grads - j * rows) for j in mine), desc="gradients",
               file=sys.stderr, disable=not progress)
    with bar:
        for j in range(total):
            n = min(rows, num_grads - j * rows)
            got = take_samples(stream, n * s, buffer)
            if got is None:
                found = j * rows * s + sum(b[0].shape[0] for b in buffer)
                raise ValueError(
                    f"data ran out: num_grads={num_grads} × samples_per_grad={s} needs "
                    f"{num_grads * s} samples, found {found}"
                )
            if which is not None and not which(j):
                continue
            # One batch in a list: a pair (dict inputs, targets) is not itself a dataset.
            G = sample_gradients(model, [got], loss_fn=loss_fn, num_grads=n,
                                 samples_per_grad=s, params=params, seed=seed,
                                 chunk_size=VMAP_ROWS, columns=columns)
            bar.update(n)
            yield j, j * rows, G


__all__ = ["CHUNK_BYTES", "VMAP_ROWS", "chunk_rows", "gradient_chunks", "num_chunks"]
