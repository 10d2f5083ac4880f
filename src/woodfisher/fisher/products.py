"""Products with a block-diagonal operator whose blocks are batched factors, at memory speed.

An inverse-Fisher-vector product reads the kept factor once or twice and does two FLOPs per
entry per vector, so for a few vectors its time is the time to stream the factor from memory.
Three things decide that time on a CPU, and each function here is written for them:

- **Runs, not gathers.** Consecutive blocks of one size inside a layer are a plain view
  ``V[start:stop].view(count, B, k)`` of the flat input, so nothing is gathered or scattered.
- **Chunks that stay in cache.** The sample-space inverse ``(I − WᵀW)/λ`` reads ``W`` twice
  (``u = W v``, then ``Wᵀu``). Over all blocks at once the second read comes from memory again;
  over a chunk of at most :data:`CHUNK_BYTES` of ``W`` (rows of a big block, or several small
  blocks) it comes from the core's cache. This is what a per-block loop of two ``torch.mv``
  gets for big blocks, without the loop's per-call cost for small ones.
- **The orientation BLAS streams.** ``Wᵀu`` is computed as ``uᵀW`` (a combination of the rows
  of the row-major ``W``), which measured 2–3× faster than a transposed batched product for one
  vector.

Example:
    >>> W = torch.randn(3, 2, 4, dtype=torch.float64)   # 3 blocks, m = 2, B = 4
    >>> V = torch.randn(3, 4, 1, dtype=torch.float64)
    >>> out = torch.empty_like(V)
    >>> sample_space_mul(W, V, 0.5, out)
    >>> dense = torch.eye(4, dtype=torch.float64) - W.transpose(1, 2) @ W
    >>> torch.allclose(out, dense @ V / 0.5)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Bytes of factor per batched product. Half the 2 MiB+ L2 of current x86 cores (4 MiB per core
#: on the machine of the benchmarks), so that a chunk read for ``W v`` is still there for ``Wᵀu``.
CHUNK_BYTES = 1 << 20


def runs(starts: Tensor, size: int, bytes_per_block: int) -> list[tuple[int, int, int]]:
    """Cut blocks of one size into runs of consecutive blocks of at most ``CHUNK_BYTES``.

    Args:
        starts: (nb,) first flat index of each block, increasing.
        size: Entries per block.
        bytes_per_block: Bytes of factor per block (at least one block per run).

    Returns:
        ``(first, count, start)``: blocks ``first .. first + count`` cover the flat indices
        ``[start, start + count · size)``.

    Example:
        >>> runs(torch.tensor([0, 4, 8, 20]), 4, CHUNK_BYTES // 2)
        [(0, 2, 0), (2, 1, 8), (3, 1, 20)]
    """
    step = max(1, CHUNK_BYTES // max(1, bytes_per_block))
    s = starts.tolist()
    out, first = [], 0
    for i in range(1, len(s) + 1):
        if i == len(s) or s[i] != s[i - 1] + size or i - first == step:
            out.append((first, i - first, s[first]))
            first = i
    return out


def _row_chunk(rows: int, size: int, count: int, itemsize: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // max(1, count * size * itemsize)))


def sample_space_mul(W: Tensor, V: Tensor, damp: float, out: Tensor) -> None:
    """``out = (V − Wᵀ(W V)) / damp`` per block: the sample-space inverse Fisher times ``V``.

    Args:
        W: (c, m, B) the kept factors ``L⁻¹G_b`` of ``c`` blocks (any batch stride).
        V: (c, B, k) the vectors, restricted to those blocks.
        damp: The damping ``λ``.
        out: (c, B, k) written in place; may not alias ``V``.
    """
    c, m, B = W.shape
    rows = _row_chunk(m, B, c, W.element_size())
    if c == 1 and rows == m and V.shape[2] == 1:
        # One cache-sized block, one vector: the two matrix-vector products of the floor.
        v = V[0, :, 0]
        torch.addmv(v, W[0].T, W[0].mv(v), alpha=-1, out=out[0, :, 0])
        out.mul_(1.0 / damp)
        return
    R = torch.zeros(c, V.shape[2], B, dtype=V.dtype, device=V.device)  # (Wᵀ W V)ᵀ
    for r in range(0, m, rows):
        Wr = W[:, r : r + rows]
        R.baddbmm_(torch.bmm(Wr, V).transpose(1, 2), Wr)
    torch.sub(V, R.transpose(1, 2), out=out)
    out.mul_(1.0 / damp)


def dense_mul(Finv: Tensor, V: Tensor, out: Tensor) -> None:
    """``out = F⁻¹ V`` per block for symmetric ``F⁻¹`` (c, B, B), as ``(Vᵀ F⁻¹)ᵀ``.

    Args:
        Finv: (c, B, B) symmetric inverse blocks.
        V: (c, B, k).
        out: (c, B, k) written in place.
    """
    out.copy_(torch.bmm(V.transpose(1, 2), Finv).transpose(1, 2))


def gram_mul(G: Tensor, V: Tensor, damp: float, out: Tensor) -> None:
    """``out = damp·V + G_bᵀ(G_b V)/m`` per block: the damped empirical Fisher times ``V``.

    Args:
        G: (c, m, B) gradients of ``c`` blocks (a strided view of the (m, d) gradients).
        V: (c, B, k).
        damp: The damping ``λ``.
        out: (c, B, k) written in place; may not alias ``V``.
    """
    c, m, B = G.shape
    rows = _row_chunk(m, B, c, G.element_size())
    R = torch.zeros(c, V.shape[2], B, dtype=V.dtype, device=V.device)
    for r in range(0, m, rows):
        Gr = G[:, r : r + rows]
        R.baddbmm_(torch.bmm(Gr, V).transpose(1, 2), Gr)
    torch.add(V, R.transpose(1, 2), alpha=1.0 / (m * damp), out=out)
    out.mul_(damp)
