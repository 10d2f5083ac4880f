"""Low-rank compression: factorised layers, rank measures, rank rules, RENE, fine-tuning.

``decompose(model, params=0.3, method="tucker2", ranks="fisher", data=...)`` returns a new model
whose selected Linear/Conv2d layers are ordinary ``nn.Sequential`` chains of smaller layers (see
:mod:`woodfisher.lowrank.layers`), chosen under a parameter or FLOP budget by a rank rule
(:data:`RANK_RULES`): uniform, energy, effective rank, ℓ1 rank, RENE's search
(:mod:`woodfisher.lowrank.rene`) or ours, the Fisher-predicted loss increase. Training helpers
(:mod:`woodfisher.lowrank.training`) cover the survey's three families: fine-tuning a decomposed
pre-trained model with distillation, compression-aware training with a rank penalty, and
training a factorised model from scratch. tensorly is imported only when a Tucker-2 or CP
decomposition runs (extra ``woodfisher[lowrank]``).
"""

from woodfisher.lowrank.decompose import RANK_RULES, checkpoint_spec, decompose, describe_model
from woodfisher.lowrank.layers import (
    METHODS,
    compose,
    factor_params,
    factorise,
    factorised_layers,
    max_rank,
)
from woodfisher.lowrank.measures import (
    effective_rank,
    energy_rank,
    l1_rank,
    layer_measures,
    nuclear_norm,
    stable_rank,
)
from woodfisher.lowrank.rene import RENE_DEFAULTS

__all__ = [
    "METHODS",
    "RANK_RULES",
    "RENE_DEFAULTS",
    "checkpoint_spec",
    "compose",
    "decompose",
    "describe_model",
    "effective_rank",
    "energy_rank",
    "factor_params",
    "factorise",
    "factorised_layers",
    "l1_rank",
    "layer_measures",
    "max_rank",
    "nuclear_norm",
    "stable_rank",
]
