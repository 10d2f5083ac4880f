"""FDNP training: dynamic pruning of DCT coefficients (or spatial weights) while training.

:func:`fdnp` converts a model's eligible convs to :class:`~woodfisher.frequency.layers.DCTConv2d`
and trains it with SGD while a :class:`~woodfisher.frequency.surgery.DynamicPruner` updates the
coefficient masks by DNS's rule (with probability ``(1 + γ·iter)^(−power)``, until ``iter_stop``,
pruned coefficients still learning). With ``domain="spatial"`` it is plain DNS on the convs'
weights, for comparison. Given a ``compression``, the target density falls from 1 to
``1/compression`` along a cubic ramp over the first ``ramp`` of the update period (our schedule;
DNS prunes at once with a fixed ``c``, which ``compression=None`` and ``c`` give), and every update
keeps exactly the target count.

Runs resume exactly: a resume file after every epoch (model with masks, optimizer, DNS state and
history), every random draw from streams seeded by ``(seed, epoch)``.

Example:
    >>> from woodfisher.data import synthetic
    >>> from woodfisher.models import build_model
    >>> ds = synthetic(n=256, input_shape=(1, 8, 8), num_classes=3)
    >>> _ = torch.manual_seed(0)
    >>> net = build_model("cnn", input_shape=(1, 8, 8), num_classes=3)
    >>> report = fdnp(net, ds, compression=4, epochs=2, progress=False)
    >>> round(report["compression"], 2), [layer["name"] for layer in report["layers"]]
    (4.0, ['conv1', 'conv2'])
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from woodfisher.checkpoint import refresh_pruned_weights
from woodfisher.data import as_batches
from woodfisher.device import model_device, to_device
from woodfisher.events import emit
from woodfisher.frequency.dns import splice_gradients, update_probability
from woodfisher.frequency.layers import eligible_convs, to_frequency
from woodfisher.frequency.saliency import (
    check_compression,
    coefficient_inverse_diag,
    woodfisher_scales,
)
from woodfisher.frequency.surgery import ALLOCATIONS, DynamicPruner, band_kept_fractions
from woodfisher.resume import (
    fingerprint,
    load_resume,
    ordered_params,
    save_resume,
    steps_per_epoch,
    stream_seed,
    take_subset,
)
from woodfisher.train import SCHEDULES, lr_at

__all__ = ["CRITERIA", "DOMAINS", "RESUME_FORMAT", "FDNPConfig", "FDNPError", "fdnp"]

RESUME_FORMAT = "woodfisher-fdnp-v1"
DOMAINS = ("frequency", "spatial")
#: ``"magnitude"``: DNS's ``|w|``; ``"woodfisher"`` (ours): ``|w|/sqrt([F⁻¹]_qq)``.
CRITERIA = ("magnitude", "woodfisher")
#: BA-FDNP's default band slope (highest band's threshold e^slope × the lowest's); see docs.
BAND_SLOPE = 1.0


class FDNPError(ValueError):
    """An FDNP run that cannot start, go on or resume (says what is wrong and what to do)."""


@dataclass(frozen=True)
class FDNPConfig:
    """Everything that fixes an FDNP run's result (a resume must match it exactly).

    Attributes:
        compression: Target ratio of selected weights to kept ones (> 1); None for DNS's own
            rule with a fixed ``c``.
        c: DNS's ``c`` (``θ = max(μ + cσ, 0)``), used when ``compression`` is None.
        epochs: Training epochs.
        domain: ``"frequency"`` (FDNP) or ``"spatial"`` (DNS on the same convs).
        band_adaptive: BA-FDNP: thresholds scaled per band by ``band_slope`` (frequency only).
        band_slope: Log-ratio of the highest to the lowest band's threshold.
        criterion: One of :data:`CRITERIA`.
        allocation: How a target is shared by layers (:data:`surgery.ALLOCATIONS`).
        gamma: DNS's γ of the update probability ``(1 + γ·iter)^(−power)``.
        power: DNS's power.
        stop: Fraction of all iterations after which masks freeze (DNS's ``iter_stop``).
        ramp: Fraction of the update period over which the target density falls to
            ``1/compression`` (cubic); 0 prunes to the target at the first iteration.
        lr: Peak learning rate.
        lr_schedule: One of ``woodfisher.train.SCHEDULES``, stepped every batch.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (on all stored weights, pruned ones too).
        batch_size: Batch size.
        train_subset: Train on the first N samples only; None for all.
        layers: Patterns of convs to prune (default every eligible Conv2d).
        skip: Patterns of convs to leave alone.
        fisher_num_grads: Gradients per inverse-Fisher estimate (``criterion="woodfisher"``).
        fisher_block_size: Its block size.
        fisher_relative_damp: Its damp relative to the Fisher's mean diagonal.
        seed: Seed of every random choice.
    """

    compression: float | None = 8.0
    c: float | None = None
    epochs: int = 3
    domain: str = "frequency"
    band_adaptive: bool = True
    band_slope: float = BAND_SLOPE
    criterion: str = "magnitude"
    allocation: str = "score"
    gamma: float = 1e-4
    power: float = 1.0
    stop: float = 2 / 3
    ramp: float = 0.5
    lr: float = 0.01
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    train_subset: int | None = None
    layers: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None
    fisher_num_grads: int = 256
    fisher_block_size: int = 576
    fisher_relative_damp: float = 1.0
    seed: int = 0

    @property
    def slope(self) -> float:
        """The band slope in effect (0 unless band-adaptive in the frequency domain)."""
        return self.band_slope if self.band_adaptive and self.domain == "frequency" else 0.0

    @property
    def method(self) -> str:
        """A short name: ``fdnp``, ``ba-fdnp`` or ``dns`` (``+woodfisher`` for that criterion)."""
        name = "dns" if self.domain == "spatial" else ("ba-fdnp" if self.slope else "fdnp")
        return name + ("+woodfisher" if self.criterion == "woodfisher" else "")

    def check(self) -> None:
        """Check every value.

        Raises:
            FDNPError: Naming the bad value, what is allowed and the fix.
        """
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FDNPError(f"{name} must be a positive integer, got {value!r}")

        for name in ("epochs", "batch_size", "fisher_num_grads", "fisher_block_size"):
            positive_int(name, getattr(self, name))
        if self.train_subset is not None:
            positive_int("train_subset", self.train_subset)
        if self.compression is None:
            if self.c is None or not math.isfinite(self.c):
                raise FDNPError("give a compression target (e.g. 8) or DNS's c (e.g. 0.5)")
        else:
            try:
                check_compression(self.compression)
            except ValueError as e:
                raise FDNPError(str(e)) from None
        choices = {"domain": DOMAINS, "criterion": CRITERIA, "allocation": ALLOCATIONS,
                   "lr_schedule": SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FDNPError(f"unknown {name} {getattr(self, name)!r}; choose from "
                                f"{list(allowed)}")
        for name, lo, hi in (("stop", 0, 1), ("ramp", 0, 1)):
            v = getattr(self, name)
            if not (lo <= v <= hi) or (name == "stop" and v == 0):
                raise FDNPError(f"{name} must be a fraction in ({lo}, {hi}], got {v}")
        for name in ("lr", "gamma", "power", "fisher_relative_damp"):
            v = getattr(self, name)
            if not (math.isfinite(v) and (v > 0 or (name != "lr" and v == 0))):
                raise FDNPError(f"{name} must be a finite number > 0, got {v}")
        if not 0 <= self.momentum < 1:
            raise FDNPError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise FDNPError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not math.isfinite(self.band_slope):
            raise FDNPError(f"band_slope must be a finite number, got {self.band_slope}")

    def density_at(self, iteration: int, iter_stop: int) -> float | None:
        """The target density at ``iteration`` (None without a compression target).

        Returns:
            ``d_f + (1 − d_f)(1 − t/T)³`` with ``d_f = 1/compression``, ``T = ramp·iter_stop``.
        """
        if self.compression is None:
            return None
        final = 1.0 / self.compression
        span = self.ramp * iter_stop
        if span <= 0 or iteration + 1 >= span:
            return final
        return final + (1.0 - final) * (1.0 - (iteration + 1) / span) ** 3


@dataclass
class _Run:
    """A run's moving parts (what a resume restores)."""

    modules: dict[str, nn.Module]
    pruner: DynamicPruner
    optimizer: torch.optim.Optimizer
    skipped: dict[str, str]
    history: list[dict[str, Any]] = field(default_factory=list)
    first_epoch: int = 0
    resumed_from: int | None = None


def _batches_for(data: Any, n: int, batch_size: int, seed: int) -> list:
    out, taken = [], 0
    for x, y in as_batches(data, batch_size, shuffle=True, seed=seed):
        out.append((x[: n - taken], y[: n - taken]))
        taken += len(out[-1][1])
        if taken >= n:
            break
    return out


def _setup(model: nn.Module, cfg: FDNPConfig, resume_state: dict | None) -> _Run:
    if cfg.domain == "frequency":
        conv = to_frequency(model, cfg.layers, cfg.skip)
        names, skipped = conv["converted"], conv["skipped"]
    else:
        names, skipped = eligible_convs(model, cfg.layers, cfg.skip)
    if not names:
        raise FDNPError(f"no conv of the model can be pruned (skipped: {skipped or 'none'}); "
                        "FDNP needs Conv2d layers with square kernels larger than 1×1")
    modules = {n: model.get_submodule(n) for n in names}
    pruner = DynamicPruner(modules, c=cfg.c or 0.0, allocation=cfg.allocation,
                           band_slope=cfg.slope)
    optimizer = torch.optim.SGD(ordered_params(model), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    run = _Run(modules, pruner, optimizer, skipped)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        refresh_pruned_weights(model)
        optimizer.load_state_dict(resume_state["optimizer"])
        pruner.load_state_dict(resume_state["pruner"])
        run.history = resume_state["history"]
        run.first_epoch = run.resumed_from = int(resume_state["next_epoch"])
    else:
        pruner.init_moments()
    return run


def _epoch(model: nn.Module, run: _Run, data: Any, cfg: FDNPConfig, epoch: int,
           per_epoch: int, loss_fn: Callable, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    total = per_epoch * cfg.epochs
    iter_stop = max(1, round(cfg.stop * total))
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, epoch, "dns"))
    before = run.pruner.masks()
    updates, last = 0, cfg.density_at(epoch * per_epoch - 1, iter_stop) if epoch else 1.0
    model.train()
    batches = as_batches(data, cfg.batch_size, shuffle=True,
                         seed=stream_seed(cfg.seed, epoch, "shuffle"))
    bar = tqdm(batches, total=per_epoch, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
               file=sys.stderr, disable=not progress, leave=True, dynamic_ncols=True)
    n, correct, loss_sum, lr = 0, 0, 0.0, cfg.lr
    device = model_device(model)
    with splice_gradients(run.modules):
        for i, (x, y) in enumerate(bar):
            x, y = to_device((x, y), device)
            it = epoch * per_epoch + i
            r = float(torch.rand((), generator=gen))
            if it < iter_stop:
                density = cfg.density_at(it, iter_stop)
                # During the ramp the target moves every iteration: always follow it.
                moved = density is not None and density != last
                if moved or r < update_probability(it, cfg.gamma, cfg.power):
                    run.pruner.update(density)
                    updates, last = updates + 1, density
            lr = lr_at(it, total, cfg.lr, cfg.lr_schedule)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            run.optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            if not torch.isfinite(loss):
                raise FDNPError(
                    f"non-finite training loss ({float(loss.detach())}) in epoch {epoch + 1}, "
                    f"batch {i + 1}; stopped. The resume file of the last good epoch is kept: "
                    f"lower the learning rate (now {cfg.lr}) and start again")
            loss.backward()
            run.optimizer.step()
            n += len(y)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            if progress and i % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.3f}",
                                kept=f"{_kept_fraction(run):.3f}", refresh=False)
    bar.close()
    refresh_pruned_weights(model)
    after = run.pruner.masks()
    spliced = sum(int((after[k] & ~before[k]).sum()) for k in after)
    return {"train_loss": loss_sum / max(n, 1), "train_accuracy": correct / max(n, 1),
            "lr": lr, "mask_updates": updates, "spliced": spliced}


def _kept_fraction(run: _Run) -> float:
    kept = run.pruner.kept()
    return sum(kept.values()) / sum(m.weight_orig.numel() for m in run.modules.values())


def fdnp(
    model: nn.Module,
    data: Any,
    compression: float | None = 8,
    epochs: int = 3,
    band_adaptive: bool = True,
    seed: int = 0,
    *,
    test_data: Any = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    resume_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[list[dict[str, Any]]], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train ``model`` in place with frequency-domain dynamic pruning of its convs.

    The eligible convs (square kernels larger than 1×1) become DCTConv2d (``domain="spatial"``
    leaves them as they are and prunes their weights: plain DNS). The whole model trains; the
    masks of the convs' coefficients follow DNS's rule until ``stop`` of the run, then stay.
    Training runs where the model is (batches are moved there).

    Args:
        model: A trained model. On resume, pass the same starting model as the first run.
        data: Training data: a map-style Dataset (reshuffled every epoch from the seed) or a
            re-iterable of ``(x, y)`` batches.
        compression: Target ratio over the pruned convs' weights (8 keeps 1/8); None for DNS's
            fixed-``c`` rule (give ``c=...``).
        epochs: Training epochs.
        band_adaptive: BA-FDNP (per-band thresholds), or plain FDNP.
        seed: Seed of every random choice.
        test_data: Evaluated after every epoch when given.
        loss_fn: ``loss_fn(logits, y)`` -> mean loss; cross-entropy by default.
        resume_path: Where the resume file is written (atomically) after every epoch.
        resume: Continue from ``resume_path``.
        progress: A progress bar per epoch on stderr.
        callback: Called with the history after every epoch (after the resume file is written);
            then the event ``epoch_saved`` (epoch, resume path) goes to :mod:`woodfisher.events`.
        **options: More fields of :class:`FDNPConfig` (``domain``, ``criterion``, ``lr``, ...).

    Returns:
        A JSON-able report: ``method``, ``config``, ``compression`` and ``kept_fraction`` over
        the pruned convs, ``layers`` (per layer: kept fraction, compression, ``c``, and per band
        kept fractions), ``bands`` (per kernel size), ``skipped`` convs with reasons, ``cost``
        (:func:`~woodfisher.frequency.cost.frequency_cost`), ``history`` and ``resumed_from``.

    Raises:
        FDNPError: For bad options, a model with no eligible conv, a missing or foreign resume
            file, or a non-finite training loss.
    """
    from woodfisher.train import evaluate

    try:
        cfg = FDNPConfig(compression=compression, epochs=epochs, band_adaptive=band_adaptive,
                         seed=seed, **options)
    except TypeError as e:
        raise FDNPError(f"bad fdnp option: {e}") from None
    cfg.check()
    loss_fn = loss_fn or nn.functional.cross_entropy
    data = take_subset(data, cfg.train_subset, FDNPError)
    per_epoch = steps_per_epoch(data, cfg.batch_size)
    if not per_epoch:
        raise FDNPError("training data must be a Dataset or a sized iterable of batches")
    if resume and resume_path is None:
        raise FDNPError("resume=True needs resume_path")
    run_id = fingerprint(asdict(cfg), model)
    state = (load_resume(resume_path, run_id, RESUME_FORMAT, "fdnp", FDNPError)
             if resume else None)
    run = _setup(model, cfg, state)
    names = list(run.modules)
    for epoch in range(run.first_epoch, cfg.epochs):
        row: dict[str, Any] = {"epoch": epoch + 1}
        iter_stop = round(cfg.stop * per_epoch * cfg.epochs)
        if cfg.criterion == "woodfisher" and epoch * per_epoch < iter_stop:
            t0 = time.perf_counter()
            batches = _batches_for(data, cfg.fisher_num_grads, cfg.batch_size,
                                   stream_seed(cfg.seed, epoch, "fisher"))
            diag = coefficient_inverse_diag(
                model, batches, names, loss_fn=loss_fn, num_grads=cfg.fisher_num_grads,
                block_size=cfg.fisher_block_size, relative_damp=cfg.fisher_relative_damp,
                seed=stream_seed(cfg.seed, epoch, "gradients") % 2**31)
            run.pruner.set_scales(woodfisher_scales(diag))
            row["fisher_seconds"] = time.perf_counter() - t0
        torch.manual_seed(stream_seed(cfg.seed, epoch, "torch"))
        t0 = time.perf_counter()
        row.update(_epoch(model, run, data, cfg, epoch, per_epoch, loss_fn, progress))
        row["train_seconds"] = time.perf_counter() - t0
        row["kept_fraction"] = _kept_fraction(run)
        row["compression"] = 1 / row["kept_fraction"] if row["kept_fraction"] else None
        if test_data is not None:
            ev = evaluate(model, test_data, loss_fn=loss_fn)
            row["test_accuracy"], row["test_loss"] = ev["accuracy"], ev["loss"]
        run.history.append(row)
        if resume_path is not None:
            save_resume(resume_path, fmt=RESUME_FORMAT, fingerprint=run_id,
                        next_epoch=epoch + 1, model=model, optimizer=run.optimizer,
                        history=run.history, config=asdict(cfg),
                        pruner=run.pruner.state_dict())
        if callback is not None:
            callback(run.history)
        # After the resume file and the log: a job killed here resumes after this epoch.
        emit("epoch_saved", epoch=epoch + 1, resume=None if resume_path is None
             else str(resume_path))
    model.eval()
    example = next(iter(as_batches(data, 1)))[0].to(model_device(model))
    return _report(model, run, cfg, example)


def _report(model: nn.Module, run: _Run, cfg: FDNPConfig, example: Tensor) -> dict[str, Any]:
    from woodfisher.frequency.cost import frequency_cost
    from woodfisher.frequency.dct import band_sizes
    from woodfisher.frequency.layers import DCTConv2d

    layers, by_k = [], {}
    for name, mod in run.modules.items():
        numel = mod.weight_orig.numel()
        kept = int((mod.weight_mask != 0).sum())
        row = {"name": name, "shape": list(mod.weight_orig.shape), "numel": numel,
               "kept": kept, "kept_fraction": kept / numel,
               "compression": numel / kept if kept else None,
               "c": run.pruner.layer_c.get(name)}
        if isinstance(mod, DCTConv2d):
            k = mod.kernel_size[0]
            row["bands"] = band_kept_fractions(mod)
            acc = by_k.setdefault(k, [0.0] * (2 * k - 1))
            per_slice = numel // (k * k)
            for b, (f, size) in enumerate(zip(row["bands"], band_sizes(k), strict=True)):
                acc[b] += f * size * per_slice
        layers.append(row)
    bands = {}
    for k, kept_counts in by_k.items():
        slices = sum(r["numel"] // (k * k) for r in layers
                     if "bands" in r and len(r["bands"]) == 2 * k - 1)
        sizes = band_sizes(k)
        bands[f"{k}x{k}"] = {"sizes": sizes, "kept_fraction": [
            c / (s * slices) for c, s in zip(kept_counts, sizes, strict=True)]}
    numel = sum(r["numel"] for r in layers)
    kept = sum(r["kept"] for r in layers)
    return {
        "method": cfg.method, "config": asdict(cfg), "seed": cfg.seed,
        "compression": numel / kept if kept else None, "kept_fraction": kept / numel,
        "layers": layers, "bands": bands, "skipped": run.skipped,
        "cost": frequency_cost(model, example, list(run.modules)),
        "history": run.history, "resumed_from": run.resumed_from,
        **({"test_accuracy": run.history[-1]["test_accuracy"]}
           if run.history and "test_accuracy" in run.history[-1] else {}),
    }


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Files a CLI FDNP run writes next to its output checkpoint ``out``.

    Args:
        out: The output checkpoint, e.g. ``runs/f.pt``.

    Returns:
        ``checkpoint`` f.pt, ``resume`` f.resume.pt, ``log`` f.json, ``plot`` f.png (accuracy
        and compression per epoch) and ``bands`` f.bands.png (kept coefficients per band).
    """
    out = Path(out)
    return {"checkpoint": out, "resume": out.with_suffix(".resume.pt"),
            "log": out.with_suffix(".json"), "plot": out.with_suffix(".png"),
            "bands": out.with_suffix(".bands.png")}
