"""A model's inverse curvature as one operator that speaks in the model's terms.

:class:`FisherInverse` wraps a flat :class:`~woodfisher.fisher.InverseCurvature` with the layout
of the model's selected weights: vectors go in and come out as dicts of parameter-shaped tensors
(by module or parameter name) or as flat tensors, weights pruned with masks are left out, and
an operator refuses a model other than its own. Build one with
:func:`woodfisher.fisher_inverse`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from woodfisher.fisher.base import InverseCurvature
from woodfisher.params import Layout, weight_param


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
        from woodfisher.gradients import mean_gradient

        self.check_model(model)
        flat = mean_gradient(model, data, loss_fn or self.loss_fn, params=self.modules)
        return self.layout.split(flat)
