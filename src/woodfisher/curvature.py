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


def mean_gradient(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    params: Sequence[str] | dict[str, nn.Module] | None = None,
    max_samples: int | None = None,
) -> Tensor:
    """Gradient of the mean loss over ``data`` w.r.t. the selected weights, as one flat vector.

    One backward pass per batch (not per sample), so it is cheap for many samples: the
    first-order term of WoodTaylor and Newton or influence directions ``F⁻¹∇L`` use it.
    The model runs in eval mode (modes are restored); pruned entries are exactly 0.

    Args:
        model: The network.
        data: Batches of ``(inputs, targets)`` (or a Dataset, or an ``(X, Y)`` pair).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; default cross-entropy.
        params: Which weights, as for :func:`fisher_inverse`.
        max_samples: Use at most this many samples (the first ones); None for all.

    Returns:
        A (d,) tensor in the layout of :func:`woodfisher.gradients.gradient_layout`.

    Raises:
        ValueError: If ``data`` holds no samples or the gradient is not finite.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2, bias=False)
        >>> mean_gradient(net, (torch.randn(5, 2), torch.tensor([0, 1, 0, 1, 1]))).shape
        torch.Size([4])
    """
    from woodfisher.batch import batch_len, call_model, default_loss, take, to_device
    from woodfisher.gradients import _EvalMode, gradient_layout, iter_batches
    from woodfisher.params import weight_param

    loss_fn = loss_fn or default_loss
    modules, _ = gradient_layout(model, params)
    weights = [weight_param(m) for m in modules.values()]
    dtype, device = weights[0].dtype, weights[0].device
    total = [torch.zeros_like(w) for w in weights]
    count = 0
    with _EvalMode(model):
        for x, y in iter_batches(data):
            if max_samples is not None and count >= max_samples:
                break
            if max_samples is not None:
                x, y = take(x, slice(0, max_samples - count)), y[: max_samples - count]
            x = to_device(x, device, dtype)
            n = batch_len(x)
            loss = loss_fn(call_model(model, x), y.to(device)) * n
            for t, g in zip(total, torch.autograd.grad(loss, weights, allow_unused=True),
                            strict=True):
                if g is not None:
                    t += g
            count += n
    if count == 0:
        raise ValueError("data holds no samples; pass at least one (inputs, targets) batch")
    flat = torch.cat([t.reshape(-1) for t in total]) / count
    # Gradients w.r.t. weight_orig carry the mask already; zero anyway for models that bypass it.
    flat = flat * flat_masks(modules).to(flat.device)
    if not torch.isfinite(flat).all():
        raise ValueError("the mean gradient is not finite (NaN or Inf); check the loss and data")
    return flat


@dataclass
class FisherInverse:
    """A model's inverse curvature with its layout.

    Vectors go in and come out as dicts of parameter-shaped tensors, keyed by module name
    (``"fc1"``) or by the weight's parameter name (``"fc1.weight"``, ``"fc1.weight_orig"``), or
    as flat (d,) / (d, k) tensors in the layout's order. Weights pruned when the operator was
    built are left out: their entries of a vector are ignored and come back as 0.

    Attributes:
        inv: The flat operator (``diag``, ``mul``, ``fmul``, ``columns``, ``constrained_min``).
        layout: Where each selected weight lives in the flat vector.
        modules: The selected modules, in layout order.
        method: ``"woodfisher"``, ``"diagonal"`` or ``"kfac"``.
        damp: The absolute damp used.
        relative_damp: ``damp / mean(diag(GᵀG/m))`` when damp was set relative, else None.
        present: (d,) bool, weights not pruned when the operator was built.
        mean_grad: (d,) mean sampled gradient ``ḡ`` when asked for, else None.
        times: Seconds spent in ``"gradients"`` and ``"inverse"``.
        param_names: Parameter name of each selected weight in the model, in layout order.
        loss_fn: The loss the operator was built with (None: cross-entropy).
    """

    inv: InverseCurvature
    layout: Layout
    modules: dict[str, nn.Module]
    method: str
    damp: float
    relative_damp: float | None
    present: Tensor
    mean_grad: Tensor | None = None
    times: dict[str, float] = field(default_factory=dict)
    param_names: tuple[str, ...] = ()
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None

    # -- conversions -----------------------------------------------------------------------
    def _key_map(self) -> dict[str, str]:
        keys = {n: n for n in self.layout.names}
        for name, pname in zip(self.layout.names, self.param_names, strict=False):
            keys[pname] = name
            keys[pname.removesuffix("_orig")] = name
        return keys

    def flatten(self, vectors: Mapping[str, Tensor] | Tensor) -> tuple[Tensor, bool]:
        """A dict of parameter-shaped tensors (or a flat (d,)/(d, k) tensor) as (d, k).

        Returns:
            ``(V, was_dict)`` with ``V`` of shape (d, k) in the operator's dtype and device.

        Raises:
            ValueError: If names or shapes do not match the layout, or a value is not finite.
        """
        if isinstance(vectors, Mapping):
            V = self._flatten_dict(vectors)
            was_dict = True
        elif isinstance(vectors, Tensor):
            V = vectors
            if V.ndim not in (1, 2) or V.shape[0] != self.layout.d:
                raise ValueError(
                    f"a flat vector must have shape ({self.layout.d},) or ({self.layout.d}, k) "
                    f"for the {len(self.layout.names)} selected weights, got {tuple(V.shape)}"
                )
            V, was_dict = V.reshape(self.layout.d, -1), False
        else:
            raise ValueError(
                "vectors must be a dict of parameter-shaped tensors or a flat tensor, got "
                f"{type(vectors).__name__}"
            )
        if not V.is_floating_point():
            raise ValueError(f"vectors must be floating point, got {V.dtype}")
        if not torch.isfinite(V).all():
            bad = (~torch.isfinite(V)).any(dim=1).nonzero()[0].item()
            where = self._name_at(bad)
            raise ValueError(f"vectors contain NaN or Inf (first in {where}); pass finite values")
        return V.to(device=self.inv.device, dtype=self.inv.dtype), was_dict

    def _name_at(self, index: int) -> str:
        for name, off, size in zip(self.layout.names, self.layout.offsets, self.layout.sizes,
                                   strict=True):
            if off <= index < off + size:
                return f"{name!r}, entry {index - off}"
        return f"entry {index}"  # pragma: no cover

    def _flatten_dict(self, vectors: Mapping[str, Tensor]) -> Tensor:
        keys = self._key_map()
        unknown = sorted(k for k in vectors if k not in keys)
        given: dict[str, str] = {}
        for key in vectors:
            if key in keys:
                if keys[key] in given:
                    raise ValueError(
                        f"vectors name weight {keys[key]!r} twice ({given[keys[key]]!r} and "
                        f"{key!r}); give each selected weight once"
                    )
                given[keys[key]] = key
        missing = [n for n in self.layout.names if n not in given]
        if unknown or missing:
            raise ValueError(
                f"vectors must have one entry per selected weight {list(self.layout.names)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        cols, k = [], None
        for name, shape in zip(self.layout.names, self.layout.shapes, strict=True):
            t = torch.as_tensor(vectors[given[name]])
            if tuple(t.shape) == tuple(shape):
                t = t.reshape(-1, 1)
            elif t.ndim == len(shape) + 1 and tuple(t.shape[:-1]) == tuple(shape):
                t = t.reshape(-1, t.shape[-1])
            else:
                raise ValueError(
                    f"vector for {given[name]!r} has shape {tuple(t.shape)}; expected "
                    f"{tuple(shape)} (or {tuple(shape)} + (k,) for k vectors)"
                )
            if k is not None and t.shape[1] != k:
                raise ValueError(
                    f"every entry of vectors must hold the same number of vectors: "
                    f"{given[name]!r} has {t.shape[1]}, the ones before {k}"
                )
            k = t.shape[1]
            cols.append(t.to(self.inv.device))
        return torch.cat(cols)

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat (d,) or (d, k) tensor as parameter-shaped tensors.

        Returns:
            Layer name to ``shape`` (or ``shape + (k,)``).
        """
        if flat.ndim == 1:
            return self.layout.split(flat)
        parts = self.layout.split(flat.T)
        return {n: p.movedim(0, -1) for n, p in parts.items()}

    def _like(self, out: Tensor, vectors: Mapping[str, Tensor] | Tensor):
        """``out`` (d, k) in the form of ``vectors`` (same keys, shapes)."""
        if not isinstance(vectors, Mapping):
            return out.reshape(vectors.shape)
        keys = self._key_map()
        single = all(
            tuple(torch.as_tensor(vectors[key]).shape) == tuple(
                self.layout.shapes[self.layout.names.index(keys[key])])
            for key in vectors
        )
        parts = self.layout.split(out[:, 0]) if single else self.split(out)
        return {key: parts[keys[key]] for key in vectors}

    # -- queries ---------------------------------------------------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor], vectors):
        V, _ = self.flatten(vectors)
        keep = self.present.to(V.device).unsqueeze(1)
        return self._like(fn(V * keep) * keep, vectors)

    def mul(self, vectors: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor] | Tensor:
        """The inverse-Fisher-vector product ``F⁻¹ v`` (pruned entries left out: 0).

        Args:
            vectors: Parameter-shaped tensors by layer or parameter name (each of the weight's
                shape, or with a trailing ``k`` for several vectors), or a flat (d,) / (d, k)
                tensor.

        Returns:
            The same form as ``vectors``.

        Raises:
            ValueError: If names or shapes do not match the selected weights, or a value is
                NaN or Inf.
        """
        return self._apply(self.inv.mul, vectors)

    def fmul(self, vectors: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor] | Tensor:
        """The Fisher-vector product ``F v`` with the same (damped, block-diagonal) ``F``.

        Args:
            vectors: As for :meth:`mul`.

        Returns:
            The same form as ``vectors``.

        Raises:
            ValueError: As :meth:`mul`.
        """
        return self._apply(self.inv.fmul, vectors)

    def diag(self) -> dict[str, Tensor]:
        """The diagonal of ``F⁻¹`` in parameter shapes (pruned entries 0).

        Returns:
            Layer name to a tensor of the weight's shape.
        """
        d = self.inv.diag() * self.present.to(self.inv.device)
        return self.layout.split(d)

    # -- the model -------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one the operator was built for.

        The selected modules must be the very objects inside ``model`` (a copy is another
        model: its weights may differ) with the weight shapes they had.

        Raises:
            ValueError: If ``model`` is not that model.
        """
        own = {id(m) for m in model.modules()}
        for name, mod in self.modules.items():
            # a selection by parameter holds Targets: the module is what must be in the model
            if id(getattr(mod, "module", mod)) not in own:
                raise ValueError(
                    f"this {self.method} operator was built for another model (its layer "
                    f"{name!r} is not part of the model given); build one with "
                    "fisher_inverse(model, data)"
                )
        from woodfisher.params import weight_param

        shapes = tuple(tuple(weight_param(m).shape) for m in self.modules.values())
        if shapes != tuple(tuple(s) for s in self.layout.shapes):
            raise ValueError(
                "the model's selected weights changed shape since the operator was built; "
                "build a new one with fisher_inverse(model, data)"
            )

    def gradient(
        self,
        model: nn.Module,
        data: Iterable,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """``∇L`` of the mean loss over ``data`` for the selected weights, ready for :meth:`mul`.

        ``op.mul(op.gradient(model, data))`` is the (damped, approximate) Newton direction;
        with a test sample as ``data`` it is the influence-function vector.

        Args:
            model: The model the operator was built for.
            data: Batches of ``(inputs, targets)``.
            loss_fn: Mean loss; default the operator's own.

        Returns:
            Layer name to a tensor of the weight's shape (pruned entries 0).

        Raises:
            ValueError: If ``model`` is another model, or as :func:`mean_gradient`.
        """
        self.check_model(model)
        flat = mean_gradient(model, data, loss_fn or self.loss_fn, params=self.modules)
        return self.layout.split(flat)


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
