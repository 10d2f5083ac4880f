"""The inverse of a batch of symmetric positive definite matrices, mostly in matmuls.

``F⁻¹ = L⁻ᵀ L⁻¹`` from the Cholesky factor ``L``: LAPACK factorises (``potrf``, ``n³/3``
flops), the triangular inverse recurses on halves so that all but its leaves are batched
matrix products (``[[L11, 0], [L21, L22]]⁻¹ = [[X11, 0], [−X22 L21 X11, X22]]``), and
``L⁻ᵀ L⁻¹`` is one batched product. This is the accurate route in float32: an inverse by block
elimination with explicit Schur complements ``A22 − A21 A11⁻¹ A12`` needs a third fewer flops
but loses positive definiteness for the Fisher blocks of a trained network (condition numbers
~3e5 in MLPNet's last layer; 28 of 34 batches failed), where a Cholesky factor keeps float32's
relative error of the diagonal below 0.5 % (measured against float64).

Example:
    >>> A = torch.randn(3, 300, 300, dtype=torch.float64)
    >>> A = A @ A.mT + 300 * torch.eye(300, dtype=torch.float64)
    >>> torch.allclose(spd_inverse(A), torch.stack([torch.linalg.inv(a) for a in A]))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Triangles up to this size are inverted by LAPACK (recursion does not pay below it).
LEAF = 128


def _split(n: int) -> int:
    # Halves on a multiple of 32 keep the products' shapes friendly to the matmul kernels.
    return (n // 2 + 31) // 32 * 32


def cholesky(A: Tensor) -> Tensor:
    """Lower Cholesky factor of a batch of SPD matrices (LAPACK / cuSOLVER).

    Args:
        A: (..., n, n) symmetric positive definite (the lower triangle is read).

    Returns:
        ``L`` with ``L Lᵀ = A``.

    Raises:
        ValueError: If ``A`` is not positive definite in its dtype (the message says why and
            what to do).
    """
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        raise ValueError(
            f"the damped Fisher is not positive definite in {A.dtype} (leading minor of order "
            f"{int(info.max())} is not > 0); the damp is too small against the gradients (are "
            "they far from 1, e.g. a diverged model?): use a larger damp or float64"
        )
    return L


def tri_inverse(L: Tensor) -> Tensor:
    """Inverse of a batch of lower-triangular matrices, recursing into matmuls.

    Args:
        L: (..., n, n) lower triangular with a nonzero diagonal.

    Returns:
        ``L⁻¹``, lower triangular.
    """
    n = L.shape[-1]
    if n <= LEAF:
        eye = torch.eye(n, dtype=L.dtype, device=L.device).expand_as(L)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    h = _split(n)
    X = torch.zeros_like(L)
    X11 = tri_inverse(L[..., :h, :h])
    X22 = tri_inverse(L[..., h:, h:])
    X[..., :h, :h] = X11
    X[..., h:, h:] = X22
    X[..., h:, :h] = -(X22 @ (L[..., h:, :h] @ X11))
    return X


def spd_inverse(A: Tensor, out: Tensor | None = None) -> Tensor:
    """Inverse of a batch of SPD matrices: Cholesky, triangular inverse, one product.

    Args:
        A: (..., n, n) symmetric positive definite (the lower triangle is read).
        out: Optional tensor of ``A``'s shape for the result (may be ``A`` itself).

    Returns:
        ``A⁻¹``.

    Raises:
        ValueError: If ``A`` is not positive definite in its dtype.
    """
    X = tri_inverse(cholesky(A))
    return torch.matmul(X.mT, X, out=out)


__all__ = ["LEAF", "cholesky", "spd_inverse", "tri_inverse"]
