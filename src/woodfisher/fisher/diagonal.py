"""The diagonal empirical Fisher (Optimal Brain Damage): ``F ≈ damp + mean(g²)`` entrywise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from woodfisher.fisher.base import InverseCurvature, make_blocks
from woodfisher.fisher.blocks import check_damp, check_grads, layout_sizes
from woodfisher.params import Layout


class DiagonalFisherInverse(InverseCurvature):
    """Inverse of the diagonal of the damped empirical Fisher, ``1 / (damp + (1/m) Σ g²)``.

    A diagonal matrix is block-diagonal for any partition, so ``blocks`` are the layers (one
    block when no layout is given); every query is answered entrywise.

    Args:
        grads: (m, d) gradients.
        damp: The damping ``> 0``.
        layout: A :class:`~woodfisher.params.Layout` or layer sizes.

    Raises:
        ValueError: On bad gradients, damping or layout.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
        >>> DiagonalFisherInverse(G, damp=1.0).diag()
        tensor([0.5000, 0.3333], dtype=torch.float64)
    """

    def __init__(
        self, grads: Tensor, damp: float = 1e-5, layout: Layout | Sequence[int] | None = None
    ):
        check_grads(grads)
        self.damp = check_damp(damp)
        self.num_grads, self.d = grads.shape
        self.blocks = make_blocks(layout_sizes(layout, self.d), None if layout is None else 1 << 62)
        self.dtype, self.device = grads.dtype, grads.device
        self.fisher_diag = grads.square().mean(0) + self.damp
        self.inverse_diag = 1 / self.fisher_diag

    def _matmat(self, V: Tensor) -> Tensor:
        return self.inverse_diag[:, None] * V

    def fmul(self, v: Tensor) -> Tensor:
        """``F v = (damp + mean(g²)) ⊙ v``.

        Args:
            v: Shape (d,) or (d, k).

        Returns:
            A tensor of the shape of ``v``.
        """
        return (self.fisher_diag[:, None] * self._check_vectors(v)).reshape(v.shape)

    def diag(self) -> Tensor:
        """The diagonal of ``F⁻¹``.

        Returns:
            A (d,) tensor.
        """
        return self.inverse_diag.clone()

    def columns(self, idx: Tensor) -> Tensor:
        """Columns ``F⁻¹[:, idx]`` (one nonzero each).

        Returns:
            A (d, len(idx)) tensor.
        """
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device).reshape(-1)
        out = torch.zeros(self.d, idx.numel(), dtype=self.dtype, device=self.device)
        out[idx, torch.arange(idx.numel(), device=self.device)] = self.inverse_diag[idx]
        return out

    def block(self, b: int) -> Tensor:
        """The (diagonal) inverse of block ``b``.

        Returns:
            A (B, B) tensor.
        """
        s, e = self.blocks[b]
        return torch.diag(self.inverse_diag[s:e])

    def principal_blocks(self, index: Tensor) -> Tensor:
        """Diagonal ``[F⁻¹]_QQ`` for every row ``Q`` of ``index``.

        Returns:
            (G, g, g) tensor.
        """
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return torch.diag_embed(self.inverse_diag[index])

    def constrained_min(
        self, fixed: Tensor, values: Tensor, linear: Tensor | None = None
    ) -> Tensor:
        """Minimise ``gᵀδ + ½ δᵀFδ`` with ``δ[fixed] = values[fixed]``; F diagonal decouples it.

        Args:
            fixed: (d,) bool, the constrained entries.
            values: (d,) the values on ``fixed``.
            linear: (d,) the linear term, or None.

        Returns:
            ``δ`` with ``δ[fixed] = values[fixed]`` and ``δ_i = -g_i / F_ii`` elsewhere.

        Raises:
            ValueError: If the shapes are not (d,).
        """
        for name, t in (("fixed", fixed), ("values", values), ("linear", linear)):
            if t is not None and tuple(t.shape) != (self.d,):
                raise ValueError(f"{name} must have shape ({self.d},), got {tuple(t.shape)}")
        values = values.to(self.dtype)
        out = -self.mul(linear) if linear is not None else torch.zeros_like(values)
        fixed = fixed.to(torch.bool)
        out[fixed] = values[fixed]
        return out
