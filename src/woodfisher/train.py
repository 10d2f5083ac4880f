"""Train, fine-tune and evaluate, keeping ``torch.nn.utils.prune`` masks intact.

Example:
    >>> from woodfisher.data import synthetic
    >>> from woodfisher.models import build_model
    >>> ds = synthetic(n=128, input_shape=(1, 8, 8), num_classes=3)
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("mlpnet-small", input_shape=(1, 8, 8), num_classes=3)
    >>> hist = train(model, ds, epochs=5, lr=0.05, batch_size=32, progress=False)
    >>> evaluate(model, ds)["accuracy"] > 0.9
    True
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from woodfisher.batch import call_model, default_loss, predictions, to_device
from woodfisher.data import as_batches
from woodfisher.models import check_input

__all__ = [
    "SCHEDULES",
    "enforce_masks",
    "evaluate",
    "lr_at",
    "masked_parameters",
    "sparsity_report",
    "train",
    "train_and_save",
]

SCHEDULES = ("cosine", "step", "constant")


def masked_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Find every pruned tensor: ``(qualified name, X_orig parameter, X_mask buffer)``.

    Args:
        model: Any module.

    Returns:
        One entry per ``(module, tensor)`` pair pruned with ``torch.nn.utils.prune``, e.g.
        ``("fc1.weight", fc1.weight_orig, fc1.weight_mask)``.
    """
    found = []
    for mod_name, module in model.named_modules():
        for buf_name, mask in module.named_buffers(recurse=False):
            if not buf_name.endswith("_mask"):
                continue
            tensor = buf_name[: -len("_mask")]
            orig = getattr(module, f"{tensor}_orig", None)
            if isinstance(orig, torch.Tensor):
                found.append((f"{mod_name}.{tensor}" if mod_name else tensor, orig, mask))
    return found


@torch.no_grad()
def enforce_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero the masked entries of every ``X_orig`` and of its optimizer state.

    The prune reparametrisation already makes the effective weight ``X_orig * X_mask``, so the
    forward pass never sees pruned weights; this also zeroes them in ``X_orig`` itself and in
    the optimizer's per-parameter tensors of the same shape (SGD momentum buffer, Adam
    moments), so momentum cannot carry a pruned weight and ``prune.remove`` bakes exact zeros.

    Args:
        model: The model.
        optimizer: Optional optimizer whose state is masked too.
    """
    for _, orig, mask in masked_parameters(model):
        keep = mask.to(orig.dtype)
        orig.mul_(keep)
        if orig.grad is not None:
            orig.grad.mul_(keep)
        if optimizer is not None and orig in optimizer.state:
            for value in optimizer.state[orig].values():
                if isinstance(value, torch.Tensor) and value.shape == orig.shape:
                    value.mul_(keep.to(value.dtype))


def lr_at(step: int, total: int, lr: float, schedule: str = "cosine") -> float:
    """Learning rate at ``step`` of ``total`` for a schedule.

    Args:
        step: Step index, ``0 <= step < total``.
        total: Number of steps.
        lr: Peak learning rate.
        schedule: ``"cosine"`` (to 0), ``"step"`` (×0.1 at 50 % and 75 %), ``"constant"``.

    Returns:
        The learning rate.

    Raises:
        ValueError: If ``schedule`` is unknown.
    """
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    if schedule == "step":
        return lr * (0.1 ** ((step >= total * 0.5) + (step >= total * 0.75)))
    if schedule == "constant":
        return lr
    raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")


def train(
    model: nn.Module,
    train_data: Any,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    schedule: str = "cosine",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Train ``model`` with SGD + momentum, in place, keeping pruning masks.

    Args:
        model: The model (pruned or not).
        train_data: A Dataset, DataLoader or iterable of ``(x, y)`` batches (see
            :func:`woodfisher.data.as_batches`); a Dataset is shuffled each epoch.
        epochs: Number of passes over the data.
        lr: Peak learning rate.
        batch_size: Batch size for a Dataset.
        seed: Seeds ``torch.manual_seed`` and the shuffling; same seed, same result.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        schedule: Learning-rate schedule, one of ``SCHEDULES`` (updated every step).
        loss_fn: Loss ``(logits, y) -> scalar``; cross-entropy by default.
        progress: Show a progress bar per epoch on stderr.
        device: Device to train on; defaults to where the model's parameters are.
        optimizer: An optimizer over ``model``'s parameters to use (and keep state in) instead
            of a fresh SGD, e.g. to carry momentum across fine-tuning rounds; its learning rate
            is still set by ``lr`` and ``schedule``.

    Returns:
        ``{"epochs", "losses" (mean train loss per epoch), "time_s", "steps", "seed", "lr",
        "batch_size", "momentum", "weight_decay", "schedule"}``.

    Raises:
        ValueError: If a hyper-parameter is out of range, the schedule is unknown, or the data
            does not fit the model.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    lr_at(0, 1, lr, schedule)  # validates the schedule name
    loss_fn = loss_fn or default_loss
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    torch.manual_seed(seed)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                    weight_decay=weight_decay)
    try:
        steps_per_epoch = len(train_data) if not isinstance(train_data, torch.utils.data.Dataset) \
            else math.ceil(len(train_data) / batch_size)
    except TypeError:
        steps_per_epoch = None
    total = steps_per_epoch * epochs if steps_per_epoch else None
    enforce_masks(model)
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    for epoch in range(epochs):
        batches: Iterable = as_batches(train_data, batch_size, shuffle=True, seed=seed + epoch)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                   file=sys.stderr, disable=not progress, leave=False, dynamic_ncols=True)
        running, count = 0.0, 0
        for x, y in bar:
            x, y = to_device(x, device), y.to(device)
            if step == 0 and isinstance(x, torch.Tensor):
                check_input(model, x)
            if total:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, lr, schedule)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(call_model(model, x), y)
            loss.backward()
            optimizer.step()
            enforce_masks(model, optimizer)
            running += float(loss.detach()) * len(y)
            count += len(y)
            step += 1
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{running / count:.4f}")
        bar.close()
        losses.append(running / max(count, 1))
    model.eval()
    return {
        "epochs": epochs, "losses": losses, "time_s": time.perf_counter() - start,
        "steps": step, "seed": seed, "lr": lr, "batch_size": batch_size, "momentum": momentum,
        "weight_decay": weight_decay, "schedule": schedule,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Accuracy and mean loss of ``model`` on ``data``, in eval mode.

    Args:
        model: The model; its train/eval mode is restored afterwards.
        data: A Dataset, DataLoader or iterable of ``(x, y)`` batches.
        loss_fn: Loss ``(logits, y) -> mean loss``; cross-entropy by default.
        batch_size: Batch size for a Dataset.
        device: Device; defaults to where the model's parameters are.

    Returns:
        ``{"accuracy": fraction correct, "loss": mean loss per sample, "n": samples}``.

    Raises:
        ValueError: If the data is empty or does not fit the model.
    """
    loss_fn = loss_fn or default_loss
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct, total_loss, n = 0, 0.0, 0
    try:
        for x, y in as_batches(data, batch_size):
            x, y = to_device(x, device), y.to(device)
            if isinstance(x, torch.Tensor):
                check_input(model, x)
            out = call_model(model, x)
            total_loss += float(loss_fn(out, y)) * len(y)
            correct += int((predictions(out) == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("cannot evaluate on empty data (0 samples)")
    return {"accuracy": correct / n, "loss": total_loss / n, "n": n}


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Zeros in every weight the default selection prunes (effective weights, masks applied).

    That is every weight of Linear, convolution, attention and recurrent layers (see
    :func:`woodfisher.params.select_params`), plus any other tensor that carries a pruning mask
    (an embedding pruned with ``params=``).

    Args:
        model: The model.

    Returns:
        ``{"layers": [{"name", "kind", "shape", "numel", "zeros", "sparsity"}, ...], "numel",
        "zeros", "sparsity"}``, where the totals cover those weights (not biases or BatchNorm).
    """
    from woodfisher.params import effective_weight, select_params

    try:
        targets = list(select_params(model).targets.values())
    except ValueError:  # a model with no prunable weight
        targets = []
    # Biases and norms pruned with their channel are not weights: left out, as always.
    masked = {name for name, orig, _ in masked_parameters(model) if orig.ndim >= 2}
    chosen = {t.param_name for t in targets}
    extra = masked - chosen
    if extra:
        targets += [
            t for t in select_params(model, params=sorted(extra)).targets.values()
            if t.param_name in extra
        ]
    layers, numel, zeros = [], 0, 0
    for t in targets:
        weight = effective_weight(t)
        n, z = weight.numel(), int((weight == 0).sum())
        layers.append({"name": t.param_name, "kind": t.kind, "shape": list(weight.shape),
                       "numel": n, "zeros": z, "sparsity": z / n if n else 0.0})
        numel += n
        zeros += z
    return {"layers": layers, "numel": numel, "zeros": zeros,
            "sparsity": zeros / numel if numel else 0.0}


def train_and_save(
    model_name: str = "mlpnet",
    dataset: str = "fashion-mnist",
    out: str | None = None,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    schedule: str = "cosine",
    data_dir: str | None = None,
    progress: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    create_dir: bool = False,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a dataset, build a model for it, train, evaluate on the test split and save.

    Every check (output path, names, data files, hyper-parameters) runs before training, so
    bad input fails fast and leaves no file behind.

    Args:
        model_name: One of ``woodfisher.models.MODELS``.
        dataset: One of ``woodfisher.data.DATASETS``.
        out: Checkpoint path; ``None`` trains without saving.
        epochs: Training epochs.
        lr: Peak learning rate (cosine schedule by default).
        batch_size: Batch size.
        seed: Seed of the initialisation and the shuffling.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        schedule: Learning-rate schedule, one of ``SCHEDULES``.
        data_dir: Directory with the dataset files (Fashion-MNIST).
        progress: Show progress bars on stderr.
        model_kwargs: Extra keyword arguments for ``build_model``.
        create_dir: Create the directory of ``out`` (after the other checks pass).
        device: Where to train (a name for :func:`woodfisher.device.resolve_device`); default
            CPU. The checkpoint is written from CPU copies either way.

    Returns:
        ``(model, info)`` with ``info = {"model": spec, "dataset": {...}, "meta": {...},
        "path": out}``, the same layout :func:`woodfisher.checkpoint.load_checkpoint` returns.

    Raises:
        ValueError: On any bad input (unknown names, missing data, unwritable ``out``, ...).
    """
    from woodfisher.checkpoint import check_writable, save_checkpoint, versions
    from woodfisher.data import load_dataset
    from woodfisher.models import MODELS, build_model

    lr_at(0, 1, lr, schedule)
    if model_name not in MODELS:  # fail before the data is read
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    splits = load_dataset(dataset, data_dir=data_dir)
    if out is not None:
        if create_dir:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        check_writable(out)
    torch.manual_seed(seed)
    model = build_model(model_name, splits.input_shape, splits.num_classes,
                        **(model_kwargs or {}))
    if device is not None:
        from woodfisher.device import resolve_device

        model.to(resolve_device(device))
    history = train(model, splits.train, epochs=epochs, lr=lr, batch_size=batch_size,
                    seed=seed, momentum=momentum, weight_decay=weight_decay,
                    schedule=schedule, progress=progress)
    result = evaluate(model, splits.test)
    spec = {"name": model_name, "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes, "kwargs": dict(model_kwargs or {})}
    normalisation = {"dataset": dataset, **splits.normalisation}
    meta = {**history, "test_accuracy": result["accuracy"], "test_loss": result["loss"],
            "versions": versions()}
    if out is not None:
        save_checkpoint(out, model, spec, normalisation, meta)
    return model, {"model": spec, "dataset": normalisation, "meta": meta,
                   "path": None if out is None else str(out)}
