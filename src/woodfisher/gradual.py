"""Gradual pruning: prune in steps along the polynomial schedule while fine-tuning with masks.

Every epoch may begin with a pruning step (any one-shot method as the pruner), then runs one
epoch of masked SGD with momentum, evaluates, and writes an atomic resume file. A run killed at
any point and resumed from that file ends where an uninterrupted run with the same seed ends:
everything random is drawn from generators seeded by ``(seed, epoch)``, and the resume file
holds the model, its masks, the optimizer state and the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from woodfisher.pruning.schedule import pruning_steps

log = logging.getLogger(__name__)

RESUME_FORMAT = "woodfisher-gradual-v1"


class GradualError(ValueError):
    """A gradual run that cannot start, go on or resume (with what is wrong and what to do)."""


@dataclass(frozen=True)
class GradualConfig:
    """Everything that fixes a gradual run's result (a resume must match it exactly).

    Attributes:
        final_sparsity: Sparsity reached at the last pruning step, over the pruned weights.
        initial_sparsity: Target of the first pruning step.
        epochs: Epochs of fine-tuning in all (pruning steps happen at the start of an epoch).
        start: Epoch of the first pruning step.
        end: Epoch of the last pruning step; None means about two thirds into the run, so that
            the last third fine-tunes at the final sparsity.
        prune_every: Epochs between pruning steps.
        method: The one-shot pruner, a key of ``woodfisher.pruning.METHODS``.
        prune_options: Keyword options for ``woodfisher.prune`` (num_grads, block_size, ...).
        lr: Peak learning rate of the fine-tuning (cosine decay to zero over the run).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: Fine-tuning batch size.
        prune_samples: Training samples handed to the pruner at each step.
        train_subset: Use only the first N training samples for pruning and fine-tuning (the
            limited-data regime); None for all.
        seed: Seed of every random choice of the run.
    """

    final_sparsity: float
    initial_sparsity: float = 0.5
    epochs: int = 10
    start: int = 0
    end: int | None = None
    prune_every: int = 1
    method: str = "woodfisher"
    prune_options: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    prune_samples: int = 4000
    train_subset: int | None = None
    seed: int = 0

    def last_prune_epoch(self) -> int:
        """The epoch of the last pruning step (``end``, or its default)."""
        if self.end is not None:
            return self.end
        return max(self.start, math.ceil(2 * self.epochs / 3) - 1)

    def steps(self) -> dict[int, float]:
        """Epoch → target sparsity of every pruning step.

        Returns:
            Ordered mapping; see :func:`woodfisher.pruning.schedule.pruning_steps`.

        Raises:
            GradualError: If the schedule is impossible.
        """
        if self.epochs < 1:
            raise GradualError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.prune_samples < 1:
            raise GradualError(
                f"batch_size and prune_samples must be >= 1, got {self.batch_size}, "
                f"{self.prune_samples}"
            )
        if self.train_subset is not None and self.train_subset < 1:
            raise GradualError(f"train_subset must be >= 1, got {self.train_subset}")
        end = self.last_prune_epoch()
        if not 0 <= self.start <= end < self.epochs:
            raise GradualError(
                f"pruning epochs must satisfy 0 <= start ({self.start}) <= end ({end}) "
                f"< epochs ({self.epochs})"
            )
        try:
            return pruning_steps(
                self.initial_sparsity, self.final_sparsity, self.start, end, self.prune_every
            )
        except ValueError as e:
            raise GradualError(str(e)) from None

    def fingerprint(self, model: nn.Module) -> str:
        """A hash of the config and the model's parameter names and shapes.

        Returns:
            16 hex digits; a resume file is accepted only with the same value.
        """
        shapes = sorted(
            (_canonical(n), tuple(p.shape)) for n, p in model.named_parameters()
        )
        blob = json.dumps([asdict(self), shapes], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class GradualResult:
    """What a gradual run did: one row per epoch, and where it wrote its files."""

    history: list[dict[str, Any]]
    config: GradualConfig
    resumed_from: int | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's row."""
        return self.history[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form.

        Returns:
            A dict of plain Python values.
        """
        return {"config": asdict(self.config), "resumed_from": self.resumed_from,
                "history": self.history}


def _canonical(name: str) -> str:
    # A pruned module's weight is registered as weight_orig, appended after its bias; a
    # canonical name keeps the optimizer's parameter order the same before and after pruning.
    return name.removesuffix("_orig")


def _ordered_params(model: nn.Module) -> list[nn.Parameter]:
    named = sorted(model.named_parameters(), key=lambda kv: _canonical(kv[0]))
    return [p for _, p in named]


def enforce_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero the pruned entries of every masked weight and of its optimizer state.

    The prune reparametrisation already hides them from the forward pass; zeroing the stored
    weight and its momentum keeps them exactly zero everywhere, so a later ``bake`` or a new
    mask cannot bring old values back.
    """
    with torch.no_grad():
        for mod in model.modules():
            mask = getattr(mod, "weight_mask", None)
            if mask is None:
                continue
            orig = mod.weight_orig
            orig.mul_(mask)
            if optimizer is not None:
                for value in optimizer.state.get(orig, {}).values():
                    if isinstance(value, Tensor) and value.shape == mask.shape:
                        value.mul_(mask)


def restore_masks(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Give ``model`` the prune reparametrisation that ``state_dict`` was saved with."""
    from torch.nn.utils import prune as tprune

    modules = dict(model.named_modules())
    for key, mask in state_dict.items():
        if not key.endswith("weight_mask"):
            continue
        mod_name = key[: -len(".weight_mask")] if "." in key else ""
        mod = modules.get(mod_name)
        if mod is None:
            raise GradualError(f"saved mask {key!r} has no module in this model")
        if getattr(mod, "weight_mask", None) is None:
            tprune.custom_from_mask(mod, "weight", mask.to(mod.weight.device))


def _epoch_batches(data: Any, batch_size: int, seed: int, epoch: int):
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(data), generator=gen)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size].tolist()
            xs, ys = zip(*(data[i] for i in idx), strict=False)
            yield torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])
    else:
        yield from data


def _prune_batches(data: Any, n: int, batch_size: int, seed: int, epoch: int) -> list:
    out, taken = [], 0
    for x, y in _epoch_batches(data, batch_size, seed + 7919, epoch):
        out.append((x[: n - taken], y[: n - taken]))
        taken += len(out[-1][1])
        if taken >= n:
            break
    return out


def _fine_tune_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches, loss_fn: Callable, progress
) -> dict[str, float]:
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        if not torch.isfinite(loss):
            raise GradualError(
                f"non-finite fine-tuning loss ({loss.item()}); stopped, the last good resume file "
                "is kept: lower --lr and resume"
            )
        loss.backward()
        optimizer.step()
        enforce_masks(model, optimizer)
        n = len(y)
        total += n
        loss_sum += loss.item() * n
        correct += (out.argmax(1) == y).sum().item()
        if progress is not None:
            progress(n, loss_sum / total, correct / total)
    return {"train_loss": loss_sum / max(total, 1), "train_accuracy": correct / max(total, 1)}


def _sparsity(model: nn.Module, modules: dict[str, nn.Module]) -> float:
    from woodfisher.params import flat_masks, flat_weights

    w = flat_weights(modules)
    return float(((w == 0) | ~flat_masks(modules)).float().mean())


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def gradual(
    model: nn.Module,
    train_data: Any,
    config: GradualConfig,
    *,
    test_data: Any = None,
    loss_fn: Callable | None = None,
    resume_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> GradualResult:
    """Prune ``model`` gradually to ``config.final_sparsity`` while fine-tuning it (in place).

    Args:
        model: A trained model; its Linear/Conv weights (or ``prune_options['layers']``) are
            pruned.
        train_data: A map-style Dataset (shuffled per epoch from the seed) or any iterable of
            (x, y) batches (used as is).
        config: The schedule, pruner and optimizer settings.
        test_data: Evaluated after every epoch when given.
        loss_fn: Defaults to cross-entropy.
        resume_path: Where the resume file is written after every epoch.
        resume: Continue from ``resume_path`` (which must come from the same config and model).
        progress: Show a progress bar per epoch on stderr.

    Returns:
        The per-epoch history (loss, accuracy, sparsity, learning rate, times).

    Raises:
        GradualError: For an impossible schedule, a resume file of another run, or a
            non-finite fine-tuning loss.
    """
    from woodfisher.params import select_modules
    from woodfisher.pruning import prune
    from woodfisher.train import evaluate

    loss_fn = loss_fn or nn.CrossEntropyLoss()
    steps = config.steps()
    if config.train_subset is not None and isinstance(train_data, Dataset):
        if config.train_subset > len(train_data):
            raise GradualError(
                f"train_subset={config.train_subset} exceeds the {len(train_data)} training samples"
            )
        train_data = Subset(train_data, range(config.train_subset))
    modules = select_modules(
        model, config.prune_options.get("layers"), config.prune_options.get("skip")
    )
    resume_path = Path(resume_path) if resume_path is not None else None
    fingerprint = config.fingerprint(model)
    history: list[dict[str, Any]] = []
    first_epoch, resumed_from = 0, None

    state = None
    if resume:
        if resume_path is None or not resume_path.exists():
            raise GradualError(f"--resume given but no resume file at {resume_path}")
        try:
            state = torch.load(resume_path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise GradualError(f"{resume_path} is not a gradual resume file ({e})") from None
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise GradualError(f"{resume_path} is not a gradual resume file")
        if state["fingerprint"] != fingerprint:
            raise GradualError(
                f"{resume_path} belongs to another run or model (fingerprint "
                f"{state['fingerprint']} != {fingerprint}); start without --resume or use the "
                "same options"
            )
        restore_masks(model, state["model"])
        model.load_state_dict(state["model"])
        history = json.loads(state["history"])
        first_epoch = resumed_from = int(state["next_epoch"])

    optimizer = torch.optim.SGD(
        _ordered_params(model), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    for epoch in range(first_epoch, config.epochs):
        row: dict[str, Any] = {"epoch": epoch + 1}
        if epoch in steps:
            t0 = time.perf_counter()
            batches = _prune_batches(
                train_data, config.prune_samples, config.batch_size, config.seed, epoch
            )
            options = {"seed": config.seed + epoch, **config.prune_options}
            result = prune(model, batches, steps[epoch], method=config.method, loss_fn=loss_fn,
                           **options)
            enforce_masks(model, optimizer)
            row["pruned_to"] = steps[epoch]
            row["prune_seconds"] = time.perf_counter() - t0
            row["predicted_loss_increase"] = getattr(result, "predicted_loss_increase", None)
        lr = 0.5 * config.lr * (1 + math.cos(math.pi * epoch / config.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            total = len(train_data) if hasattr(train_data, "__len__") else None
            bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       unit="sample")

            def tick(n, loss, acc, bar=bar):
                bar.update(n)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
        else:
            tick = None
        try:
            row.update(_fine_tune_epoch(
                model,
                optimizer,
                _epoch_batches(train_data, config.batch_size, config.seed, epoch),
                loss_fn,
                tick,
            ))
        finally:
            if bar is not None:
                bar.close()
        row["train_seconds"] = time.perf_counter() - t0
        row["lr"] = lr
        row["sparsity"] = _sparsity(model, modules)
        if test_data is not None:
            ev = evaluate(model, test_data, loss_fn=loss_fn)
            row["test_accuracy"], row["test_loss"] = ev["accuracy"], ev["loss"]
        history.append(row)
        log.info("epoch %s: %s", epoch + 1, row)
        if resume_path is not None:
            _save_atomic(
                {
                    "format": RESUME_FORMAT,
                    "fingerprint": fingerprint,
                    "next_epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": json.dumps(history),
                },
                resume_path,
            )
    return GradualResult(history=history, config=config, resumed_from=resumed_from)


def plot_history(history: list[dict[str, Any]], path: str | Path) -> None:
    """Accuracy and sparsity against epoch, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if all("test_accuracy" in r for r in history):
        ax.plot(epochs, [100 * r["test_accuracy"] for r in history], "o-", label="test accuracy")
    ax.plot(epochs, [100 * r["train_accuracy"] for r in history], "s--", label="train accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(epochs, [100 * r["sparsity"] for r in history], "k:", label="sparsity")
    ax2.set_ylabel("sparsity (%)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
