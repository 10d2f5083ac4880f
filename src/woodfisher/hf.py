"""Hugging Face ``transformers`` models: save a pruned model so ``from_pretrained`` loads it.

Pruning itself needs nothing special: :func:`woodfisher.prune` takes Hugging Face dict batches
(``{"input_ids": ..., "attention_mask": ..., "labels": ...}``) and reads ``.logits`` from the
output (see :mod:`woodfisher.batch`). Masks are ``torch.nn.utils.prune`` state, which
``save_pretrained`` would store as ``weight_orig``/``weight_mask`` pairs that ``from_pretrained``
does not know; :func:`save_pretrained` bakes the masks into a copy first, so the directory holds
plain weights (safetensors) with exact zeros. Needs the ``hf`` extra
(``pip install 'woodfisher[hf]'``).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from woodfisher.pruning.masks import bake


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write a (pruned) ``transformers`` model with its masks baked in, as safetensors.

    The model itself is left as it is (masks kept). The directory is written next to its final
    place and renamed into it, so an interrupted save leaves no half-written model.

    Args:
        model: A ``transformers.PreTrainedModel``, pruned with woodfisher or not.
        out_dir: Directory to create (replaced if it exists).

    Returns:
        The directory.

    Raises:
        ValueError: If ``model`` has no ``save_pretrained`` (not a ``transformers`` model).
    """
    if not hasattr(model, "save_pretrained"):
        raise ValueError(
            f"{type(model).__name__} has no save_pretrained(); this is for transformers models "
            "(save other models with woodfisher.save_checkpoint)"
        )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    plain = bake(copy.deepcopy(model))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
