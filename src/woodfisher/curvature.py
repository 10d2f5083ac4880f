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
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from woodfisher.fisher.base import InverseCurvature
from woodfisher.params import Layout, flat_masks

#: Curvature estimates :func:`fisher_inverse` builds (``"diag-fisher"`` is an alias).
CURVATURES = ("woodfisher", "diagonal", "kfac")
_ALIASES = {"diag-fisher": "diagonal", "woodtaylor": "woodfisher"}

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


def _ef_fmul(
    grads: Tensor, damp: float, blocks: Sequence[tuple[int, int]]
) -> Callable[[Tensor], Tensor]:
    m = grads.shape[0]

    def fmul(v: Tensor) -> Tensor:
        G = grads.to(v.dtype)
        out = damp * v
        for start, stop in blocks:
            out[start:stop] += G[:, start:stop].T @ (G[:, start:stop] @ v[start:stop]) / m
        return out

    return fmul


def _diag_fmul(grads: Tensor, damp: float) -> Callable[[Tensor], Tensor]:
    diag = damp + grads.double().pow(2).mean(0)
    return lambda v: diag.to(v.dtype) * v


@dataclass
class FisherInverse:
    """A model's inverse curvature with its layout.

    Attributes:
        inv: The flat operator (``diag``, ``mul``, ``columns``, ``constrained_min``).
        layout: Where each selected weight lives in the flat vector.
        modules: The selected modules, in layout order.
        method: ``"woodfisher"``, ``"diagonal"`` or ``"kfac"``.
        damp: The absolute damp used.
        relative_damp: ``damp / mean(diag(GᵀG/m))`` when damp was set relative, else None.
        present: (d,) bool, weights not pruned when the operator was built.
        mean_grad: (d,) mean sampled gradient ``ḡ`` when asked for, else None.
        fmul: ``v ↦ F v`` for the same ``F`` (flat), where the engine can give it, else None.
        times: Seconds spent in ``"gradients"`` and ``"inverse"``.
        model_id: ``id`` of the model it was built for (to refuse another model's vectors).
    """

    inv: InverseCurvature
    layout: Layout
    modules: dict[str, nn.Module]
    method: str
    damp: float
    relative_damp: float | None
    present: Tensor
    mean_grad: Tensor | None = None
    fmul: Callable[[Tensor], Tensor] | None = None
    times: dict[str, float] = field(default_factory=dict)
    model_id: int | None = None

    # -- conversions -----------------------------------------------------------------------
    def flatten(self, vectors: Mapping[str, Tensor] | Tensor) -> tuple[Tensor, bool]:
        """A dict of parameter-shaped tensors (or a flat (d,)/(d, k) tensor) as (d, k).

        Returns:
            ``(V, was_dict)`` with ``V`` of shape (d, k) in the operator's dtype.

        Raises:
            ValueError: If names or shapes do not match the layout, or a value is not finite.
        """
        if isinstance(vectors, Mapping):
            names = set(self.layout.names)
            unknown = sorted(set(vectors) - names)
            missing = [n for n in self.layout.names if n not in vectors]
            if unknown or missing:
                raise ValueError(
                    f"vectors must have one entry per selected weight {list(self.layout.names)}; "
                    f"unknown: {unknown}, missing: {missing}"
                )
            cols = []
            k = None
            for name, shape in zip(self.layout.names, self.layout.shapes, strict=True):
                t = torch.as_tensor(vectors[name])
                if tuple(t.shape) == tuple(shape):
                    t = t.reshape(-1, 1)
                elif t.ndim == len(shape) + 1 and tuple(t.shape[:-1]) == tuple(shape):
                    t = t.reshape(-1, t.shape[-1])
                else:
                    raise ValueError(
                        f"vector for {name!r} has shape {tuple(t.shape)}; expected "
                        f"{tuple(shape)} (or {tuple(shape)} + (k,) for k vectors)"
                    )
                if k is not None and t.shape[1] != k:
                    raise ValueError("every entry of vectors must hold the same number k")
                k = t.shape[1]
                cols.append(t)
            V, was_dict = torch.cat(cols), True
        else:
            V = torch.as_tensor(vectors)
            if V.ndim not in (1, 2) or V.shape[0] != self.layout.d:
                raise ValueError(
                    f"a flat vector must have shape ({self.layout.d},) or ({self.layout.d}, k), "
                    f"got {tuple(V.shape)}"
                )
            V, was_dict = V.reshape(self.layout.d, -1), False
        if not torch.isfinite(V).all():
            raise ValueError("vectors contain NaN or Inf")
        return V.to(device=self.inv.device, dtype=self.inv.dtype), was_dict

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat (d,) or (d, k) tensor as parameter-shaped tensors.

        Returns:
            Layer name to ``shape`` (or ``shape + (k,)``).
        """
        if flat.ndim == 1:
            return self.layout.split(flat)
        parts = self.layout.split(flat.T)
        return {n: p.movedim(0, -1) for n, p in parts.items()}

    # -- queries ---------------------------------------------------------------------------
    def mul(self, vectors: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor] | Tensor:
        """The inverse-Fisher-vector product ``F⁻¹ v`` (pruned entries left out: 0).

        Args:
            vectors: Parameter-shaped tensors by layer name (each of the weight's shape, or
                with a trailing ``k`` for several vectors), or a flat (d,) / (d, k) tensor.

        Returns:
            The same form as ``vectors``.
        """
        V, was_dict = self.flatten(vectors)
        keep = self.present.to(V.device).unsqueeze(1)
        out = self.inv.mul(V * keep) * keep
        if was_dict:
            if isinstance(vectors, Mapping) and all(
                tuple(torch.as_tensor(vectors[n]).shape) == tuple(s)
                for n, s in zip(self.layout.names, self.layout.shapes, strict=True)
            ):
                return self.layout.split(out[:, 0])
            return self.split(out)
        flat_in = torch.as_tensor(vectors)
        return out.reshape(flat_in.shape)

    def diag(self) -> dict[str, Tensor]:
        """The diagonal of ``F⁻¹`` in parameter shapes (pruned entries 0).

        Returns:
            Layer name to a tensor of the weight's shape.
        """
        d = self.inv.diag() * self.present.to(self.inv.device)
        return self.layout.split(d)


def fisher_inverse(
    model: nn.Module,
    data: Iterable,
    method: str = "woodfisher",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    params: Sequence[str] | dict[str, nn.Module] | None = None,
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

    Args:
        model: The network (run in eval mode; its modes are restored).
        data: Batches of ``(inputs, targets)``; gradients come from the first
            ``num_grads · samples_per_grad`` samples (K-FAC: ``num_grads`` batches).
        method: ``"woodfisher"`` (block-wise empirical Fisher via Woodbury), ``"diagonal"``
            (alias ``"diag-fisher"``) or ``"kfac"``.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; default cross-entropy.
        params: Which weights: None for every Linear/Conv weight, module names, or a dict of
            modules (as from :func:`woodfisher.params.select_modules`).
        num_grads: Gradients ``m`` (K-FAC: batches); default 500 (K-FAC: 50).
        samples_per_grad: Samples averaged into one gradient.
        block_size: Block size of the WoodFisher estimate; None for the full (d, d) matrix.
        damp: Absolute damp; None for ``relative_damp`` × the Fisher's mean diagonal (K-FAC:
            an absolute 1e-3).
        relative_damp: Damp relative to the mean diagonal of ``GᵀG/m``; default 1e-2.
        mean_grad: Also keep the mean gradient ``ḡ`` (for WoodTaylor and Newton steps).
        seed: Seed for any randomness inside the model during the gradient pass.
        progress: Show progress bars.

    Returns:
        The operator.

    Raises:
        ValueError: On an unknown method, both ``damp`` and ``relative_damp``, a relative damp
            for K-FAC, or bad data (see :func:`woodfisher.gradients.sample_gradients`).
    """
    from woodfisher.gradients import gradient_layout, sample_gradients

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
    modules, layout = gradient_layout(model, params)
    present = flat_masks(modules)
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
            inv, layout, modules, kind, absolute, None, present, times=times, model_id=id(model)
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
        fmul = _diag_fmul(grads, absolute)
    else:
        from woodfisher.fisher import EmpiricalFisherInverse

        inv = EmpiricalFisherInverse(grads, block_size=block_size, damp=absolute, layout=layout)
        fmul = _ef_fmul(grads, absolute, inv.blocks)
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
        fmul=fmul,
        times=times,
        model_id=id(model),
    )


def ihvp(
    model: nn.Module,
    data: Iterable,
    vectors: Mapping[str, Tensor] | Tensor,
    method: str = "woodfisher",
    **options: object,
) -> dict[str, Tensor] | Tensor:
    """Inverse-Fisher-vector products ``F⁻¹ v`` for ``model``, in one call.

    Builds :func:`fisher_inverse` ``(model, data, method, **options)`` and applies it. To apply
    one estimate to many vectors, build the operator once and call its ``mul``.

    Args:
        model: The network.
        data: Batches of ``(inputs, targets)``.
        vectors: Parameter-shaped tensors by layer name (see :meth:`FisherInverse.mul`), or a
            flat (d,) / (d, k) tensor in the layout's order.
        method: The curvature estimate.
        **options: Passed to :func:`fisher_inverse`.

    Returns:
        ``F⁻¹ v`` in the form of ``vectors``.
    """
    return fisher_inverse(model, data, method, **options).mul(vectors)
