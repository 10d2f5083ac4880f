"""Inverse-curvature estimates behind one interface (diag, IHVP, columns)."""

from woodfisher.fisher.base import DenseInverse, InverseCurvature, make_blocks
from woodfisher.fisher.blocks import EmpiricalFisherInverse
from woodfisher.fisher.diagonal import DiagonalFisherInverse
from woodfisher.fisher.exact import exact_empirical_fisher, exact_hessian
from woodfisher.fisher.kfac import KFACInverse, kfac_inverse
from woodfisher.fisher.memory import MemoryPlan, plan_memory

__all__ = [
    "DenseInverse",
    "DiagonalFisherInverse",
    "EmpiricalFisherInverse",
    "InverseCurvature",
    "KFACInverse",
    "MemoryPlan",
    "exact_empirical_fisher",
    "exact_hessian",
    "kfac_inverse",
    "make_blocks",
    "plan_memory",
]
