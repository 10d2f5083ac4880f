"""Inverse-curvature estimates behind one interface (diag, IHVP, columns)."""

from woodfisher.fisher.base import DenseInverse, InverseCurvature, make_blocks

__all__ = ["DenseInverse", "InverseCurvature", "make_blocks"]
