"""Where the work runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked once, up front.

The library follows the model: every function computes on the device of the model's weights
(gradients, inverse factors, scores and updates stay there; data is moved batch by batch). The
CLI moves the model with :func:`resolve_device` before it starts. Float64 works on every device
(for checks), float32 is the fast default.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto").type in ("cpu", "cuda")
    True
"""

from __future__ import annotations

import re

import torch
from torch import nn

#: What ``--device`` accepts.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_HELP = "Device: auto (CUDA when available), cpu, cuda or cuda:N."

_CUDA = re.compile(r"cuda(?::(\d+))?")


def cuda_unavailable_reason() -> str:
    """Why CUDA cannot be used here, in a few words (for error messages).

    Returns:
        E.g. ``"this torch (2.13.0+cpu) is built without CUDA"``.
    """
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a device name into a ``torch.device`` that exists on this machine.

    Args:
        spec: ``"auto"`` or None (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or a ``torch.device``.

    Returns:
        The device.

    Raises:
        ValueError: If the name is unknown, CUDA is asked for but unavailable, or ``N`` is not
            one of the visible GPUs.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = "auto" if spec is None else str(spec).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(name)
    if match is None:
        raise ValueError(
            f"unknown device {spec!r}; choose auto, cpu, cuda or cuda:N (N = GPU number)"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {spec!r} asked for, but {cuda_unavailable_reason()}; use --device cpu "
            "(or auto)"
        )
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"device {spec!r} does not exist: {count} GPU(s) visible (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a model without tensors.

    Returns:
        The device the library computes on for this model.

    Example:
        >>> model_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch: tuple, device: torch.device) -> tuple:
    """Move an ``(inputs, targets)`` pair to ``device`` (no copy when already there); inputs
    may be a tensor, a tuple or a dict (see :mod:`woodfisher.batch`).

    Returns:
        The pair on ``device``.
    """
    from woodfisher.batch import to_device as inputs_to

    x, y = batch[0], batch[1]
    non_blocking = device.type == "cuda"
    return (
        inputs_to(x, device, non_blocking=non_blocking),
        y.to(device, non_blocking=non_blocking) if isinstance(y, torch.Tensor) else y,
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (for honest timings); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on a CUDA device since the last reset, else None.

    Returns:
        Bytes, or None on CPU (use the process's peak RSS there).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


__all__ = [
    "DEVICE_CHOICES",
    "DEVICE_HELP",
    "cuda_unavailable_reason",
    "model_device",
    "peak_memory",
    "resolve_device",
    "synchronize",
    "to_device",
]
