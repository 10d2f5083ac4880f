"""Real CPU inference time of dense, shrunk and sparse (CSR) forms of one model.

Zeros in a dense tensor cost the same time as any other number; a model is faster only when
its tensors are smaller (:func:`woodfisher.shrink`) or when a sparse kernel skips the zeros.
:func:`latency_report` times each form at batch 1 and 128 (median of repeats, the thread count
recorded) so the user sees what pays on their machine. Timings belong in reports and
benchmarks, never in test assertions.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 4))
    >>> sparse = to_csr_linear(net)
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(sparse(x), net(x), atol=1e-6)
    True
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from woodfisher.pruning.channels import baked_copy

__all__ = ["CSRLinear", "latency_report", "measure", "semi_structured_support", "to_csr_linear"]


def semi_structured_support() -> tuple[bool, str]:
    """Whether torch's semi-structured (2:4) sparse kernels can run here.

    Returns:
        ``(available, reason)``; they need ``torch.sparse.to_sparse_semi_structured`` and a CUDA
        GPU of compute capability 8.0 or newer.
    """
    fn = getattr(torch.sparse, "to_sparse_semi_structured", None)
    if fn is None:
        return False, "this torch has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return False, "2:4 semi-structured kernels need a CUDA GPU (compute capability >= 8.0)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"the GPU has compute capability {major}.x; 2:4 kernels need >= 8.0"
    return True, "available on " + torch.cuda.get_device_name()


class CSRLinear(nn.Module):
    """A Linear layer whose weight is a CSR sparse tensor (``y = x Wᵀ + b`` via sparse mm).

    Args:
        linear: The dense layer to convert (its zeros are dropped).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        lead = x.shape[:-1]
        y = torch.sparse.mm(self.weight, x.reshape(-1, self.in_features).T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def to_csr_linear(model: nn.Module, min_sparsity: float = 0.0) -> nn.Module:
    """A copy of ``model`` (masks baked) with its sparse Linear layers as :class:`CSRLinear`.

    Args:
        model: Any model.
        min_sparsity: Convert only layers with at least this fraction of zeros.

    Returns:
        The converted copy (convolutions stay dense: torch has no CPU sparse convolution).
    """
    net = baked_copy(model)
    for name, mod in list(net.named_modules()):
        if isinstance(mod, nn.Linear) and float((mod.weight == 0).float().mean()) >= min_sparsity:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, CSRLinear(mod))
    return net


def measure(model: nn.Module, x: Tensor, min_time: float = 0.3, max_repeats: int = 200,
            min_repeats: int = 5) -> dict[str, float]:
    """Median wall time of ``model(x)`` (eval, inference mode) over repeats.

    Args:
        model: The model.
        x: The batch.
        min_time: Keep repeating until this many seconds have been measured...
        max_repeats: ...or this many calls were timed.
        min_repeats: Time at least this many calls.

    Returns:
        ``{"median_ms", "min_ms", "repeats"}``.
    """
    model.eval()
    times: list[float] = []
    with torch.inference_mode():
        t_end = time.perf_counter() + min_time / 3
        for i in range(1000):  # warm-up: allocations, oneDNN primitives, thread pools
            model(x)
            if i >= 3 and time.perf_counter() > t_end:
                break
        total = 0.0
        while len(times) < min_repeats or (total < min_time and len(times) < max_repeats):
            t0 = time.perf_counter()
            model(x)
            dt = time.perf_counter() - t0
            times.append(dt)
            total += dt
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
            "repeats": len(times)}


def latency_report(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    shrunk: nn.Module | None = None,
    batch_sizes: tuple[int, ...] = (1, 128),
    seed: int = 0,
    min_time: float = 0.3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time the dense (baked), shrunk and CSR forms of ``model`` at several batch sizes.

    Args:
        model: The (masked) model.
        input_shape: One sample's shape.
        shrunk: Its :func:`woodfisher.shrink` form, if any.
        batch_sizes: Batch sizes to time.
        seed: Seed of the random inputs.
        min_time: Seconds of timed calls per measurement (at least 5 calls).
        threads: Intra-op threads to time with (default: torch's current setting). On a
            shared, oversubscribed machine 1 thread is far steadier: a multi-threaded call
            waits at every barrier for its slowest, descheduled thread.

    Returns:
        ``{"threads", "batch_sizes", "forms": {form: {batch: timing}}, "speedup": {form:
        {batch: dense/form median}}, "speedup_min": {... of the fastest calls},
        "semi_structured": {"available", "reason"}}``.
    """
    dense = baked_copy(model)
    forms = {"dense": dense}
    if shrunk is not None:
        forms["shrunk"] = shrunk.eval()
    if any(isinstance(m, nn.Linear) and bool((m.weight == 0).any()) for m in dense.modules()):
        forms["csr"] = to_csr_linear(dense)
    g = torch.Generator().manual_seed(seed)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "batch_sizes": list(batch_sizes),
                           "forms": {}, "speedup": {}}
    try:
        for b in batch_sizes:
            x = torch.randn(b, *input_shape, generator=g)
            for name, net in forms.items():
                out["forms"].setdefault(name, {})[str(b)] = measure(net, x, min_time=min_time)
    finally:
        torch.set_num_threads(before)
    for name in forms:
        out["speedup"][name] = {
            str(b): out["forms"]["dense"][str(b)]["median_ms"] / out["forms"][name][str(b)][
                "median_ms"] for b in batch_sizes
        }
    out["speedup_min"] = {
        name: {str(b): out["forms"]["dense"][str(b)]["min_ms"] / out["forms"][name][str(b)][
            "min_ms"] for b in batch_sizes} for name in forms
    }
    ok, reason = semi_structured_support()
    out["semi_structured"] = {"available": ok, "reason": reason}
    return out
