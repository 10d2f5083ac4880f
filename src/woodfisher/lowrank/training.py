"""Training for the survey's three families of low-rank methods, one representative each.

* pre-train (RENE §4.4): :func:`finetune` a decomposed model with
  ``L = CE + λ·(Σ_i ‖W_i − Ŵ_i‖² + Σ_i ‖O_i(x) − D_i(x)‖²)``, ``λ = 0.5``, where ``W_i``/``O_i``
  are the teacher's (original) weight and output of layer ``i`` and ``Ŵ_i``/``D_i`` the factorised
  layer's product weight and output. Both terms are per-element means (RENE's code default: the
  literal sums swamp the cross-entropy at λ = 0.5);
* compression-aware: :func:`train_rank_penalised` trains the dense model with a penalty on the
  effective rank (or the nuclear norm, Trained-Rank-Pruning style) of each layer's unfolding,
  before :func:`~woodfisher.lowrank.decompose`;
* pre-set: :func:`preset_model` builds the factorised architecture of a decomposed model with
  fresh weights (a randomly initialised dense model of the same kind, factorised at the same
  ranks), to be trained from scratch with :func:`woodfisher.train`.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from woodfisher.events import emit
from woodfisher.lowrank.layers import compose, factorise, factorised_layers
from woodfisher.lowrank.measures import effective_rank, unfold
from woodfisher.resume import fingerprint, load_resume, save_resume

__all__ = ["finetune", "preset_model", "rank_penalty", "train_rank_penalised"]

PENALTIES = ("erank", "nuclear")
_RESUME_FORMAT = "woodfisher-lowrank-finetune-resume-1"


def _capture(model: nn.Module, names: list[str], store: dict[str, torch.Tensor]) -> list:
    def make(name):
        def hook(mod, args, out):
            store[name] = out
        return hook

    return [model.get_submodule(n).register_forward_hook(make(n)) for n in names]


def _steps(data, batch_size: int) -> int | None:
    try:
        return math.ceil(len(data) / batch_size) if isinstance(data, torch.utils.data.Dataset) \
            else len(data)
    except TypeError:
        return None


def finetune(
    model: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    epochs: int = 2,
    *,
    lr: float = 1e-2,
    lam: float = 0.5,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    seed: int = 0,
    progress: bool = False,
    resume_path: str | os.PathLike | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune a decomposed model against its original, in place (pruning masks kept).

    With ``resume_path`` a resume file (student, optimizer, losses) is written atomically after
    every epoch; a killed run restarted with ``resume=True`` (same student, teacher, data and
    options) ends with the weights of an uninterrupted run.

    Args:
        model: The student (from :func:`~woodfisher.lowrank.decompose`).
        teacher: The original dense model (not changed; run in eval mode).
        data: Training data: a Dataset or ``(x, y)`` batches.
        epochs: Passes over ``data``.
        lr: Peak learning rate of SGD with Nesterov momentum (RENE: 1e-5 over 100 epochs; we
            chose 1e-2 for 2 epochs on a validation split, see docs/lowrank.md).
        lam: Weight λ of the reconstruction + layer-output distillation terms (0: plain CE).
        batch_size: Batch size for a Dataset.
        momentum: SGD momentum.
        weight_decay: L2 penalty (RENE: 0).
        schedule: Learning-rate schedule of :func:`woodfisher.train.lr_at`.
        seed: Seed of the shuffling.
        progress: Show a progress bar.
        resume_path: Resume file written after every epoch (None: none).
        resume: Continue from ``resume_path``.

    Returns:
        ``{"epochs", "losses", "ce", "distill", "time_s", "lr", "lam", "seed", "resumed_from"}``.

    Raises:
        ValueError: If the student has no factorised layer matching a teacher layer, a
            hyper-parameter is out of range, or the resume file is missing or of another run.
    """
    from woodfisher.data import as_batches
    from woodfisher.train import enforce_masks, lr_at

    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not lr > 0 or lam < 0:
        raise ValueError(f"need lr > 0 and lam >= 0, got lr={lr}, lam={lam}")
    lr_at(0, 1, lr, schedule)
    teacher_mods = dict(teacher.named_modules())
    names = [n for n in factorised_layers(model) if n in teacher_mods]
    if lam > 0 and not names:
        raise ValueError("the model has no factorised layer that the teacher also has; "
                         "pass the model decompose() returned and the model it was made from")
    targets = {n: teacher_mods[n].weight.detach() for n in names}
    if resume and resume_path is None:
        raise ValueError("resume=True needs resume_path")
    options = {"epochs": epochs, "lr": lr, "lam": lam, "batch_size": batch_size,
               "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule,
               "seed": seed, "teacher": fingerprint({}, teacher), "data": _describe(data)}
    run_id = fingerprint(options, model)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    history: dict[str, list[float]] = {"losses": [], "ce": [], "distill": []}
    first_epoch = 0
    if resume:
        state = load_resume(resume_path, run_id, _RESUME_FORMAT, "lowrank --finetune")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        first_epoch = int(state["next_epoch"])
        for row in state["history"]:
            for key in history:
                history[key].append(row[key])
    per_epoch = _steps(data, batch_size)
    total = per_epoch * epochs if per_epoch else None
    student_out: dict[str, torch.Tensor] = {}
    teacher_out: dict[str, torch.Tensor] = {}
    handles = _capture(model, names, student_out) + _capture(teacher, names, teacher_out)
    was_teacher = teacher.training
    teacher.eval()
    start, step = time.perf_counter(), first_epoch * (per_epoch or 0)
    try:
        model.train()
        for epoch in range(first_epoch, epochs):
            sums = {"losses": 0.0, "ce": 0.0, "distill": 0.0}
            count = 0
            bar = tqdm(as_batches(data, batch_size, shuffle=True, seed=seed + epoch),
                       total=per_epoch, desc=f"finetune {epoch + 1}/{epochs}", file=sys.stderr,
                       disable=not progress, leave=False)
            for x, y in bar:
                if total:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, total, lr, schedule)
                logits = model(x)
                ce = nn.functional.cross_entropy(logits, y)
                distill = logits.new_zeros(())
                if lam > 0:
                    with torch.no_grad():
                        teacher(x)
                    for n in names:
                        distill = distill + (targets[n] - compose(model.get_submodule(n),
                                                                  detach=False)).square().mean()
                        distill = distill + (teacher_out[n] - student_out[n]).square().mean()
                loss = ce + lam * distill
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                enforce_masks(model, opt)
                for key, val in (("losses", loss), ("ce", ce), ("distill", distill)):
                    sums[key] += float(val.detach()) * len(y)
                count += len(y)
                step += 1
            bar.close()
            for key in sums:
                history[key].append(sums[key] / max(count, 1))
            if resume_path is not None:
                rows = [dict(zip(history, vals, strict=True))
                        for vals in zip(*history.values(), strict=True)]
                save_resume(resume_path, fmt=_RESUME_FORMAT, fingerprint=run_id,
                            next_epoch=epoch + 1, model=model, optimizer=opt, history=rows,
                            config=options)
            emit("epoch_saved", epoch=epoch + 1, resume=str(resume_path))
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_teacher)
        model.eval()
    return {"epochs": epochs, **history, "time_s": time.perf_counter() - start, "lr": lr,
            "lam": lam, "seed": seed, "batch_size": batch_size,
            "resumed_from": first_epoch if resume else None}


def _describe(data: Any) -> Any:
    """What identifies the training data in a fingerprint: its size and, for tensors, a hash."""
    if isinstance(data, torch.utils.data.TensorDataset):
        return [len(data), fingerprint({}, {f"t{i}": t for i, t in enumerate(data.tensors)})]
    try:
        return len(data)
    except TypeError:
        return None


def rank_penalty(modules: dict[str, nn.Module], penalty: str = "erank") -> torch.Tensor:
    """Sum over layers of a differentiable rank surrogate of the output-channel unfolding.

    ``"erank"``: effective rank divided by the full rank (in (0, 1] per layer);
    ``"nuclear"``: nuclear norm divided by the Frobenius norm (scale-free, ``≤ √rank``).

    Args:
        modules: Module name to Linear/Conv module.
        penalty: ``"erank"`` or ``"nuclear"``.

    Returns:
        A 0-d tensor with autograd history.

    Raises:
        ValueError: If ``penalty`` is unknown.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; choose from {list(PENALTIES)}")
    total = None
    for mod in modules.values():
        w = mod.weight
        if penalty == "erank":
            term = effective_rank(w, differentiable=True) / min(unfold(w).shape)
        else:
            mat = unfold(w)
            term = torch.linalg.svdvals(mat).sum() / mat.norm().clamp_min(1e-12)
        total = term if total is None else total + term
    return total


def train_rank_penalised(
    model: nn.Module,
    data: Iterable,
    epochs: int = 1,
    *,
    penalty: str = "erank",
    strength: float = 0.1,
    layers: list[str] | str | None = None,
    lr: float = 1e-2,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Compression-aware training: cross-entropy + ``strength`` × :func:`rank_penalty`, in place.

    Args:
        model: The dense model.
        data: Training data.
        epochs: Passes over ``data``.
        penalty: ``"erank"`` or ``"nuclear"``.
        strength: Weight of the penalty.
        layers: ``fnmatch`` patterns of the penalised layers (default every Linear/Conv).
        lr: Peak learning rate (cosine).
        batch_size: Batch size.
        seed: Seed.
        progress: Show progress bars.

    Returns:
        :func:`woodfisher.train` 's history plus ``penalty``, ``strength`` and the final
        penalty value.
    """
    from woodfisher.params import select_layers
    from woodfisher.train import train

    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; choose from {list(PENALTIES)}")
    mods = select_layers(model, layers)

    def loss_fn(logits, y):
        return nn.functional.cross_entropy(logits, y) + strength * rank_penalty(mods, penalty)

    hist = train(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                 loss_fn=loss_fn, progress=progress)
    with torch.no_grad():
        final = float(rank_penalty(mods, penalty))
    return {**hist, "penalty": penalty, "strength": strength, "final_penalty": final}


def preset_model(decomposed: nn.Module, fresh: nn.Module, seed: int = 0) -> nn.Module:
    """The factorised architecture of ``decomposed`` with freshly initialised weights.

    The new model is ``fresh`` (a randomly initialised dense model of the same kind) with each
    factorised layer of ``decomposed`` replaced by ``fresh``'s layer factorised at the same
    ranks, so the product weights start at the dense initialisation's scale. Train it from
    scratch with :func:`woodfisher.train`.

    Args:
        decomposed: A model from :func:`~woodfisher.lowrank.decompose`.
        fresh: An untrained dense model of the same architecture (not changed).
        seed: Seed of any randomness in the factorisation.

    Returns:
        A new model with ``decomposed``'s structure.
    """
    torch.manual_seed(seed)
    new = copy.deepcopy(fresh)
    for name, summary in factorised_layers(decomposed).items():
        dense = fresh.get_submodule(name)
        new.set_submodule(name, factorise(dense, summary["method"], summary["rank"]))
    ref = {n: p.shape for n, p in decomposed.named_parameters()}
    got = {n: p.shape for n, p in new.named_parameters()}
    if ref != got:
        raise ValueError("fresh does not have the architecture decomposed was made from")
    return new
