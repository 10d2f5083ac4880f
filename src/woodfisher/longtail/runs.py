"""The training runs behind the memorization estimate: one run, a store of finished runs, a pool.

Run ``k`` trains a fresh model on a random subset of the examples and records which examples
were in the subset and which train and test examples the model classifies correctly. Every
random choice of run ``k`` (the subset, the initialisation, the shuffling) comes from a seed
derived from ``(seed, k)``, and every run trains on one thread, so a run gives the same bits
whichever process runs it and however many run beside it.

The store keeps each finished run as its own file, written atomically, under a manifest that
holds the job's fingerprint (options and data); a rerun with the same job skips the runs found
there, and a job with other options or data is refused rather than mixed in.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from woodfisher.checkpoint import atomic_save, atomic_save_json
from woodfisher.events import emit
from woodfisher.resume import stream_seed

__all__ = ["RUN_FORMAT", "RunStore", "run_all", "train_run"]

RUN_FORMAT = "woodfisher-memorization-run-v1"
_EVAL_CHUNK = 2048


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the body on one intra-op thread (then restore the count).

    Yields:
        Nothing.
    """
    before = torch.get_num_threads()
    if before == 1:
        # No call at all: with torch 2.13's MKL any set_num_threads(n >= 2), even a restore,
        # can break batched LU later in the process (see tests/conftest.py).
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _correct(net: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    out = [net(X[s : s + _EVAL_CHUNK]).argmax(1) for s in range(0, len(X), _EVAL_CHUNK)]
    return torch.cat(out) == y if out else torch.zeros(0, dtype=torch.bool)


def train_run(k: int, job: dict[str, Any]) -> dict[str, Any]:
    """Train run ``k`` of a memorization job and record what it gets right.

    Args:
        k: The run index.
        job: ``X``, ``y``, ``X_test``, ``y_test`` (or None), ``builder`` (a callable returning a
            fresh module), ``options`` (``seed``, ``subset``, ``epochs``, ``lr``,
            ``batch_size``, ``momentum``, ``weight_decay``, ``schedule``) and ``fingerprint``.

    Returns:
        ``{"format", "fingerprint", "k", "mask" (n,) bool, "train_correct" (n,) bool,
        "test_correct" (n_test,) bool or None}``.
    """
    from woodfisher.train import train

    X, y, opts = job["X"], job["y"], job["options"]
    n, seed = len(X), opts["seed"]
    size = subset_size(n, opts["subset"])
    g = torch.Generator().manual_seed(stream_seed(seed, k, "subset"))
    idx = torch.randperm(n, generator=g)[:size].sort().values
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    torch.manual_seed(stream_seed(seed, k, "init"))
    net = job["builder"]()
    train(net, TensorDataset(X[idx], y[idx]), epochs=opts["epochs"], lr=opts["lr"],
          batch_size=opts["batch_size"], seed=stream_seed(seed, k, "train"),
          momentum=opts["momentum"], weight_decay=opts["weight_decay"],
          schedule=opts["schedule"], progress=False)
    net.eval()
    test = None if job["X_test"] is None else _correct(net, job["X_test"], job["y_test"])
    return {"format": RUN_FORMAT, "fingerprint": job["fingerprint"], "k": k, "mask": mask,
            "train_correct": _correct(net, X, y), "test_correct": test}


def subset_size(n: int, subset: float) -> int:
    """Examples each run trains on: ``round(subset · n)``.

    Args:
        n: Number of examples.
        subset: Fraction in (0, 1).

    Returns:
        The size, at least 1 and at most ``n - 1``.

    Raises:
        ValueError: If the fraction leaves no example in, or none out, of a subset.
    """
    size = int(round(subset * n))
    if not 1 <= size <= n - 1:
        raise ValueError(
            f"subset={subset} of {n} examples gives subsets of {size}; every run needs at least "
            f"one example in and one out; use more examples or a fraction in (1/n, 1 - 1/n)"
        )
    return size


class RunStore:
    """Finished runs of one job, one file each, in a directory (or nowhere, for ``path=None``).

    Args:
        path: The directory (created if missing), or None to keep nothing.
        fingerprint: The job's fingerprint.
        options: The job's options, written to the manifest for people to read.

    Raises:
        ValueError: If the directory holds runs of another job, or a run file is unreadable.
    """

    MANIFEST = "manifest.json"

    def __init__(self, path: str | os.PathLike | None, fingerprint: str,
                 options: dict[str, Any]) -> None:
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint
        if self.path is None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run_dir {self.path} is a file; give a directory for the runs")
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / self.MANIFEST
        if manifest.is_file():
            found = json.loads(manifest.read_text()).get("fingerprint")
            if found != fingerprint:
                raise ValueError(
                    f"run_dir {self.path} holds runs of another job (fingerprint {found} != "
                    f"{fingerprint}: other data or options); use another directory or empty it"
                )
        else:
            atomic_save_json({"format": RUN_FORMAT, "fingerprint": fingerprint,
                              "options": options}, manifest)

    def _file(self, k: int) -> Path:
        assert self.path is not None
        return self.path / f"run-{k:05d}.pt"

    def load(self, runs: int) -> dict[int, dict[str, Any]]:
        """The finished runs among ``0..runs-1``.

        Returns:
            Run index to its record.

        Raises:
            ValueError: If a run file is unreadable or belongs to another job.
        """
        if self.path is None:
            return {}
        found = {}
        for k in range(runs):
            path = self._file(k)
            if not path.is_file():
                continue
            try:
                record = torch.load(path, weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
                raise ValueError(f"run file {path} is unreadable ({type(e).__name__}); "
                                 "delete it and rerun to redo that run") from None
            if record.get("fingerprint") != self.fingerprint or record.get("k") != k:
                raise ValueError(f"run file {path} belongs to another job; delete it or use "
                                 "another run_dir")
            found[k] = record
        return found

    def save(self, record: dict[str, Any]) -> None:
        """Write one finished run atomically (nothing when the store has no directory).

        Each run written is announced as the event ``memorization_run_saved`` (see
        :mod:`woodfisher.events`), the point where a killed job has that run to resume from.
        """
        if self.path is not None:
            path = self._file(record["k"])
            atomic_save(record, path)
            emit("memorization_run_saved", run=int(record["k"]), path=str(path))


_WORKER_JOB: dict[str, Any] = {}


def _init_worker(job: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _WORKER_JOB.update(job)


def _worker_run(k: int) -> dict[str, Any]:
    return train_run(k, _WORKER_JOB)


def check_picklable(builder: Callable[[], nn.Module]) -> None:
    """Check that a model builder can be sent to worker processes.

    Args:
        builder: The callable.

    Raises:
        ValueError: If pickling it fails (a lambda or a local function).
    """
    try:
        pickle.dumps(builder)
    except Exception as e:  # noqa: BLE001 - pickle raises several kinds
        raise ValueError(
            f"model {builder!r} cannot be sent to worker processes ({type(e).__name__}); define "
            "the function at module level (or use functools.partial), or pass workers=1"
        ) from None


def run_all(
    todo: list[int],
    job: dict[str, Any],
    store: RunStore,
    workers: int,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[int, dict[str, Any]]:
    """Run ``todo`` runs, saving each to ``store`` as it finishes.

    Args:
        todo: Run indices.
        job: See :func:`train_run`.
        store: Where finished runs go.
        workers: Processes; 1 runs in this process (on one thread).
        on_done: Called with each finished record (progress).

    Returns:
        Run index to record.
    """
    done: dict[int, dict[str, Any]] = {}

    def finish(record: dict[str, Any]) -> None:
        store.save(record)
        done[record["k"]] = record
        if on_done is not None:
            on_done(record)

    if not todo:
        return done
    if workers <= 1:
        with one_thread(), torch.random.fork_rng(devices=[]):
            for k in todo:
                finish(train_run(k, job))
        return done
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=_init_worker, initargs=(job,)) as pool:
        pending = {pool.submit(_worker_run, k) for k in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return done
