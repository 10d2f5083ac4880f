"""woodfisher: compress neural networks with second-order information.

Data, models, checkpoints and the train/evaluate loop that the curvature and pruning code
build on. See ``woodfisher --help`` for the command line.
"""

__version__ = "0.1.0"

from woodfisher.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from woodfisher.data import (  # noqa: E402
    DATASETS,
    DataError,
    DatasetSplits,
    as_batches,
    load_dataset,
    synthetic,
)
from woodfisher.models import MODELS, ShapeError, build_model, check_input  # noqa: E402
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
]
