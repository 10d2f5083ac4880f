"""The paper's Woodbury recursion: the reference for the block-wise inverse empirical Fisher.

Singh & Alistarh (2020), eq. (7): starting from ``F_0⁻¹ = I/damp``, each gradient is folded in
by a rank-one update

.. math::

    F_k^{-1} = F_{k-1}^{-1}
        - \\frac{F_{k-1}^{-1} g_k g_k^T F_{k-1}^{-1}}{m + g_k^T F_{k-1}^{-1} g_k}

so that ``F_m⁻¹ = (damp·I + (1/m) Σ g gᵀ)⁻¹`` exactly. It is sequential over samples and costs
``O(m B²)`` per block; :mod:`woodfisher.fisher.blocks` computes the same numbers fast. This module
stays deliberately plain: it is the oracle.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from tqdm import tqdm


def woodbury_block_inverse(grads: Tensor, damp: float) -> Tensor:
    """Inverse of ``damp·I + (1/m) GᵀG`` for one block by ``m`` rank-one Woodbury updates.

    Args:
        grads: (m, B) gradients restricted to the block.
        damp: The damping ``> 0``.

    Returns:
        The (B, B) inverse, in the dtype of ``grads``.

    Example:
        >>> G = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> F = 0.5 * torch.eye(2, dtype=torch.float64) + G.T @ G
        >>> torch.allclose(woodbury_block_inverse(G, 0.5), torch.linalg.inv(F))
        True
    """
    m, B = grads.shape
    inv = torch.eye(B, dtype=grads.dtype, device=grads.device) / damp
    for k in range(m):
        g = grads[k]
        u = inv @ g
        inv -= torch.outer(u, u) / (m + g @ u)
    return inv


def woodbury_inverse_blocks(
    grads: Tensor,
    blocks: tuple[tuple[int, int], ...],
    damp: float,
    progress: bool = False,
) -> list[Tensor]:
    """Run :func:`woodbury_block_inverse` on every block, one after the other.

    Args:
        grads: (m, d) gradients.
        blocks: ``(start, stop)`` of each block.
        damp: The damping ``> 0``.
        progress: Show a progress bar on stderr.

    Returns:
        One dense (B, B) inverse per block.
    """
    it = tqdm(blocks, desc="woodbury blocks", file=sys.stderr, disable=not progress)
    return [woodbury_block_inverse(grads[:, s:e], damp) for s, e in it]
