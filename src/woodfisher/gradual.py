"""Gradual pruning: prune in steps along the polynomial schedule while fine-tuning with masks.

Every pruning epoch begins with a one-shot pruning step (any method of
:data:`woodfisher.pruning.METHODS` is the pruner) to the target of Zhu & Gupta's cubic schedule

.. math::
    s_t = s_f + (s_i - s_f)\\left(1 - \\frac{t - t_0}{t_1 - t_0}\\right)^3,

then runs one epoch of masked SGD with momentum, evaluates, and writes an atomic resume file.
After the last pruning step the remaining epochs fine-tune at the final sparsity.

A run killed at any point and resumed from its resume file ends exactly where an uninterrupted
run with the same seed ends: everything random (shuffling, the pruner's gradient samples,
dropout) is drawn from generators seeded by ``(seed, epoch)``, and the resume file holds the
model with its masks, the optimizer state (momentum) and the log.

Example:
    >>> from woodfisher.data import synthetic
    >>> from woodfisher.models import build_model
    >>> ds = synthetic(n=256, input_shape=(1, 8, 8), num_classes=3)
    >>> _ = torch.manual_seed(0)
    >>> net = build_model("mlpnet-small", input_shape=(1, 8, 8), num_classes=3)
    >>> cfg = GradualConfig(final_sparsity=0.9, epochs=3, method="magnitude", lr=0.05)
    >>> res = gradual(net, ds, cfg, progress=False)
    >>> [round(r["sparsity"], 2) for r in res.history]
    [0.5, 0.9, 0.9]
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from woodfisher.batch import call_model, default_loss, predictions, take
from woodfisher.checkpoint import (
    atomic_save_json,
    atomic_savefig,
    refresh_pruned_weights,
    restore_pruning,
)
from woodfisher.data import as_batches
from woodfisher.device import model_device, to_device
from woodfisher.distributed import Group
from woodfisher.events import emit
from woodfisher.pruning.schedule import pruning_steps
from woodfisher.resume import (
    fingerprint,
    load_resume,
    open_job,
    ordered_params,
    save_resume,
    steps_per_epoch,
    stream_seed,
    take_subset,
)
from woodfisher.train import SCHEDULES, enforce_masks, lr_at

__all__ = [
    "RESUME_FORMAT",
    "GradualConfig",
    "GradualError",
    "GradualResult",
    "gradual",
    "output_paths",
    "plot_history",
    "run_gradual",
    "save_log",
]

RESUME_FORMAT = "woodfisher-gradual-v1"

# prune() options a config may carry; seed, loss_fn and progress are set by gradual() itself.
PRUNE_OPTIONS = (
    "layers", "skip", "params", "scope", "layer_sparsity", "update", "num_grads",
    "samples_per_grad", "block_size", "damp", "relative_damp", "recompute", "pattern", "target",
    "taylor", "recompute_by", "refresh",
)

# The relative damp of the block-wise empirical Fisher pruners (woodfisher, woodtaylor) inside
# a gradual run, unless prune_options set damp or relative_damp. One-shot pruning's 1e-2 trusts
# the Fisher of a few hundred gradients to rank every weight; in a gradual run fine-tuning
# moves the weights after each step and the next step prunes again, so a heavier damp, which
# leans the OBS score towards (λ + F_qq)·w²/2, generalises better. Chosen on a validation split
# (train[:50k] / train[50k:]) of Fashion-MNIST MLPNet, never on the test set; see the README.
GRADUAL_RELATIVE_DAMP = 100.0


class GradualError(ValueError):
    """A gradual run that cannot start, go on or resume (says what is wrong and what to do)."""


@dataclass(frozen=True)
class GradualConfig:
    """Everything that fixes a gradual run's result (a resume must match it exactly).

    Attributes:
        final_sparsity: Sparsity reached at the last pruning step, over the pruned weights.
        initial_sparsity: Target of the first pruning step.
        epochs: Epochs of fine-tuning in all (a pruning step opens its epoch).
        start: Epoch (0-based) of the first pruning step.
        end: Epoch of the last pruning step; None means about two thirds into the run, so that
            the last third fine-tunes at the final sparsity.
        prune_every: Epochs between pruning steps.
        method: The one-shot pruner, a key of ``woodfisher.pruning.METHODS``.
        prune_options: Keyword options for ``woodfisher.prune`` (num_grads, block_size, damp,
            relative_damp, update, ...); see :meth:`pruner_options` for the damp default.
        lr: Peak learning rate of the fine-tuning.
        lr_schedule: One of ``woodfisher.train.SCHEDULES``, stepped every batch over the run.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: Fine-tuning batch size (and the pruner's batch size).
        prune_samples: Training samples handed to the pruner at each step; None for what the
            pruner uses (``num_grads · samples_per_grad``, doubled for ``damp="auto"``).
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
    # Dense MLPNet is trained at a peak of 0.05; a fifth of that lets the survivors compensate
    # after each step without undoing the pruner's OBS update in the first few batches.
    lr: float = 0.01
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    prune_samples: int | None = None
    train_subset: int | None = None
    seed: int = 0

    def last_prune_epoch(self) -> int:
        """The epoch of the last pruning step (``end``, or its default).

        Returns:
            A 0-based epoch.
        """
        if self.end is not None:
            return self.end
        return max(self.start, math.ceil(2 * self.epochs / 3) - 1)

    def steps(self) -> dict[int, float]:
        """Check the config; epoch → target sparsity of every pruning step.

        Returns:
            Ordered mapping; see :func:`woodfisher.pruning.schedule.pruning_steps`.

        Raises:
            GradualError: If a value is out of range or the schedule is impossible.
        """
        from woodfisher.pruning import METHODS

        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GradualError(f"{name} must be a positive integer, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("prune_every", self.prune_every)
        for name in ("prune_samples", "train_subset"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.method not in METHODS:
            raise GradualError(f"unknown method {self.method!r}; choose from {sorted(METHODS)}")
        unknown = sorted(set(self.prune_options) - set(PRUNE_OPTIONS))
        if unknown:
            raise GradualError(
                f"unknown prune options {unknown}; choose from {sorted(PRUNE_OPTIONS)}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise GradualError(f"lr must be a positive number, got {self.lr}")
        if self.lr_schedule not in SCHEDULES:
            raise GradualError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose from {list(SCHEDULES)}"
            )
        if not 0 <= self.momentum < 1:
            raise GradualError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise GradualError(f"weight_decay must be >= 0, got {self.weight_decay}")
        end = self.last_prune_epoch()
        if not 0 <= self.start <= end < self.epochs:
            raise GradualError(
                f"pruning epochs must satisfy 0 <= start ({self.start}) <= end ({end}) "
                f"< epochs ({self.epochs}); change --start/--end or raise --epochs"
            )
        try:
            return pruning_steps(
                self.initial_sparsity, self.final_sparsity, self.start, end, self.prune_every
            )
        except ValueError as e:
            raise GradualError(str(e)) from None

    def pruner_options(self) -> dict[str, Any]:
        """The keyword options each pruning step hands to ``woodfisher.prune``.

        ``prune_options`` plus :data:`GRADUAL_RELATIVE_DAMP` for the block-wise empirical
        Fisher methods when neither ``damp`` nor ``relative_damp`` is set.

        Returns:
            A new dict.
        """
        from woodfisher.pruning import METHODS

        opts = dict(self.prune_options)
        method = METHODS.get(self.method)
        if (
            method is not None
            and method.curvature == "woodfisher"
            and opts.get("damp") is None
            and opts.get("relative_damp") is None
        ):
            opts["relative_damp"] = GRADUAL_RELATIVE_DAMP
        return opts

    def fingerprint(self, model: nn.Module) -> str:
        """A hash of the config and of the starting model (names, shapes and values).

        Args:
            model: The model the run starts from (before any pruning by this run).

        Returns:
            16 hex digits; a resume file is accepted only with the same value.
        """
        return fingerprint({**asdict(self), "pruner_options": self.pruner_options()}, model)


@dataclass
class GradualResult:
    """What a gradual run did: one row per epoch (all epochs, resumed ones included)."""

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
            ``{"config", "resumed_from", "history"}`` as plain Python values.
        """
        return {"config": asdict(self.config), "resumed_from": self.resumed_from,
                "history": self.history}


def _seed(seed: int, epoch: int, stream: str) -> int:
    return stream_seed(seed, epoch, stream)


def _prune_sample_count(config: GradualConfig) -> int:
    if config.prune_samples is not None:
        return config.prune_samples
    from woodfisher.pruning import DEFAULTS, get_method

    opts = config.prune_options
    if get_method(config.method).curvature == "kfac":
        return int(opts.get("num_grads") or DEFAULTS["kfac_num_batches"]) * config.batch_size
    n = int(opts.get("num_grads") or DEFAULTS["num_grads"]) * int(
        opts.get("samples_per_grad") or DEFAULTS["samples_per_grad"]
    )
    if get_method(config.method).newton == "safe":
        # WoodTaylor's Newton scale is chosen on held-out samples after those of ḡ and F.
        from woodfisher.pruning.woodtaylor import check_taylor

        taylor = check_taylor(opts.get("taylor"))
        if taylor["scale"] == "auto":
            n = max(n, taylor["grad_samples"] or 0) + int(DEFAULTS["val_samples"])
    return 2 * n if opts.get("damp") == "auto" else n


def _prune_batches(data: Any, n: int, config: GradualConfig, epoch: int) -> list:
    # prune() iterates its data more than once (gradients, damp search), so it gets a list.
    out, taken = [], 0
    shuffled = as_batches(data, config.batch_size, shuffle=True,
                          seed=_seed(config.seed, epoch, "prune"))
    for x, y in shuffled:
        out.append((take(x, slice(0, n - taken)), y[: n - taken]))
        taken += len(out[-1][1])
        if taken >= n:
            break
    return out


def _pruned_fraction(modules: dict[str, nn.Module]) -> float:
    from woodfisher.params import flat_masks

    present = flat_masks(modules)
    return float((~present).sum()) / present.numel()


def gradual(
    model: nn.Module,
    train_data: Any,
    config: GradualConfig,
    *,
    test_data: Any = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    resume_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[list[dict[str, Any]]], None] | None = None,
) -> GradualResult:
    """Prune ``model`` gradually to ``config.final_sparsity`` while fine-tuning it (in place).

    Pruned weights stay exactly zero throughout: after every pruning step and every SGD step
    the masked entries of ``weight_orig`` and of their momentum buffers are zeroed
    (:func:`woodfisher.train.enforce_masks`). The model is in train mode while fine-tuning
    (BatchNorm statistics update) and in eval mode while the pruner samples gradients.

    Args:
        model: A trained model; its Linear/Conv weights (or ``prune_options['layers']``) are
            pruned. On resume, pass the same starting model as the first run.
        train_data: A map-style Dataset (reshuffled every epoch from the seed) or a re-iterable
            of ``(x, y)`` batches (used as is).
        config: The schedule, pruner and optimizer settings.
        test_data: Evaluated after every epoch when given.
        loss_fn: ``loss_fn(logits, y)`` -> mean loss; cross-entropy by default.
        resume_path: Where the resume file is written (atomically) after every epoch.
        resume: Continue from ``resume_path``, which must come from the same config and
            starting model.
        progress: Show one progress bar per epoch on stderr.
        callback: Called with the history so far after every epoch (after the resume file
            is written), e.g. to write a log.

    Returns:
        The per-epoch history (loss, accuracy, sparsity, learning rate, times).

    Raises:
        GradualError: For an impossible config, a missing or foreign resume file, or a
            non-finite fine-tuning loss (the last good resume file is kept).
    """
    from woodfisher.params import select_modules
    from woodfisher.pruning import prune
    from woodfisher.train import evaluate

    steps = config.steps()
    lead = Group.from_torch().rank == 0
    loss_fn = loss_fn or default_loss
    train_data = take_subset(train_data, config.train_subset, GradualError)
    prune_n = _prune_sample_count(config)
    resume_path = Path(resume_path) if resume_path is not None else None
    if resume and resume_path is None:
        raise GradualError("resume=True needs resume_path")
    run_id = config.fingerprint(model)
    history: list[dict[str, Any]] = []
    first_epoch, resumed_from, state = 0, None, None
    if resume:
        state = load_resume(resume_path, run_id, RESUME_FORMAT, "gradual", GradualError)
        device = model_device(model)
        state["model"] = {k: v.to(device) for k, v in state["model"].items()}
        restore_pruning(model, state["model"])
        model.load_state_dict(state["model"])
        refresh_pruned_weights(model)
        history = state["history"]
        first_epoch = resumed_from = int(state["next_epoch"])
    modules = select_modules(
        model,
        config.prune_options.get("layers"),
        config.prune_options.get("skip"),
        config.prune_options.get("params"),
    )
    optimizer = torch.optim.SGD(
        ordered_params(model), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    per_epoch = steps_per_epoch(train_data, config.batch_size)

    for epoch in range(first_epoch, config.epochs):
        row: dict[str, Any] = {"epoch": epoch + 1}
        if epoch in steps:
            t0 = time.perf_counter()
            batches = _prune_batches(train_data, prune_n, config, epoch)
            result = prune(model, batches, steps[epoch], method=config.method, loss_fn=loss_fn,
                           seed=_seed(config.seed, epoch, "gradients") % 2**31,
                           **config.pruner_options())
            # The pruned weights' momentum would push them again at the next SGD step.
            enforce_masks(model, optimizer)
            row["pruned_to"] = steps[epoch]
            row["prune_seconds"] = time.perf_counter() - t0
            row["predicted_increase"] = result.predicted_increase
            row["damp"], row["relative_damp"] = result.damp, result.relative_damp
            if result.taylor is not None:
                row["newton_scales"] = result.taylor["scales"]
        sparsity = _pruned_fraction(modules)
        torch.manual_seed(_seed(config.seed, epoch, "torch"))  # dropout and friends
        t0 = time.perf_counter()
        row.update(_fine_tune_epoch(model, optimizer, train_data, loss_fn, config, epoch,
                                    per_epoch, sparsity, progress))
        row["train_seconds"] = time.perf_counter() - t0
        row["sparsity"] = sparsity
        if test_data is not None:
            ev = evaluate(model, test_data, loss_fn=loss_fn)
            row["test_accuracy"], row["test_loss"] = ev["accuracy"], ev["loss"]
        history.append(row)
        if resume_path is not None and lead:  # rank 0 writes for all
            save_resume(resume_path, fmt=RESUME_FORMAT, fingerprint=run_id,
                        next_epoch=epoch + 1, model=model, optimizer=optimizer,
                        history=history, config=asdict(config))
        if callback is not None and lead:
            callback(history)
        # After the resume file and the log: a job killed here resumes after this epoch.
        emit("epoch_saved", epoch=epoch + 1, resume=str(resume_path))
    model.eval()
    return GradualResult(history=history, config=config, resumed_from=resumed_from)


def _fine_tune_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    config: GradualConfig,
    epoch: int,
    per_epoch: int | None,
    sparsity: float,
    progress: bool,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    model.train()
    total_steps = per_epoch * config.epochs if per_epoch else config.epochs
    batches: Iterable = as_batches(train_data, config.batch_size, shuffle=True,
                                   seed=_seed(config.seed, epoch, "shuffle"))
    bar = tqdm(batches, total=per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
               file=sys.stderr, disable=not progress, leave=True, dynamic_ncols=True)
    n, correct, loss_sum, lr = 0, 0, 0.0, config.lr
    device = model_device(model)
    ranks = Group.from_torch()
    # Over several processes every rank sees the same global batch and trains on its share;
    # DistributedDataParallel averages the gradients (see Group.shard_batch).
    net = ranks.data_parallel(model)
    try:
        for i, (x, y) in enumerate(bar):
            x, y = to_device((x, y), device)
            weight = 1.0
            if ranks.distributed:
                x, y, weight = ranks.shard_batch(x, y)
            step = epoch * per_epoch + i if per_epoch else epoch
            lr = lr_at(step, total_steps, config.lr, config.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            out = call_model(net, x)
            loss = loss_fn(out, y)
            if not torch.isfinite(loss):
                raise GradualError(
                    f"non-finite fine-tuning loss ({float(loss.detach())}) in epoch {epoch + 1}, "
                    f"batch {i + 1}; stopped. The resume file of the last good epoch is kept: "
                    f"lower the learning rate (now {config.lr}) and start again"
                )
            (loss * weight if ranks.distributed else loss).backward()
            optimizer.step()
            enforce_masks(model, optimizer)
            if weight:
                n += len(y)
                loss_sum += float(loss.detach()) * len(y)
                correct += int((predictions(out) == y).sum())
            if progress:
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.3f}",
                                sparsity=f"{sparsity:.3f}", refresh=False)
    finally:
        bar.close()
    if ranks.distributed:
        n, correct, loss_sum = ranks.all_sum(
            torch.tensor([n, correct, loss_sum], dtype=torch.float64)
        ).tolist()
    return {"train_loss": loss_sum / max(n, 1), "train_accuracy": correct / max(n, 1), "lr": lr}


def save_log(result: GradualResult | dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a run's config and per-epoch history as JSON, atomically.

    Args:
        result: A :class:`GradualResult` or its ``to_dict()`` (plus any extra keys).
        path: The JSON file.

    Returns:
        ``path`` as a ``Path``.
    """
    data = result.to_dict() if isinstance(result, GradualResult) else result
    return atomic_save_json(data, path)


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Plot accuracy and sparsity against epoch and write it as a PNG (atomically).

    Args:
        history: Rows of :attr:`GradualResult.history`.
        path: The PNG file.

    Returns:
        ``path`` as a ``Path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history and all("test_accuracy" in r for r in history):
        ax.plot(epochs, [100 * r["test_accuracy"] for r in history], "o-", label="test accuracy")
    ax.plot(epochs, [100 * r["train_accuracy"] for r in history], "s--", label="train accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(epochs, [100 * r["sparsity"] for r in history], "k:", label="sparsity")
    ax2.set_ylabel("sparsity (%)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower left")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Files a CLI gradual run writes next to its output checkpoint ``out``.

    Args:
        out: The output checkpoint, e.g. ``runs/g.pt``.

    Returns:
        ``{"checkpoint": g.pt, "resume": g.resume.pt, "log": g.json, "plot": g.png}``.
    """
    out = Path(out)
    return {"checkpoint": out, "resume": out.with_suffix(".resume.pt"),
            "log": out.with_suffix(".json"), "plot": out.with_suffix(".png")}


def run_gradual(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    data_dir: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Load a checkpoint and its dataset, run :func:`gradual`, and write its files.

    Writes the pruned checkpoint ``out`` (loadable by ``woodfisher evaluate``), its resume
    file (after every epoch), a JSON log of every epoch (after every epoch) and a PNG of
    accuracy and sparsity against epoch; see :func:`output_paths`. Under ``torchrun`` every
    rank runs this (pruning steps split over the ranks, fine-tuning data parallel) and rank 0
    writes the files.

    Args:
        checkpoint: A checkpoint written by ``woodfisher train`` (or ``save_checkpoint``).
        out: The output checkpoint; default ``<checkpoint stem>-gradual.pt`` beside it.
        resume: Continue from ``out``'s resume file.
        data_dir: Directory of the dataset files.
        progress: Progress bars on stderr.
        device: Where to prune and fine-tune (see :func:`woodfisher.device.resolve_device`);
            default CPU.
        **config: Fields of :class:`GradualConfig`.

    Returns:
        A JSON-ready summary: paths, accuracy, dense accuracy, sparsity, history.

    Raises:
        ValueError: On bad input (any :class:`GradualError`, a bad checkpoint or dataset, an
            unwritable output), before any long work where it can be checked up front.
    """
    from woodfisher.checkpoint import save_checkpoint
    from woodfisher.train import evaluate, sparsity_report

    try:
        cfg = GradualConfig(**config)
    except TypeError as e:
        raise GradualError(f"bad gradual option: {e}") from None
    cfg.steps()
    out, paths, model, info, splits = open_job(checkpoint, out, "gradual", output_paths,
                                                GradualError, "fine-tune on", data_dir, device)
    saved = info["dataset"]
    dense = evaluate(model, splits.test)

    def write_log(history: list[dict[str, Any]]) -> None:
        save_log({"checkpoint": str(checkpoint), "config": asdict(cfg),
                  "dense_accuracy": dense["accuracy"], "history": history}, paths["log"])

    result = gradual(model, splits.train, cfg, test_data=splits.test,
                     resume_path=paths["resume"], resume=resume, progress=progress,
                     callback=write_log)
    final = evaluate(model, splits.test)
    report = sparsity_report(model)
    meta = {"gradual": asdict(cfg), "source": str(checkpoint), "history": result.history,
            "test_accuracy": final["accuracy"], "test_loss": final["loss"],
            "dense_accuracy": dense["accuracy"]}
    group = Group.from_torch()
    if group.rank == 0:  # one writer for a job over several processes
        save_checkpoint(paths["checkpoint"], model, info["model"], saved, meta)
        write_log(result.history)
        plot_history(result.history, paths["plot"])
    return {
        **{k: str(v) for k, v in paths.items()},
        "method": cfg.method, "epochs": cfg.epochs, "seed": cfg.seed,
        "accuracy": final["accuracy"], "loss": final["loss"],
        "dense_accuracy": dense["accuracy"], "sparsity": report["sparsity"],
        "pruned_sparsity": result.final["sparsity"], "resumed_from": result.resumed_from,
        "history": result.history,
    }
