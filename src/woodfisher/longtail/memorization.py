"""Feldman & Zhang's subsampled memorization and influence estimates.

For a training algorithm ``A`` and examples ``S`` (Feldman & Zhang, "What Neural Networks
Memorize and Why", NeurIPS 2020), the memorization of example ``i`` is

.. math::
    \\mathrm{mem}(i) = P_{h \\leftarrow A(S)}[h(x_i) = y_i]
                   - P_{h \\leftarrow A(S \\setminus i)}[h(x_i) = y_i],

and the influence of ``i`` on a test example ``j`` is the same difference evaluated at
``(x'_j, y'_j)``. The estimator trains ``K`` models on random subsets of ``round(0.7·n)``
examples and splits the runs by whether ``i`` was in the subset:
``mem(i) ≈ mean{correct_k(i) : i ∈ I_k} − mean{correct_k(i) : i ∉ I_k}``. Its standard error is
that of a difference of two independent proportions.

Example:
    >>> from woodfisher.data import synthetic
    >>> X, y = synthetic(n=120, input_shape=(1, 4, 4), num_classes=3, seed=0).tensors
    >>> mem = memorization(X, y, model="mlpnet-small", runs=4, epochs=2, workers=1,
    ...                    progress=False)
    >>> mem.scores.shape, mem.stderr.shape, mem.runs
    (torch.Size([120]), torch.Size([120]), 4)
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from woodfisher.checkpoint import atomic_save
from woodfisher.longtail.runs import (
    RunStore,
    check_picklable,
    run_all,
    subset_size,
)
from woodfisher.resume import fingerprint
from woodfisher.train import SCHEDULES

__all__ = ["MEMORIZATION_DEFAULTS", "Memorization", "estimate", "memorization"]

RESULT_FORMAT = "woodfisher-memorization-v1"

#: Training recipe of every run. 30 epochs at lr 0.1 fit ~99 % of a 2,800-example Fashion-MNIST
#: subset and ~80 % of its flipped labels with MLPNet (Feldman & Zhang's MNIST demo uses 10
#: epochs at 0.1; Fashion-MNIST needs more to memorize its atypical examples).
MEMORIZATION_DEFAULTS: dict[str, Any] = {
    "runs": 100,
    "subset": 0.7,
    "epochs": 30,
    "lr": 0.1,
    "batch_size": 128,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "schedule": "cosine",
}


def estimate(masks: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """The subsampling estimate and its standard error for every column of ``correct``.

    Args:
        masks: (K, n) bool, example ``i`` in the subset of run ``k``.
        correct: (K, n) bool, run ``k`` classifies example ``i`` correctly.

    Returns:
        ``(scores, stderr)``, each (n,) float64; NaN where an example was never in or never
        out of a subset.
    """
    m, c = masks.double(), correct.double()
    n_in, n_out = m.sum(0), (1 - m).sum(0)
    p_in = (m * c).sum(0) / n_in
    p_out = ((1 - m) * c).sum(0) / n_out
    se = (p_in * (1 - p_in) / n_in + p_out * (1 - p_out) / n_out).sqrt()
    return p_in - p_out, se


@dataclass
class Memorization:
    """Memorization scores of training examples and the runs they come from.

    Attributes:
        scores: (n,) estimated memorization, in [-1, 1]; NaN if an example was never held out
            (or never in a subset).
        stderr: (n,) standard error of each score.
        masks: (K, n) bool, which examples each run trained on.
        train_correct: (K, n) bool, which training examples each run classifies correctly.
        test_correct: (K, n_test) bool for the test examples, or None without them.
        options: The estimator's options (runs, subset, epochs, seed, model, ...).
        times: ``{"total_s", "trained_now"}``: wall time of this call and runs trained in it.
    """

    scores: Tensor
    stderr: Tensor
    masks: Tensor
    train_correct: Tensor
    test_correct: Tensor | None
    options: dict[str, Any]
    times: dict[str, float] = field(default_factory=dict)

    @property
    def runs(self) -> int:
        """Number of runs ``K``."""
        return int(self.masks.shape[0])

    @property
    def fit(self) -> float:
        """Mean accuracy of the runs on their own training subsets (how well they memorize)."""
        m = self.masks
        return float((self.train_correct & m).sum() / m.sum())

    @property
    def held_out_accuracy(self) -> float:
        """Mean accuracy of the runs on the training examples they did not see."""
        m = ~self.masks
        return float((self.train_correct & m).sum() / m.sum())

    def influence(self) -> tuple[Tensor, Tensor]:
        """Influence of each training example on each test example, from the same runs.

        ``infl(i, j) = mean{correct_k(j) : i ∈ I_k} − mean{correct_k(j) : i ∉ I_k}``.

        Returns:
            ``(influence, stderr)``, each (n, n_test) float32.

        Raises:
            ValueError: If the runs recorded no test examples.
        """
        if self.test_correct is None:
            raise ValueError("these runs recorded no test examples; pass test=(X_test, y_test) "
                             "to memorization() to estimate influence")
        m, c = self.masks.float(), self.test_correct.float()
        n_in = m.sum(0).unsqueeze(1)
        n_out = self.runs - n_in
        hit_in = m.T @ c
        p_in = hit_in / n_in
        p_out = (c.sum(0).unsqueeze(0) - hit_in) / n_out
        se = (p_in * (1 - p_in) / n_in + p_out * (1 - p_out) / n_out).sqrt()
        return p_in - p_out, se

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (not the per-example arrays).

        Returns:
            Options, run count, fit, held-out accuracy, score quantiles and the median SE.
        """
        s = self.scores[~self.scores.isnan()]
        qs = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
        return {
            "options": self.options,
            "runs": self.runs,
            "examples": int(self.scores.numel()),
            "undefined": int(self.scores.isnan().sum()),
            "fit": self.fit,
            "held_out_accuracy": self.held_out_accuracy,
            "score_quantiles": {str(q): float(s.quantile(q)) for q in qs} if s.numel() else {},
            "mean_score": float(s.mean()) if s.numel() else None,
            "median_stderr": float(self.stderr[~self.stderr.isnan()].median())
            if s.numel() else None,
            "times": self.times,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result atomically (loadable with ``weights_only=True``).

        Returns:
            The path written.
        """
        return atomic_save({"format": RESULT_FORMAT, "scores": self.scores,
                            "stderr": self.stderr, "masks": self.masks,
                            "train_correct": self.train_correct,
                            "test_correct": self.test_correct, "options": dict(self.options),
                            "times": dict(self.times)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Memorization:
        """Read a result written by :meth:`save`.

        Returns:
            The result.

        Raises:
            ValueError: If the file is missing or not a memorization result.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"memorization file {path} not found")
        try:
            d = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} is not a memorization result ({type(e).__name__})") from None
        if not isinstance(d, dict) or d.get("format") != RESULT_FORMAT:
            raise ValueError(f"{path} is not a memorization result (no format={RESULT_FORMAT!r})")
        return cls(d["scores"], d["stderr"], d["masks"], d["train_correct"], d["test_correct"],
                   d["options"], d.get("times", {}))


def _check_xy(X: Tensor, y: Tensor, what: str) -> None:
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"{what} X and y must be tensors, got {type(X).__name__} and "
                         f"{type(y).__name__}")
    if X.ndim < 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"{what} X must be (n, ...) and y (n,) with the same n; got "
                         f"{tuple(X.shape)} and {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{what} labels y must be integers, got dtype {y.dtype}")


def _builder(model: str | Callable[[], nn.Module], input_shape: tuple[int, ...],
             num_classes: int) -> tuple[Callable[[], nn.Module], str]:
    from woodfisher.models import MODELS, build_model

    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)} or pass a "
                             "callable that returns a fresh module")
        return functools.partial(build_model, model, input_shape, num_classes), model
    if not callable(model):
        raise ValueError(f"model must be a registry name or a callable returning a fresh "
                         f"module, got {type(model).__name__}")
    return model, _callable_name(model)


def _callable_name(fn: Callable) -> str:
    """A name for a model builder that is the same in every process (it goes into the run
    store's fingerprint, so it must not contain memory addresses: a resumed CLI job would be
    refused as "another job")."""
    if isinstance(fn, functools.partial):
        args = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in sorted(fn.keywords.items())]
        return f"{_callable_name(fn.func)}({', '.join(args)})"
    name = getattr(fn, "__qualname__", None) or re.sub(r" at 0x[0-9a-fA-F]+", "", repr(fn))
    return f"{getattr(fn, '__module__', '')}.{name}"


def memorization(
    X: Tensor,
    y: Tensor,
    model: str | Callable[[], nn.Module] = "mlpnet",
    runs: int = MEMORIZATION_DEFAULTS["runs"],
    subset: float = MEMORIZATION_DEFAULTS["subset"],
    epochs: int = MEMORIZATION_DEFAULTS["epochs"],
    seed: int = 0,
    *,
    test: tuple[Tensor, Tensor] | None = None,
    num_classes: int | None = None,
    lr: float = MEMORIZATION_DEFAULTS["lr"],
    batch_size: int = MEMORIZATION_DEFAULTS["batch_size"],
    momentum: float = MEMORIZATION_DEFAULTS["momentum"],
    weight_decay: float = MEMORIZATION_DEFAULTS["weight_decay"],
    schedule: str = MEMORIZATION_DEFAULTS["schedule"],
    workers: int | None = None,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Memorization:
    """Estimate how much each training example is memorized (Feldman & Zhang 2020).

    Trains ``runs`` fresh models, each on a random ``subset`` fraction of ``(X, y)`` with SGD
    (momentum, cosine learning rate; :func:`woodfisher.train`), in parallel processes, and
    compares each example's accuracy over the runs that trained on it with the runs that did
    not. Run ``k``'s subset, initialisation and shuffling come from seeds derived from
    ``(seed, k)``, and each run trains on one thread, so the result does not depend on
    ``workers``. With ``run_dir`` every finished run is saved there at once (atomically); calling
    again with the same arguments skips them, so an interrupted job resumes and ends as an
    uninterrupted one would, and raising ``runs`` adds runs to the ones already there.

    Args:
        X: (n, *input_shape) training inputs, as the model takes them.
        y: (n,) integer labels.
        model: A name of :data:`woodfisher.models.MODELS` (built for ``X``'s shape) or a
            callable returning a fresh module (picklable, e.g. a module-level function, when
            ``workers > 1``).
        runs: Models to train, ``K ≥ 2`` (each example is held out of about ``0.3·K``).
        subset: Fraction of the examples each model trains on, in (0, 1).
        epochs: Training epochs of each run.
        seed: Seed of every random choice.
        test: Optional ``(X_test, y_test)``; each run records its test correctness, for
            :meth:`Memorization.influence`.
        num_classes: Classes of a registry model; default ``max(y) + 1``.
        lr: Peak learning rate.
        batch_size: Batch size.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        schedule: Learning-rate schedule (see :data:`woodfisher.train.SCHEDULES`).
        workers: Processes (spawned, one thread each); default ``os.cpu_count()``.
        run_dir: Directory to save finished runs in and resume from; None keeps none.
        progress: Show a progress bar on stderr.

    Returns:
        The scores, their standard errors and the runs' records.

    Raises:
        ValueError: On ``runs < 2``, ``subset`` outside (0, 1), bad tensors, an unknown model,
            a model that does not fit the data, a ``run_dir`` of another job, or an unpicklable
            model with ``workers > 1``.
    """
    started = time.perf_counter()
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise ValueError(f"runs must be an integer >= 2 (some runs must hold each example out), "
                         f"got {runs!r}; Feldman & Zhang use thousands, 100 is a usable minimum")
    if not 0.0 < float(subset) < 1.0:
        raise ValueError(f"subset must be a fraction in (0, 1), got {subset!r}; 0.7 is "
                         "Feldman & Zhang's choice")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    _check_xy(X, y, "training")
    subset_size(len(X), float(subset))
    X_test = y_test = None
    if test is not None:
        X_test, y_test = test
        _check_xy(X_test, y_test, "test")
        if tuple(X_test.shape[1:]) != tuple(X.shape[1:]):
            raise ValueError(f"test inputs have shape {tuple(X_test.shape[1:])} per example, "
                             f"training inputs {tuple(X.shape[1:])}; they must match")
    classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    builder, model_name = _builder(model, tuple(X.shape[1:]), classes)
    with torch.random.fork_rng(devices=[]):
        probe = builder()
    if not isinstance(probe, nn.Module):
        raise ValueError(f"model() must return an nn.Module, got {type(probe).__name__}")
    try:
        with torch.no_grad():
            probe.eval()
            out = probe(X[:2])
    except (RuntimeError, ValueError) as e:
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"the model does not run on inputs of shape {tuple(X.shape[1:])}: "
                         f"{msg}; build it for this data") from None
    if out.ndim != 2 or out.shape[1] <= int(y.max()):
        raise ValueError(f"the model outputs shape {tuple(out.shape)}; it needs one logit per "
                         f"class for labels up to {int(y.max())}")
    X, y = X.detach().float().contiguous(), y.detach().long().contiguous()
    if X_test is not None:
        X_test, y_test = X_test.detach().float().contiguous(), y_test.detach().long().contiguous()
    options = {"model": model_name, "subset": float(subset), "epochs": epochs, "seed": seed,
               "lr": lr, "batch_size": batch_size, "momentum": momentum,
               "weight_decay": weight_decay, "schedule": schedule, "num_classes": classes}
    tensors = {"X": X, "y": y}
    if X_test is not None:
        tensors.update(X_test=X_test, y_test=y_test)
    # The architecture goes in by its parameter names and shapes, so run_dir of another net
    # is refused even when the callable's name is the same.
    tensors.update({f"model.{k}": torch.tensor(v.shape) for k, v in probe.state_dict().items()})
    fp = fingerprint(options, tensors)
    store = RunStore(run_dir, fp, options)
    records = store.load(runs)
    todo = [k for k in range(runs) if k not in records]
    n_workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    if n_workers > 1:
        check_picklable(builder)
    job = {"X": X, "y": y, "X_test": X_test, "y_test": y_test, "builder": builder,
           "options": options, "fingerprint": fp}
    with tqdm(total=runs, initial=len(records), desc="memorization runs", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        records.update(run_all(todo, job, store, n_workers, on_done=lambda _: bar.update(1)))
    ordered = [records[k] for k in range(runs)]
    masks = torch.stack([r["mask"] for r in ordered])
    train_correct = torch.stack([r["train_correct"] for r in ordered])
    test_correct = (torch.stack([r["test_correct"] for r in ordered])
                    if X_test is not None else None)
    scores, se = estimate(masks, train_correct)
    total = time.perf_counter() - started
    return Memorization(scores.float(), se.float(), masks, train_correct, test_correct,
                        {**options, "runs": runs, "workers": n_workers,
                         "run_dir": None if run_dir is None else str(run_dir),
                         "fingerprint": fp},
                        {"total_s": total, "trained_now": len(todo),
                         "per_run_s": total / len(todo) * n_workers if todo else None})
