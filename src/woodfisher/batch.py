"""Batches and model outputs as users have them, behind a few small functions.

A batch is ``(inputs, targets)`` where ``inputs`` is a tensor (passed as ``model(x)``), a tuple
(passed as ``model(*x)``) or a dict (passed as ``model(**x)``); or it is a dict with a
``labels`` key, Hugging Face style, whose other entries are the keyword inputs. A model's output
is a tensor, a tuple (its first element holds the logits) or an object with ``.logits`` (a
Hugging Face ``ModelOutput``). Every part of woodfisher that runs a model goes through
:func:`split_batch`, :func:`call_model` and :func:`logits_of`, so a model that works in one
place works everywhere.

Inputs are trees of one level: a tensor, a tuple/list of tensors or a dict of tensors; entries
that are not tensors (flags such as ``return_dict=True``) are passed through unchanged.

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.ones(4, 3, dtype=torch.long), "labels": torch.zeros(4)}
    >>> inputs, targets = split_batch(batch)
    >>> sorted(inputs), tuple(targets.shape), batch_len(inputs)
    (['input_ids'], (4,), 4)
    >>> describe(take(inputs, slice(0, 2)))
    '{input_ids: int64(2, 3)}'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Inputs = Any  # Tensor | tuple[Tensor, ...] | dict[str, Tensor]

#: Keys a Hugging Face style dict batch may use for its targets.
LABEL_KEYS = ("labels", "label")


def split_batch(batch: object, index: int | None = None) -> tuple[Inputs, Tensor]:
    """``(inputs, targets)`` of one batch.

    Args:
        batch: ``(inputs, targets, ...)`` (extra items dropped) or a dict with a ``labels``
            (or ``label``) key.
        index: The batch's position, for the error message.

    Returns:
        The inputs (tensor, tuple or dict) and the targets tensor.

    Raises:
        ValueError: If the batch has neither form (the message shows what was received).
    """
    if isinstance(batch, dict):
        for key in LABEL_KEYS:
            if key in batch:
                inputs = {k: v for k, v in batch.items() if k != key}
                return inputs, torch.as_tensor(batch[key])
        raise ValueError(
            f"dict batch{_at(index)} has no 'labels' key: got {describe(batch)}; give the "
            "targets as batch['labels'] or yield (inputs, targets) pairs"
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
        if _has_tensor(inputs) and isinstance(targets, Tensor):
            return (tuple(inputs) if isinstance(inputs, list) else inputs), targets
    raise ValueError(
        f"batch{_at(index)} must be (inputs, targets) with inputs a tensor, tuple or dict of "
        f"tensors, or a dict with a 'labels' key; got {describe(batch)}"
    )


def _at(index: int | None) -> str:
    return "" if index is None else f" {index}"


def _has_tensor(inputs: object) -> bool:
    if isinstance(inputs, Tensor):
        return True
    if isinstance(inputs, dict):
        return any(isinstance(v, Tensor) for v in inputs.values())
    if isinstance(inputs, (tuple, list)):
        return any(isinstance(v, Tensor) for v in inputs)
    return False


def map_tensors(inputs: Inputs, fn: Callable[[Tensor], Tensor]) -> Inputs:
    """Apply ``fn`` to every tensor of ``inputs``, keeping the structure.

    Returns:
        Inputs of the same structure.
    """
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, dict):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(fn(v) if isinstance(v, Tensor) else v for v in inputs)
    return inputs


def tensors_of(inputs: Inputs) -> list[Tensor]:
    """The tensors of ``inputs``, in order.

    Returns:
        A list of tensors.
    """
    if isinstance(inputs, Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return [v for v in values if isinstance(v, Tensor)]


def batch_len(inputs: Inputs) -> int:
    """Number of samples: the leading dimension of the first tensor.

    Returns:
        The batch size.

    Raises:
        ValueError: If ``inputs`` holds no batched tensor.
    """
    ts = [t for t in tensors_of(inputs) if t.ndim > 0]
    if not ts:
        raise ValueError(f"inputs hold no batched tensor: got {describe(inputs)}")
    return int(ts[0].shape[0])


def take(inputs: Inputs, index: slice | Tensor) -> Inputs:
    """Rows ``index`` of every batched tensor.

    Returns:
        Inputs of the same structure.
    """
    return map_tensors(inputs, lambda t: t[index] if t.ndim > 0 else t)


def cat(parts: Sequence[Inputs]) -> Inputs:
    """Concatenate batches of inputs of one structure along the batch dimension.

    Returns:
        Inputs of the same structure.
    """
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, dict):
        return {
            k: torch.cat([p[k] for p in parts]) if isinstance(v, Tensor) and v.ndim > 0 else v
            for k, v in first.items()
        }
    return tuple(
        torch.cat([p[i] for p in parts]) if isinstance(v, Tensor) and v.ndim > 0 else v
        for i, v in enumerate(first)
    )


def to_device(
    inputs: Inputs,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    non_blocking: bool = False,
) -> Inputs:
    """Move every tensor to ``device``; floating tensors also to ``dtype`` when given.

    Returns:
        Inputs of the same structure.
    """

    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return t.to(device, non_blocking=non_blocking)

    return map_tensors(inputs, move)


def call_model(model: nn.Module, inputs: Inputs) -> object:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` by the structure of ``inputs``.

    Returns:
        What the model returns.
    """
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def call_functional(model: nn.Module, state: dict[str, Tensor], inputs: Inputs) -> object:
    """:func:`torch.func.functional_call` with ``inputs`` passed as :func:`call_model` does.

    Returns:
        What the model returns.
    """
    from torch.func import functional_call

    if isinstance(inputs, dict):
        return functional_call(model, state, (), inputs)
    if isinstance(inputs, tuple):
        return functional_call(model, state, inputs)
    return functional_call(model, state, (inputs,))


def logits_of(output: object) -> Tensor:
    """The logits in a model's output: the tensor, a tuple's first element, or ``.logits``.

    Returns:
        A tensor.

    Raises:
        ValueError: If the output holds no logits.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(
        f"the model's output is a {type(output).__name__} without logits (expected a tensor, a "
        "tuple whose first element is the logits, or an object with .logits); pass a loss_fn "
        "that takes this output"
    )


def default_loss(output: object, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the logits in ``output`` against integer ``targets``.

    Sequence outputs (logits ``(B, T, C)`` with targets ``(B, T)``) are flattened, and targets
    of ``-100`` are ignored, as Hugging Face models do.

    Returns:
        A scalar tensor.
    """
    logits = logits_of(output)
    if logits.ndim > 2 and targets.ndim == logits.ndim - 1:
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1)
    return nn.functional.cross_entropy(logits, targets)


def predictions(output: object) -> Tensor:
    """Predicted classes: the argmax of the logits over the last dimension.

    Returns:
        An integer tensor.
    """
    return logits_of(output).argmax(-1)


def describe(value: object) -> str:
    """A short description of a batch's structure, for error messages.

    Returns:
        E.g. ``"{input_ids: int64(8, 16), labels: int64(8,)}"``.
    """
    if isinstance(value, Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dtype}{tuple(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return type(value).__name__
