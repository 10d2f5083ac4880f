"""The inverse Fisher of a model as one operator: build it from data, ask it for IHVPs.

:func:`fisher_inverse` samples per-sample gradients of the selected weights and builds the
inverse curvature the ``method`` names (the block-wise WoodFisher estimate, the diagonal Fisher
or K-FAC), with the damp convention of :func:`woodfisher.prune` (relative to the mean diagonal of
the empirical Fisher unless an absolute ``damp`` is given). The result speaks in the model's
terms: vectors are dicts of parameter-shaped tensors (or flat vectors in the layout's order),
and weights pruned with masks are left out (their entries of ``F⁻¹v`` are 0). Pruning, the
compressors and :func:`ihvp` all build their curvature here.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    >>> op = fisher_inverse(net, data, num_grads=32, block_size=16)
    >>> v = {name: torch.ones(shape) for name, shape in zip(op.layout.names, op.layout.shapes)}
    >>> {name: tuple(t.shape) for name, t in op.mul(v).items()}
    {'0': (8, 4), '2': (3, 8)}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from woodfisher.gradients import mean_gradient
from woodfisher.model_inverse import FisherInverse
from woodfisher.params import flat_masks

__all__ = ["CURVATURES", "CURVATURE_DEFAULTS", "FisherInverse", "fisher_inverse", "ihvp",
           "mean_gradient", "relative_damp_scale"]

#: Curvature estimates :func:`fisher_inverse` builds (``"diag-fisher"`` is an alias).
CURVATURES = ("woodfisher", "diagonal", "kfac")
_ALIASES = {"diag-fisher": "diagonal", "woodtaylor": "woodfisher", "woodtaylor-paper": "woodfisher"}

#: Defaults shared with :data:`woodfisher.pruning.methods.DEFAULTS` (which reads them from here).
CURVATURE_DEFAULTS: dict[str, object] = {
    "num_grads": 500,
    "samples_per_grad": 1,
    "block_size": 500,
    "relative_damp": 1e-2,
    "kfac_num_batches": 50,
    "kfac_damp": 1e-3,
}


def relative_damp_scale(grads: Tensor) -> float:
    """Natural damp scale: the mean diagonal of ``GᵀG/m`` (the undamped empirical Fisher).

    Args:
        grads: (m, d) sampled gradients.

    Returns:
        A positive float (1.0 when every gradient is zero, so damp stays usable).
    """
    scale = float(grads.double().pow(2).sum(0).mean() / max(grads.shape[0], 1))
    return scale if scale > 0 and torch.isfinite(torch.tensor(scale)) else 1.0


def fisher_inverse(
    model: nn.Module,
    data: Iterable,
    method: str = "woodfisher",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    params: Sequence[str] | str | dict | None = None,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    num_grads: int | None = None,
    samples_per_grad: int = CURVATURE_DEFAULTS["samples_per_grad"],
    block_size: int | None = CURVATURE_DEFAULTS["block_size"],
    damp: float | None = None,
    relative_damp: float | None = None,
    mean_grad: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> FisherInverse:
    """Build the inverse curvature of ``model``'s selected weights from ``data``.

    The weights are those :func:`woodfisher.prune` would prune with the same ``layers`` and
    ``skip`` (by default every Linear/Conv weight of any ``nn.Module``); weights already
    pruned with masks are left out.

    Args:
        model: The network (run in eval mode; its modes are restored).
        data: Batches of ``(inputs, targets)``; gradients come from the first
            ``num_grads · samples_per_grad`` samples (K-FAC: ``num_grads`` batches).
        method: ``"woodfisher"`` (block-wise empirical Fisher via Woodbury), ``"diagonal"``
            (alias ``"diag-fisher"``) or ``"kfac"``.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; default cross-entropy.
        params: Which weights: None for every Linear/Conv weight, module names, or a dict of
            modules (as from :func:`woodfisher.params.select_modules`).
        layers: ``fnmatch`` patterns of modules, as for :func:`woodfisher.prune` (not with
            ``params``).
        skip: Patterns of modules to leave out, as for :func:`woodfisher.prune`.
        num_grads: Gradients ``m`` (K-FAC: batches); default 500 (K-FAC: 50).
        samples_per_grad: Samples averaged into one gradient.
        block_size: Block size of the WoodFisher estimate; None for the full (d, d) matrix.
        damp: Absolute damp; None for ``relative_damp`` × the Fisher's mean diagonal (K-FAC:
            an absolute 1e-3).
        relative_damp: Damp relative to the mean diagonal of ``GᵀG/m``; default 1e-2.
        mean_grad: Also keep the mean sampled gradient ``ḡ`` (for WoodTaylor).
        seed: Seed for any randomness inside the model during the gradient pass.
        progress: Show progress bars.

    Returns:
        The operator.

    Raises:
        ValueError: On an unknown method, both ``damp`` and ``relative_damp``, a relative damp
            for K-FAC, ``params`` with ``layers``/``skip``, or bad data (see
            :func:`woodfisher.gradients.sample_gradients`).
    """
    from woodfisher.gradients import (
        _param_names,
        gradient_layout,
        param_patterns,
        sample_gradients,
    )
    from woodfisher.params import select_modules

    kind = _ALIASES.get(method, method)
    if kind not in CURVATURES:
        raise ValueError(
            f"unknown curvature method {method!r}; choose from "
            f"{sorted(CURVATURES + tuple(_ALIASES))}"
        )
    if damp is not None and relative_damp is not None:
        raise ValueError(
            f"give damp or relative_damp, not both (got damp={damp!r}, "
            f"relative_damp={relative_damp!r})"
        )
    if layers is not None or skip is not None:
        if isinstance(params, dict):
            raise ValueError(
                "give a dict of params or layers/skip, not both (the dict names the weights "
                "exactly; layers and skip select them by pattern, as prune does)"
            )
        patterns = None if params is None else param_patterns(model, params)
        params = select_modules(model, layers, skip, patterns)
    modules, layout = gradient_layout(model, params)
    present = flat_masks(modules)
    common = {"param_names": tuple(_param_names(model, modules)), "loss_fn": loss_fn}
    times: dict[str, float] = {}
    if kind == "kfac":
        if relative_damp is not None:
            raise ValueError(
                "relative_damp is relative to the empirical Fisher's diagonal, which K-FAC does "
                "not build; give kfac an absolute damp"
            )
        from woodfisher.fisher import kfac_inverse

        absolute = CURVATURE_DEFAULTS["kfac_damp"] if damp is None else float(damp)
        t0 = time.perf_counter()
        inv = kfac_inverse(
            model,
            data,
            loss_fn=loss_fn,
            num_batches=num_grads or CURVATURE_DEFAULTS["kfac_num_batches"],
            params=modules,
            damp=absolute,
        )
        times["inverse"] = time.perf_counter() - t0
        return FisherInverse(
            inv, layout, modules, kind, absolute, None, present, times=times, **common
        )

    t0 = time.perf_counter()
    grads = sample_gradients(
        model,
        data,
        loss_fn=loss_fn,
        num_grads=num_grads or CURVATURE_DEFAULTS["num_grads"],
        samples_per_grad=samples_per_grad,
        params=modules,
        seed=seed,
        progress=progress,
    )
    times["gradients"] = time.perf_counter() - t0
    rel = None
    if damp is None:
        rel = CURVATURE_DEFAULTS["relative_damp"] if relative_damp is None else relative_damp
        absolute = rel * relative_damp_scale(grads)
    else:
        absolute = float(damp)
    t0 = time.perf_counter()
    if kind == "diagonal":
        from woodfisher.fisher import DiagonalFisherInverse

        inv = DiagonalFisherInverse(grads, absolute, layout=layout)
    else:
        from woodfisher.fisher import EmpiricalFisherInverse

        inv = EmpiricalFisherInverse(grads, block_size=block_size, damp=absolute, layout=layout)
    times["inverse"] = time.perf_counter() - t0
    return FisherInverse(
        inv,
        layout,
        modules,
        kind,
        absolute,
        rel,
        present,
        mean_grad=grads.mean(0) if mean_grad else None,
        times=times,
        **common,
    )


def ihvp(
    model: nn.Module,
    data: Iterable | None,
    vectors: Mapping[str, Tensor] | Tensor,
    method: str = "woodfisher",
    *,
    inverse: FisherInverse | None = None,
    **options: object,
) -> dict[str, Tensor] | Tensor:
    """Inverse-Fisher-vector products ``F⁻¹ v`` for ``model``, in one call.

    Builds :func:`fisher_inverse` ``(model, data, method, **options)`` and applies it, or
    applies ``inverse`` when given (after checking that it was built for ``model``). To apply
    one estimate to many vectors, pass them together (a trailing ``k``) or reuse the operator.

    Args:
        model: The network.
        data: Batches of ``(inputs, targets)`` to build the estimate from (unused, may be
            None, with ``inverse``).
        vectors: Parameter-shaped tensors by layer or parameter name (see
            :meth:`FisherInverse.mul`), or a flat (d,) / (d, k) tensor in the layout's order.
        method: The curvature estimate.
        inverse: An operator from :func:`fisher_inverse` for this model, to reuse.
        **options: Keyword options of :func:`fisher_inverse`.

    Returns:
        ``F⁻¹ v`` in the form of ``vectors``.

    Raises:
        ValueError: On an unknown option, options together with ``inverse``, an operator built
            for another model, or bad vectors (see :meth:`FisherInverse.mul`).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> out = ihvp(net, data, {"0": torch.ones(2, 3)}, num_grads=8, block_size=None)
        >>> out["0"].shape
        torch.Size([2, 3])
    """
    import inspect

    allowed = [
        p.name for p in inspect.signature(fisher_inverse).parameters.values()
        if p.kind is p.KEYWORD_ONLY or p.name == "loss_fn"
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown ihvp options {unknown}; choose from {sorted(allowed)}")
    if inverse is not None:
        if options:
            raise ValueError(
                f"options {sorted(options)} configure a new operator; with inverse= give none"
            )
        inverse.check_model(model)
        return inverse.mul(vectors)
    if data is None:
        raise ValueError("data is None: pass batches to build the estimate from, or inverse=")
    return fisher_inverse(model, data, method, **options).mul(vectors)
