"""What a pruning job will take, per rank, before anything is allocated.

:func:`plan_prune` adds up the biggest allocations of one WoodFisher prune over ``P`` ranks:

- **downdate path** (:mod:`woodfisher.pruning.downdate`, blocks at most ``2m`` wide): the dense
  inverse blocks a rank owns (``≈ d·B/P`` entries), one chunk of gradient rows (``c·d``, ``c``
  from :func:`woodfisher.streaming.chunk_rows`), for ``P > 1`` the all-to-all send and receive
  buffers (``c·d`` each), the per-sample gradient pass (``64`` rows of ``d`` plus the model's
  activations for 64 samples), the working set of one unit, and the flat weight vectors;
- **resample path** (sample space, ``m < B/2``): every rank holds the whole problem (it is not
  split): gradients ``m·d``, factors, working memory (:func:`woodfisher.fisher.memory.
  plan_memory`), the gradient pass.

Communication per rank is counted too: the all-to-all of gradient columns (once on the downdate
path), the histograms of the distributed k-th value per step, the final all-gather.

Example:
    >>> p = plan_prune([235_200, 30_000, 1_000], num_grads=1000, block_size=500)
    >>> p.path, p.chunk_rows, round(p.parts["inverse blocks"] / 2**20)
    ('downdate', 250, 508)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from woodfisher.fisher.dense import make_units, unit_ranges
from woodfisher.fisher.memory import format_bytes, plan_memory
from woodfisher.streaming import CHUNK_BYTES, VMAP_ROWS, chunk_rows, num_chunks

#: Ways a multi-step prune gets its curvature at each step.
RECOMPUTE_BY = ("auto", "downdate", "resample")


def downdate_applies(
    curvature: str | None,
    needs_mean_grad: bool,
    num_grads: int,
    block_size: int | None,
    d: int,
    recompute_by: str,
) -> bool:
    """Whether a prune takes the downdate path.

    ``"auto"`` takes it for the block-wise empirical Fisher without a first-order term when the
    blocks are at most twice as wide as the number of gradients (then a dense (B, B) inverse per
    block costs no more memory than the (m, B) sample-space factor it replaces, to a factor 2);
    wider blocks keep the sample-space path, whose steps resample the gradients.

    Args:
        curvature: The method's curvature (``"woodfisher"`` for the block-wise EF).
        needs_mean_grad: True for WoodTaylor (its linear term moves with the weights).
        num_grads: ``m``.
        block_size: ``B`` (None: one block of ``d``).
        d: Selected weights.
        recompute_by: ``"auto"``, ``"downdate"`` or ``"resample"``.

    Returns:
        True for the downdate path.

    Raises:
        ValueError: If ``recompute_by`` is unknown, or ``"downdate"`` is asked for a method it
            cannot serve.
    """
    if recompute_by not in RECOMPUTE_BY:
        raise ValueError(
            f"unknown recompute_by {recompute_by!r}; choose from {list(RECOMPUTE_BY)}"
        )
    if recompute_by == "resample":
        return False
    fits = curvature == "woodfisher" and not needs_mean_grad
    if recompute_by == "downdate":
        if not fits:
            raise ValueError(
                "recompute_by='downdate' needs the block-wise empirical Fisher without a "
                "first-order term (method 'woodfisher'); use recompute_by='resample'"
            )
        return True
    width = d if block_size is None else min(block_size, d)
    return fits and width <= 2 * num_grads


#: Selection rounds per step of the distributed k-th value (float32: 2 × 16 bits).
_HIST_BYTES = 2 * (1 << 16) * 8


@dataclass(frozen=True)
class PrunePlan:
    """Per-rank memory and communication of one prune.

    Attributes:
        path: ``"downdate"`` or ``"resample"``.
        d: Weights pruned.
        num_grads: ``m``.
        block_size: ``B`` (None: one block).
        nproc: Ranks ``P``.
        dtype: Computation dtype name.
        device: ``"cpu"`` or ``"cuda"``.
        chunk_rows: Gradient rows per chunk.
        parts: Bytes of each allocation on the busiest rank.
        total_bytes: Their sum (the plan's peak, baseline included).
        communication: Bytes each rank sends: ``gradients`` (the all-to-all), ``per_step``
            (selection), ``assemble`` (final all-gather).
        steps: Recompute steps the communication was counted for.
    """

    path: str
    d: int
    num_grads: int
    block_size: int | None
    nproc: int
    dtype: str
    device: str
    chunk_rows: int
    parts: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0
    communication: dict[str, int] = field(default_factory=dict)
    steps: int = 1

    def to_dict(self) -> dict[str, object]:
        """JSON-able form.

        Returns:
            A plain dict.
        """
        return asdict(self)

    def __str__(self) -> str:
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items())
        return (
            f"{self.path} path, P={self.nproc}: {format_bytes(self.total_bytes)} per rank "
            f"({detail})"
        )


@functools.lru_cache(maxsize=32)
def _units(sizes: tuple[int, ...], block_size: int | None) -> tuple:
    # fitting() plans the same layout for many P and m: cut it into units once.
    return make_units(sizes, block_size)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_prune(
    layout_sizes: Sequence[int],
    num_grads: int,
    block_size: int | None,
    nproc: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    activations: int = 0,
    recompute_by: str = "auto",
    baseline: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    steps: int = 9,
) -> PrunePlan:
    """Per-rank bytes of a WoodFisher prune over ``nproc`` ranks.

    Args:
        layout_sizes: Weights of each pruned layer.
        num_grads: ``m``.
        block_size: ``B``, or None for one block.
        nproc: Ranks ``P``.
        dtype: Computation dtype (that of the model).
        device: ``"cpu"`` or ``"cuda"`` (recorded; the sizes are the same).
        activations: Activation entries of one sample's forward pass (see
            :func:`activation_numel`); the gradient pass holds them for 64 samples, about 3
            times (forward, backward, vectorised copies).
        recompute_by: ``"auto"``, ``"downdate"`` or ``"resample"``, as for ``prune``.
        baseline: Bytes already in use (the process, the model, the data), added to the total.
        chunk_bytes: Budget of one gradient chunk.
        steps: Recompute steps, for the communication count.

    Returns:
        The plan.

    Raises:
        ValueError: If a size is not positive.
    """
    sizes = [int(s) for s in layout_sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"layer sizes must be positive integers, got {sizes[:10]}")
    for name, v in (("num_grads", num_grads), ("nproc", nproc)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    d, m, item = sum(sizes), int(num_grads), _itemsize(dtype)
    rows = chunk_rows(m, d, item, chunk_bytes)
    vmap = {
        "gradient pass": min(VMAP_ROWS, rows) * (d + 3 * activations) * item,
    }
    down = downdate_applies("woodfisher", False, m, block_size, d, recompute_by)
    comm: dict[str, int] = {}
    if down:
        units = _units(tuple(sizes), block_size)
        ranges = unit_ranges(units, nproc)
        owned = max(sum(u.entries for u in units[a:b]) for a, b in ranges)
        cols = max(
            (units[b - 1].stop - units[a].start) if b > a else 0 for a, b in ranges
        )
        unit_max = max(u.entries for u in units)
        parts = {
            "inverse blocks": owned * item,
            "gradient chunk": rows * d * item,
            **vmap,
            "working": 4 * unit_max * item,
            "weight vectors": (3 * cols + 2 * d) * item + 2 * d,
        }
        if nproc > 1:
            parts["exchange buffers"] = rows * d * item + nproc * rows * cols * item
            chunks_mine = math.ceil(num_chunks(m, rows) / nproc)
            comm = {
                "gradients": chunks_mine * rows * (d - cols) * item,
                "per_step": _HIST_BYTES + 3 * 8,
                "assemble": d * (item + 1),
            }
    else:
        inner = plan_memory(d, m, block_size, sizes, dtype)
        parts = {
            "gradients": inner.parts["gradients"],
            "inverse factors": inner.parts["inverse factors"],
            "working": inner.parts["working"],
            **vmap,
        }
    if baseline:
        parts["baseline (process, model, data)"] = int(baseline)
    return PrunePlan(
        path="downdate" if down else "resample",
        d=d,
        num_grads=m,
        block_size=block_size,
        nproc=int(nproc),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        chunk_rows=rows,
        parts=parts,
        total_bytes=int(sum(parts.values())),
        communication=comm,
        steps=steps,
    )


def activation_numel(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Entries of every module output for one sample, without computing anything.

    The model is copied to the ``meta`` device (shapes only, no memory) and run once on a
    meta input of ``(1, *input_shape)``.

    Args:
        model: The network.
        input_shape: One sample's shape, e.g. ``(1, 28, 28)``.

    Returns:
        The summed numel of all leaf-module outputs (0 if the model cannot run on meta).
    """
    import copy

    total = 0

    def hook(_mod, _inp, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    try:
        meta = copy.deepcopy(model).to("meta")
        handles = [m.register_forward_hook(hook) for m in meta.modules()
                   if not list(m.children())]
        with torch.no_grad():
            meta(torch.empty(1, *input_shape, device="meta"))
        for h in handles:
            h.remove()
    except Exception:  # noqa: BLE001 - an estimate; models that refuse meta get 0
        return 0
    return total


def fitting(
    layout_sizes: Sequence[int],
    num_grads: int,
    block_size: int | None,
    nproc: int,
    memory: int,
    **kw: object,
) -> dict[str, int | None]:
    """What fits ``memory`` bytes per rank when the asked plan does not.

    Args:
        layout_sizes: As for :func:`plan_prune`.
        num_grads: ``m``.
        block_size: ``B``.
        nproc: ``P``.
        memory: Bytes per rank.
        **kw: More :func:`plan_prune` options.

    Returns:
        ``{"nproc": smallest P ≤ 4096 that fits at this B (or None), "block_size": largest B
        that fits at this P (or None), "num_grads": largest m that fits on the same path
        (downdate or resample), or None}``.
    """
    def fits(**change: object) -> bool:
        args = {"num_grads": num_grads, "block_size": block_size, "nproc": nproc, **change}
        return plan_prune(layout_sizes, **args, **kw).total_bytes <= memory

    p = next((q for q in (2**k for k in range(13)) if q >= nproc and fits(nproc=q)), None)
    top = block_size if block_size is not None else sum(layout_sizes)
    cands = sorted({top // 2**k for k in range(1, 16)} | {
        10000, 5000, 2000, 1000, 500, 200, 100, 50, 20, 10
    }, reverse=True)
    b = next((c for c in cands if 1 <= c < top and fits(block_size=c)), None)
    # Fewer gradients only on the same path: a smaller m that silently switches to the
    # resample path (which holds m·d per rank) would not be the job that was asked for.
    d, how = sum(int(s) for s in layout_sizes), str(kw.get("recompute_by", "auto"))

    def down(m: int) -> bool:
        return downdate_applies("woodfisher", False, m, block_size, d, how)

    ms = [
        c for c in (num_grads // 2**k for k in range(1, 12))
        if c >= 1 and down(c) == down(num_grads)
    ]
    mm = next((c for c in ms if fits(num_grads=c)), None)
    return {"nproc": p, "block_size": b, "num_grads": mm}


__all__ = [
    "RECOMPUTE_BY",
    "PrunePlan",
    "activation_numel",
    "downdate_applies",
    "fitting",
    "plan_prune",
]
