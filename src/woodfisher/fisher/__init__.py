"""Inverse-curvature estimates behind one interface (diag, IHVP, columns)."""

from woodfisher.fisher.base import DenseInverse, InverseCurvature, make_blocks
from woodfisher.fisher.blocks import EmpiricalFisherInverse
from woodfisher.fisher.memory import MemoryPlan, plan_memory

__all__ = [
    "DenseInverse",
    "EmpiricalFisherInverse",
    "InverseCurvature",
    "MemoryPlan",
    "make_blocks",
    "plan_memory",
]
