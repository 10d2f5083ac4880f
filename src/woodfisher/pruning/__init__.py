"""Pruning: scores, exact-k selection, OBS updates and ``torch.nn.utils.prune`` masks."""

from woodfisher.pruning.api import (
    Curvature,
    LayerResult,
    PruneResult,
    build_inverse,
    prune,
)
from woodfisher.pruning.masks import apply_masks, bake, compute_masks
from woodfisher.pruning.methods import (
    DEFAULTS,
    METHODS,
    UPDATES,
    Method,
    get_method,
)
from woodfisher.pruning.obs import (
    finish_update,
    independent_update,
    joint_update,
    magnitude_saliency,
    obs_saliency,
    quadratic_model,
    woodtaylor_saliency,
)
from woodfisher.pruning.schedule import interpolate, polynomial_sparsity, pruning_steps
from woodfisher.pruning.select import SCOPES, select, select_by_sparsity

__all__ = [
    "DEFAULTS",
    "METHODS",
    "SCOPES",
    "UPDATES",
    "Curvature",
    "LayerResult",
    "Method",
    "PruneResult",
    "apply_masks",
    "bake",
    "build_inverse",
    "compute_masks",
    "finish_update",
    "get_method",
    "independent_update",
    "interpolate",
    "joint_update",
    "magnitude_saliency",
    "obs_saliency",
    "polynomial_sparsity",
    "prune",
    "pruning_steps",
    "quadratic_model",
    "select",
    "select_by_sparsity",
    "woodtaylor_saliency",
]
