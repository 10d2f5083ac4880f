"""woodfisher: compress neural networks with second-order information.

WoodFisher (Singh & Alistarh, NeurIPS 2020): a block-diagonal inverse empirical Fisher built
with the Woodbury identity, used for Optimal Brain Surgeon pruning, with the baselines people
compare against. See ``woodfisher --help`` for the command line.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> data = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(4)]
    >>> result = prune(net, data, 0.5, num_grads=64, block_size=32)
    >>> result.sparsity
    0.5
"""

__version__ = "0.1.0"

from woodfisher.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from woodfisher.compare import compare  # noqa: E402
from woodfisher.curvature import FisherInverse, fisher_inverse, ihvp  # noqa: E402
from woodfisher.data import (  # noqa: E402
    DATASETS,
    DataError,
    DatasetSplits,
    as_batches,
    load_dataset,
    synthetic,
)
from woodfisher.fisher import (  # noqa: E402
    DenseInverse,
    DiagonalFisherInverse,
    EmpiricalFisherInverse,
    InverseCurvature,
    KFACInverse,
    exact_empirical_fisher,
    exact_hessian,
    kfac_inverse,
    plan_memory,
)
from woodfisher.flops import FlopReport, count_flops  # noqa: E402
from woodfisher.gradients import gradient_layout, sample_gradients  # noqa: E402
from woodfisher.gradual import GradualConfig, GradualError, gradual  # noqa: E402
from woodfisher.models import MODELS, ShapeError, build_model, check_input  # noqa: E402
from woodfisher.pruning import METHODS, PruneResult, bake, prune  # noqa: E402
from woodfisher.train import (  # noqa: E402
    enforce_masks,
    evaluate,
    sparsity_report,
    train,
    train_and_save,
)

__all__ = [
    "__version__",
    # data
    "DATASETS",
    "DataError",
    "DatasetSplits",
    "as_batches",
    "load_dataset",
    "synthetic",
    # models
    "MODELS",
    "ShapeError",
    "build_model",
    "check_input",
    # checkpoints
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    # training
    "enforce_masks",
    "evaluate",
    "sparsity_report",
    "train",
    "train_and_save",
    # curvature
    "sample_gradients",
    "gradient_layout",
    "InverseCurvature",
    "DenseInverse",
    "EmpiricalFisherInverse",
    "DiagonalFisherInverse",
    "KFACInverse",
    "kfac_inverse",
    "plan_memory",
    "fisher_inverse",
    "FisherInverse",
    "ihvp",
    "exact_hessian",
    "exact_empirical_fisher",
    # model cost
    "count_flops",
    "FlopReport",
    # pruning
    "METHODS",
    "PruneResult",
    "prune",
    "bake",
    "compare",
    "gradual",
    "GradualConfig",
    "GradualError",
]
