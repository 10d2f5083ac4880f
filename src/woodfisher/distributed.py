"""One pruning job over several processes with torch.distributed (gloo on CPU, NCCL on GPU).

What the processes (ranks) share and how, so that the result equals one process's:

- **rank shares of the gradients**: gradient rows are computed in chunks of a size that does
  not depend on the number of ranks ``P`` (:mod:`woodfisher.streaming`); chunk ``j`` is computed
  by rank ``j mod P`` from the same samples one process would use;
- **block partition**: the Fisher blocks are grouped in units (:func:`woodfisher.fisher.dense.
  make_units`) and every rank owns a contiguous range of units (about equal cost), so ranks
  own increasing, disjoint ranges of the flat weight vector;
- **all-to-all of gradient columns**: after each round of chunks every rank receives, from
  every rank, the columns of its own blocks, and sums them in chunk order (the order one
  process uses), so each block's Fisher is bit for bit the one process's;
- **distributed k-th value**: the global threshold is found by radix selection on the scores'
  bit patterns, one 65,536-bin histogram ``all_reduce`` per 16 bits (2 rounds in float32, 4 in
  float64), never gathering the scores; ties at the threshold go to the lowest indices, as the
  stable sort of one process does;
- **rank 0 writes**: every rank ends with the full pruned model (an all-gather of the weights
  and masks); only rank 0 writes files, after every rank has finished.

A rank that dies makes the collectives of the others fail: they raise
:class:`DistributedError` (a ``ValueError``: the CLI prints one line and exits 2), and nothing is
written. :class:`Group` with ``world == 1`` is the single-process case, with no communication.

Example:
    >>> g = Group.local()
    >>> g.world, g.rank
    (1, 0)
    >>> g.select_lowest(torch.tensor([3.0, 1.0, 1.0, 0.5]), None, 2)
    tensor([False,  True, False,  True])
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

#: Seconds a collective (and the initial rendezvous) may wait for the other ranks.
DEFAULT_TIMEOUT = float(os.environ.get("WOODFISHER_DIST_TIMEOUT", "600"))
_BITS = 16


class DistributedError(ValueError):
    """A distributed job cannot go on: a rank died, timed out, or the ranks disagree."""


def in_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with ``P > 1``.

    Returns:
        True when ``WORLD_SIZE`` > 1 and ``RANK`` are set in the environment.
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    Returns:
        Bytes (Linux reports KiB).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fault(phase: str, rank: int) -> None:
    # Fault injection for the tests: WOODFISHER_FAULT="RANK:PHASE" kills that rank there.
    spec = os.environ.get("WOODFISHER_FAULT", "")
    if spec and spec == f"{rank}:{phase}":
        os._exit(17)


class Group:
    """The ranks of one job: who this process is, and the few collectives pruning needs.

    Build it with :meth:`local` (one process) or :meth:`from_torch` (an initialised default
    process group).

    Attributes:
        rank: This process's rank.
        world: Number of ranks ``P``.
        device: The device collectives run on (CPU for gloo, this rank's GPU for NCCL).
    """

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float):
        self.rank, self.world, self.device, self.timeout = rank, world, device, timeout
        self.phase = "start"
        self.times: dict[str, float] = {}

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def local(cls, device: torch.device | str = "cpu") -> Group:
        """The one-process group (no communication).

        Returns:
            A group with ``world == 1``.
        """
        return cls(0, 1, torch.device(device), DEFAULT_TIMEOUT)

    @classmethod
    def from_torch(cls) -> Group:
        """The default process group, if initialised with more than one rank, else local.

        Returns:
            The group.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls.local()
        backend = dist.get_backend()
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl" else torch.device("cpu")
        )
        return cls(dist.get_rank(), dist.get_world_size(), device, DEFAULT_TIMEOUT)

    @property
    def distributed(self) -> bool:
        """True for more than one rank."""
        return self.world > 1

    # -- error handling --------------------------------------------------------------------
    @contextmanager
    def phase_of(self, phase: str) -> Iterator[None]:
        """Run a phase: time it, and turn a failed collective into a clear error.

        Args:
            phase: Its name (``"gradients"``, ``"selection"``, ...), in error messages and in
                :attr:`times`.

        Yields:
            Nothing.

        Raises:
            DistributedError: If a collective failed (a rank died or timed out).
        """
        self.phase = phase
        _fault(phase, self.rank)
        t0 = time.perf_counter()
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:
            if not self.distributed:
                raise
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world}: lost the other ranks during {phase} "
                f"({first}); a rank died, was killed or failed first (see its own error). "
                "Nothing was written; start the job again"
            ) from None
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    # -- collectives -----------------------------------------------------------------------
    def _dev(self, t: Tensor) -> Tensor:
        return t.to(self.device)

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over ranks (every rank gets it).

        Returns:
            A tensor like ``t``.
        """
        if not self.distributed:
            return t
        import torch.distributed as dist

        out = self._dev(t.clone())
        dist.all_reduce(out)
        return out.to(t.device)

    def all_gather_cat(self, local: Tensor) -> Tensor:
        """Concatenate every rank's 1-D ``local`` in rank order (sizes may differ).

        Returns:
            The concatenation, on ``local``'s device.
        """
        if not self.distributed:
            return local

        sizes = self.all_gather_ints([local.numel()])
        top = max(s[0] for s in sizes)
        buf = torch.zeros(top, dtype=local.dtype, device=self.device)
        buf[: local.numel()] = local.to(self.device)
        out = torch.empty(top * self.world, dtype=local.dtype, device=self.device)
        _all_gather(out, buf)
        parts = [out[r * top : r * top + sizes[r][0]] for r in range(self.world)]
        return torch.cat(parts).to(local.device)

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's short list of integers (all of the same length).

        Returns:
            One list per rank, in rank order.
        """
        if not self.distributed:
            return [list(values)]

        local = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = torch.empty(self.world * local.numel(), dtype=torch.int64, device=self.device)
        _all_gather(out, local)
        return out.reshape(self.world, -1).tolist()

    def check_agree(self, what: str, value: object) -> None:
        """Every rank must hold the same ``value`` (compared by a hash); else all raise.

        Args:
            what: What is compared, for the message (``"options"``, ``"world size"``).
            value: A JSON-able value.

        Raises:
            DistributedError: On every rank, naming the ranks that differ from rank 0.
        """
        if not self.distributed:
            return
        text = json.dumps(value, sort_keys=True, default=str)
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
        seen = self.all_gather_ints([digest])
        odd = [r for r in range(self.world) if seen[r][0] != seen[0][0]]
        if odd:
            raise DistributedError(
                f"rank {self.rank} of {self.world}: the ranks disagree on {what} (ranks {odd} "
                "differ from rank 0); start every rank with the same command and files"
            )

    def exchange(self, pieces: list[Tensor], recv_numels: Sequence[int]) -> list[Tensor]:
        """All-to-all: send ``pieces[s]`` to rank ``s``; receive one flat piece from each rank.

        Args:
            pieces: One tensor per destination rank (any shapes; sent flat).
            recv_numels: How many entries arrive from each rank.

        Returns:
            One flat tensor per source rank, in rank order.
        """
        if not self.distributed:
            return [p.reshape(-1) for p in pieces]
        import torch.distributed as dist

        dtype = pieces[0].dtype
        send = torch.cat([p.reshape(-1).to(self.device) for p in pieces])
        recv = torch.empty(sum(recv_numels), dtype=dtype, device=self.device)
        dist.all_to_all_single(recv, send, list(recv_numels), [p.numel() for p in pieces])
        return list(torch.split(recv, list(recv_numels)))

    def shard_batch(self, x: object, y: Tensor) -> tuple[object, Tensor, float]:
        """This rank's contiguous share of a global batch, and its loss weight.

        With a mean loss on each share, ``weight = P · n_r / n`` makes the data-parallel
        average of the ranks' gradients the gradient of the whole batch's mean loss, whatever
        the remainder of ``n / P``. A rank whose share is empty gets one sample with weight 0
        (data-parallel training needs every rank to run the step).

        Args:
            x: The global batch's inputs (the same on every rank): a tensor, or a tuple or
                dict of tensors as :mod:`woodfisher.batch` takes them.
            y: Its targets.

        Returns:
            ``(x_r, y_r, weight)``.
        """
        from woodfisher.batch import take

        n = int(y.shape[0])
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        size = base + (self.rank < extra)
        if size == 0:
            return take(x, slice(0, 1)), y[:1], 0.0
        part = slice(lo, lo + size)
        return take(x, part), y[part], self.world * size / n

    def data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` wrapped in ``DistributedDataParallel`` (itself for one rank).

        Build it again after a pruning step: pruning re-registers weights.

        Returns:
            The module to run the training step through.
        """
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        """Wait for every rank (a tiny all-reduce, which gloo and NCCL both time out)."""
        self.all_sum(torch.zeros(1))

    # -- selection -------------------------------------------------------------------------
    def select_lowest(self, scores: Tensor, eligible: Tensor | None, k: int) -> Tensor:
        """The ``k`` lowest eligible scores over all ranks' shards, as a local mask.

        Ranks hold consecutive shards of one vector in rank order; ties are broken by the
        lower global index, exactly like a stable sort of the whole vector.

        Args:
            scores: This rank's (n,) scores (float32 or float64).
            eligible: (n,) bool, or None for all.
            k: How many to pick over all ranks.

        Returns:
            (n,) bool mask of this rank's picked entries.

        Raises:
            ValueError: If ``k`` exceeds the eligible count or an eligible score is NaN.
        """
        scores = scores.reshape(-1)
        if eligible is None:
            eligible = torch.ones_like(scores, dtype=torch.bool)
        eligible = eligible.reshape(-1).to(torch.bool)
        total = int(self.all_sum(eligible.sum().reshape(1).to(torch.int64))[0])
        if k < 0 or k > total:
            raise ValueError(f"cannot select k={k} entries out of {total} eligible")
        nan = int(self.all_sum((torch.isnan(scores) & eligible).sum().reshape(1))[0])
        if nan:
            raise ValueError("scores contain NaN; the curvature estimate is probably degenerate")
        if not self.distributed:
            from woodfisher.pruning.select import select as _select  # lazy: no cycle at import

            return _select(scores, k, eligible)
        out = torch.zeros_like(eligible)
        if k == 0:
            return out
        key, width = order_key(scores)
        thr = self._kth_key(key, width, eligible, k)
        below = eligible & (key < thr)
        ties = eligible & (key == thr)
        counts = self.all_gather_ints([int(below.sum()), int(ties.sum())])
        need = k - sum(c[0] for c in counts)
        before = sum(c[1] for c in counts[: self.rank])
        take = max(0, min(counts[self.rank][1], need - before))
        out |= below
        if take:
            out[ties.nonzero().reshape(-1)[:take]] = True
        return out

    def _kth_key(self, key: Tensor, width: int, eligible: Tensor, k: int) -> int:
        """The ``k``-th smallest key over all ranks, 16 bits per histogram round."""
        match = eligible.clone()
        half, mask = 1 << (_BITS - 1), (1 << _BITS) - 1
        thr = 0
        for shift in range(width - _BITS, -1, -_BITS):
            top = shift == width - _BITS
            # The top digit is signed (arithmetic shift); lower digits are plain bits.
            digit = (key >> shift) + half if top else (key >> shift) & mask
            hist = torch.bincount(digit[match], minlength=1 << _BITS).to(torch.int64)
            cum = torch.cumsum(self.all_sum(hist), 0)
            t = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype))[0])
            k -= int(cum[t - 1]) if t > 0 else 0
            match &= digit == t
            thr = (t - half) if top else (thr << _BITS) | t
        return thr


def _all_gather(out: Tensor, local: Tensor) -> None:
    import torch.distributed as dist

    # all_gather_into_tensor warns (deprecated) from torch 2.10 on; its successor is newer.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local)


def order_key(scores: Tensor) -> tuple[Tensor, int]:
    """Integers that sort like the floats ``scores`` (−0.0 counted as +0.0), and their width.

    Args:
        scores: float32 or float64 (other floats are widened to float32).

    Returns:
        ``(keys, bits)``: int64 keys, and 32 for float32 input or 64 for float64 (the same on
        every rank, since it depends only on the dtype).

    Example:
        >>> key, bits = order_key(torch.tensor([-2.0, -0.0, 0.0, 1.5]))
        >>> key.argsort(stable=True).tolist(), bits
        ([0, 1, 2, 3], 32)
    """
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    scores = scores + 0.0  # -0.0 -> +0.0, as comparisons treat them
    if scores.dtype == torch.float64:
        b = scores.view(torch.int64)
        return torch.where(b >= 0, b, b ^ 0x7FFF_FFFF_FFFF_FFFF), 64
    b = scores.view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b, b ^ 0x7FFF_FFFF), 32


def chunk_owner(j: int, world: int) -> int:
    """The rank that computes gradient chunk ``j`` (round robin).

    Returns:
        ``j mod world``.
    """
    return j % world


def init_from_env(device: torch.device, timeout: float | None = None) -> Group:
    """Join the job ``torchrun`` started: gloo on CPU, NCCL on CUDA; one GPU per local rank.

    Args:
        device: The device asked for (``cuda`` picks ``cuda:LOCAL_RANK``).
        timeout: Seconds to wait for the other ranks (default ``WOODFISHER_DIST_TIMEOUT`` or
            600).

    Returns:
        The group.

    Raises:
        DistributedError: If the environment is incomplete or the ranks do not all join in
            time (e.g. different ``WORLD_SIZE`` on different ranks).
    """
    import torch.distributed as dist

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise DistributedError(
            f"torch.distributed environment incomplete ({e}); start with torchrun"
        ) from None
    if device.type == "cuda":
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend, rank=rank, world_size=world,
                timeout=datetime.timedelta(seconds=timeout),
            )
        except (RuntimeError, ValueError) as e:
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {rank}: the {world} ranks did not meet at {where} within {timeout:g} s "
                f"({first}); start all ranks with the same WORLD_SIZE and master address"
            ) from None
    group = Group(rank, world, device, timeout)
    with group.phase_of("start"):
        group.check_agree("the world size", world)
    return group


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_report(group: Group, extra: dict | None = None) -> list[dict]:
    """Every rank's phase times and peak memory, gathered on all ranks.

    Args:
        group: The group.
        extra: More numbers of this rank to report (same keys on every rank).

    Returns:
        One dict per rank: ``rank``, ``times`` (seconds per phase), ``peak_rss_bytes`` and,
        on CUDA, ``peak_cuda_bytes``.
    """
    from woodfisher.device import peak_memory

    names = sorted(group.times)
    mine = [int(group.times[n] * 1e6) for n in names]
    mine.append(peak_rss_bytes())
    cuda = peak_memory(group.device)
    mine.append(-1 if cuda is None else cuda)
    keys = sorted(extra or {})
    mine += [int(extra[k]) for k in keys] if extra else []
    rows = group.all_gather_ints(mine)
    out = []
    for r, row in enumerate(rows):
        rec = {
            "rank": r,
            "times": {n: row[i] / 1e6 for i, n in enumerate(names)},
            "peak_rss_bytes": row[len(names)],
        }
        if row[len(names) + 1] >= 0:
            rec["peak_cuda_bytes"] = row[len(names) + 1]
        for i, k in enumerate(keys):
            rec[k] = row[len(names) + 2 + i]
        out.append(rec)
    return out


def spawn_local(
    fn: Callable,
    world: int,
    *args: object,
    env: Sequence[dict[str, str]] | None = None,
    timeout: float = 600.0,
) -> list[int | None]:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes on this machine (loopback).

    For tests and benchmarks; users start jobs with ``torchrun``. Each process gets the
    variables ``torchrun`` would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``), then ``env[rank]`` on top.

    Args:
        fn: A picklable (module-level) function.
        world: Number of processes.
        *args: More arguments for ``fn``.
        env: Per-rank extra environment variables.
        timeout: Seconds to wait for all processes; those still running are killed.

    Returns:
        Every process's exit code (None if it had to be killed).
    """
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(world):
        extra = {
            "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            **(dict(env[rank]) if env else {}),
        }
        proc = ctx.Process(target=_spawned, args=(fn, rank, world, extra, args))
        proc.start()
        procs.append(proc)
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    codes: list[int | None] = []
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
            codes.append(None)
        else:
            codes.append(proc.exitcode)
    return codes


def _spawned(fn: Callable, rank: int, world: int, env: dict[str, str], args: tuple) -> None:
    os.environ.update(env)
    fn(rank, world, *args)


__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "Group",
    "chunk_owner",
    "in_torchrun",
    "init_from_env",
    "order_key",
    "peak_rss_bytes",
    "rank_report",
    "shutdown",
    "spawn_local",
]
