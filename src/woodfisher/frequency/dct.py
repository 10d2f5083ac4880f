"""The orthonormal 2-D DCT-II of k×k kernels, and their frequency bands.

With the orthonormal DCT matrix

.. math::
    A_{u n} = \\alpha_u \\cos\\frac{\\pi (2n + 1) u}{2k},\\qquad
    \\alpha_0 = \\sqrt{1/k},\\ \\alpha_{u>0} = \\sqrt{2/k},

a kernel slice ``W`` (k×k) has coefficients ``C = A W Aᵀ`` and ``W = Aᵀ C A``. ``A`` is
orthogonal, so inner products are preserved (``⟨P, W⟩ = ⟨A P Aᵀ, C⟩`` for any patch ``P``) and
gradients transform the same way as the weights: ``∂L/∂C = A (∂L/∂W) Aᵀ``. This equals
``scipy.fft.dctn(W, norm="ortho")`` on the last two axes.

The band of coefficient ``(u, v)`` is ``u + v`` (0 … 2k−2): 2k−1 bands, of sizes 1, 2, …, k, …,
2, 1 (the zig-zag diagonals; our choice, the paper's band definition was not retrieved).

Example:
    >>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    >>> torch.allclose(idct2(dct2(w)), w)
    True
    >>> band_index(3).tolist()
    [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    >>> band_sizes(3)
    [1, 2, 3, 2, 1]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["band_index", "band_sizes", "dct2", "dct_matrix", "idct2"]


def dct_matrix(
    k: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The orthonormal DCT-II matrix ``A`` of size k×k (rows are frequencies).

    Args:
        k: Transform length (the kernel size).
        dtype: Floating dtype of the result (computed in float64, then cast).
        device: Device of the result.

    Returns:
        ``A`` with ``A @ A.T == I``.

    Raises:
        ValueError: If ``k`` is not a positive integer.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"DCT length must be a positive integer, got {k!r}")
    n = torch.arange(k, dtype=torch.float64)
    u = n.unsqueeze(1)
    a = torch.cos(math.pi * (2 * n + 1) * u / (2 * k)) * math.sqrt(2.0 / k)
    a[0] = math.sqrt(1.0 / k)
    return a.to(dtype=dtype, device=device)


def _check_square(x: Tensor) -> int:
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"expected square k×k slices in the last two dimensions, got shape {tuple(x.shape)}"
        )
    return int(x.shape[-1])


def dct2(w: Tensor) -> Tensor:
    """2-D orthonormal DCT of every k×k slice (last two dimensions) of ``w``.

    Args:
        w: A tensor ``(..., k, k)``, e.g. a conv weight ``(out, in, k, k)``.

    Returns:
        ``A w Aᵀ`` slice by slice, same shape and dtype; differentiable.

    Raises:
        ValueError: If the last two dimensions are not square.
    """
    a = dct_matrix(_check_square(w), w.dtype, w.device)
    return a @ w @ a.T


def idct2(c: Tensor) -> Tensor:
    """Inverse of :func:`dct2`: ``Aᵀ c A`` on the last two dimensions.

    Args:
        c: Coefficients ``(..., k, k)``.

    Returns:
        The spatial slices, same shape and dtype; differentiable.

    Raises:
        ValueError: If the last two dimensions are not square.
    """
    a = dct_matrix(_check_square(c), c.dtype, c.device)
    return a.T @ c @ a


def band_index(k: int) -> Tensor:
    """Band ``u + v`` of each coefficient of a k×k kernel.

    Args:
        k: Kernel size.

    Returns:
        A (k, k) int64 tensor with entries 0 … 2k−2.
    """
    r = torch.arange(k)
    return r.unsqueeze(1) + r.unsqueeze(0)


def band_sizes(k: int) -> list[int]:
    """Number of coefficients in each of the 2k−1 bands of a k×k kernel.

    Args:
        k: Kernel size.

    Returns:
        ``[1, 2, …, k, …, 2, 1]``.
    """
    return torch.bincount(band_index(k).reshape(-1), minlength=2 * k - 1).tolist()
