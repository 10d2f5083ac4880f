"""What every resumable training job shares: seeds per epoch, fingerprints and resume files.

A job (``woodfisher gradual``, ``woodfisher fdnp``, ...) writes a resume file atomically after
every epoch, holding the model (with its masks), the optimizer state, the history and whatever
else its loop carries. A run killed at any point and resumed from that file ends exactly where
an uninterrupted run with the same seed ends, because everything random is drawn from streams
seeded by ``(seed, epoch, use)`` (:func:`stream_seed`) rather than from a global generator, and
because a resume is accepted only for the same options and starting model
(:func:`fingerprint`).

Example:
    >>> stream_seed(0, 3, "shuffle") == stream_seed(0, 3, "shuffle") != stream_seed(0, 4, "shuffle")
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from woodfisher.checkpoint import atomic_save

__all__ = [
    "fingerprint",
    "load_resume",
    "open_job",
    "ordered_params",
    "save_resume",
    "steps_per_epoch",
    "stream_seed",
    "take_subset",
]


def stream_seed(seed: int, epoch: int, stream: str) -> int:
    """The seed of one random stream: one independent stream per ``(seed, epoch, use)``.

    Resuming at epoch k redraws exactly what the uninterrupted run drew there, whatever
    happened before.

    Args:
        seed: The run's seed.
        epoch: The epoch (0-based).
        stream: What the numbers are for (``"shuffle"``, ``"prune"``, ...).

    Returns:
        A non-negative integer below 2**56.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{stream}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def fingerprint(fields: dict[str, Any], model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A hash of a job's options and of its starting model (names, shapes and values).

    Args:
        fields: The options that fix the result, JSON-able (others are hashed as ``str``).
        model: The model the run starts from, or named tensors the job reads (its data).

    Returns:
        16 hex digits; a resume file is accepted only with the same value.
    """
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    state = model.state_dict() if isinstance(model, nn.Module) else model
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def ordered_params(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters sorted by name, ``weight_orig`` counted as ``weight``.

    Pruning re-registers a weight as ``weight_orig`` after its bias; sorting on the canonical
    name gives an optimizer the same parameter order before and after pruning, which its
    ``state_dict`` (indexed by position) relies on when a resume builds it on a pruned model.

    Args:
        model: Any module.

    Returns:
        The parameters in a pruning-independent order.
    """
    named = sorted(model.named_parameters(), key=lambda kv: kv[0].removesuffix("_orig"))
    return [p for _, p in named]


def steps_per_epoch(data: Any, batch_size: int) -> int | None:
    """Batches in one pass over ``data`` (a Dataset in batches, or a sized iterable of batches).

    Args:
        data: A map-style Dataset or an iterable of batches.
        batch_size: Batch size for a Dataset.

    Returns:
        The count, or None when ``data`` has no length.
    """
    if isinstance(data, Dataset):
        return math.ceil(len(data) / batch_size)
    try:
        return len(data)
    except TypeError:
        return None


def take_subset(data: Any, n: int | None, error: type[ValueError] = ValueError) -> Any:
    """The first ``n`` samples of a Dataset (all of it for None).

    Args:
        data: A map-style Dataset.
        n: Number of samples, or None.
        error: The ``ValueError`` subclass to raise.

    Returns:
        A TensorDataset slice (keeps ``as_batches``' fast path) or a ``Subset``.

    Raises:
        ValueError: (as ``error``) If ``data`` is not a Dataset or has fewer than ``n`` samples.
    """
    if n is None:
        return data
    if not isinstance(data, Dataset):
        raise error("train_subset needs a Dataset as training data, not an iterable")
    if n > len(data):
        raise error(f"train_subset={n} exceeds the {len(data)} training samples")
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[:n] for t in data.tensors))
    return Subset(data, range(n))


def save_resume(
    path: str | os.PathLike,
    *,
    fmt: str,
    fingerprint: str,
    next_epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, Any]],
    config: dict[str, Any],
    **extra: Any,
) -> Path:
    """Write a resume file atomically (loadable with ``weights_only=True``).

    Args:
        path: The resume file.
        fmt: The job's format tag (checked on load).
        fingerprint: :func:`fingerprint` of the job.
        next_epoch: The first epoch a resume runs.
        model: The model; its state dict (with masks) is saved.
        optimizer: The optimizer; its state (momentum) is saved.
        history: Rows of the epochs done (stored as JSON text).
        config: The job's options (stored as JSON text, for people reading the file).
        **extra: More state of the job's loop (tensors, numbers, strings, lists, dicts).

    Returns:
        ``path`` as a ``Path``.
    """
    return atomic_save(
        {
            "format": fmt,
            "fingerprint": fingerprint,
            "next_epoch": next_epoch,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "history": json.dumps(history),
            "config": json.dumps(config, default=str),
            **extra,
        },
        path,
    )


def load_resume(
    path: str | os.PathLike,
    fingerprint: str,
    fmt: str,
    command: str,
    error: type[ValueError] = ValueError,
) -> dict[str, Any]:
    """Read a resume file and check it belongs to this job.

    Args:
        path: The resume file.
        fingerprint: :func:`fingerprint` of the job asking.
        fmt: The job's format tag.
        command: The CLI command that writes such files (for the messages).
        error: The ``ValueError`` subclass to raise.

    Returns:
        The saved dict; ``history`` is decoded into a list.

    Raises:
        ValueError: (as ``error``) If the file is missing, unreadable, of another format or of
            another run (different options or starting model).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"resume requested but there is no resume file at {path}; "
                    "start without --resume")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise error(f"{path} is not a {command} resume file ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise error(
            f"{path} is not a {command} resume file (no format={fmt!r}); pass the file "
            f"`woodfisher {command}` wrote next to its output, or start without --resume"
        )
    if state.get("fingerprint") != fingerprint:
        raise error(
            f"{path} belongs to another run or model (fingerprint {state.get('fingerprint')} "
            f"!= {fingerprint}); resume with the same checkpoint and options, or start "
            "without --resume"
        )
    return {**state, "history": json.loads(state["history"])}


def open_job(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None,
    command: str,
    output_paths: Any,
    error: type[ValueError],
    purpose: str,
    data_dir: str | os.PathLike | None = None,
    device: Any = None,
) -> tuple[Path, dict[str, Path], nn.Module, dict[str, Any], Any]:
    """What a long CLI job does before its work: outputs checked, checkpoint and data loaded.

    Args:
        checkpoint: The checkpoint the job starts from.
        out: Its output checkpoint; default ``<checkpoint stem>-<command>.pt`` beside it.
        command: The command's name (for the default output and messages).
        output_paths: The job's ``output_paths(out)`` → name to path of every file it writes.
        error: The job's ``ValueError`` subclass.
        purpose: What the dataset is for, in messages ("train on", "fine-tune on").
        data_dir: Directory of the dataset files.
        device: Where the model goes (see :func:`woodfisher.device.resolve_device`).

    Returns:
        ``(out, paths, model, info, splits)``.

    Raises:
        ValueError: (as ``error`` where it is the job's own) If an output would overwrite the
            input or cannot be written, or the checkpoint names no dataset.
    """
    from woodfisher.checkpoint import check_writable, load_checkpoint
    from woodfisher.data import load_dataset

    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_name(f"{checkpoint.stem}-{command}.pt")
    paths = output_paths(out)
    if paths["checkpoint"].resolve() == checkpoint.resolve():
        raise error(f"--out {out} would overwrite the input checkpoint; pick another name")
    for p in paths.values():
        check_writable(p)
    model, info = load_checkpoint(checkpoint)
    if device is not None:
        from woodfisher.device import resolve_device

        model.to(resolve_device(device))
    saved = info["dataset"]
    if not saved.get("dataset"):
        raise error(f"checkpoint {checkpoint} names no dataset to {purpose}")
    splits = load_dataset(saved["dataset"], data_dir=data_dir,
                          normalisation=saved if "mean" in saved else None)
    return out, paths, model, info, splits
