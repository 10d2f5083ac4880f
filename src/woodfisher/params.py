"""Which parameters take part, and how they map onto one flat vector.

Curvature and pruning both see the selected weights as one vector of length ``d``; a
:class:`Layout` records where each layer's weight lives in it, so that blocks never cross a
layer and results can be split back into tensors. Weights pruned with
``torch.nn.utils.prune`` are read through their ``weight_orig``/``weight_mask`` pair.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def select_modules(
    model: nn.Module,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
) -> dict[str, nn.Module]:
    """The modules whose ``weight`` is pruned, in registration order.

    Args:
        model: Any module.
        layers: ``fnmatch`` patterns on module names (``"fc*"``, ``"layer1.*"``); by default
            every Linear and Conv module.
        skip: Patterns of module names to leave out.

    Returns:
        Module name to module, in the order of ``model.named_modules()``.

    Raises:
        ValueError: If nothing is selected or a pattern in ``layers`` matches no module.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> list(select_modules(net))
        ['0', '2']
        >>> list(select_modules(net, skip="2"))
        ['0']
    """
    layers = [layers] if isinstance(layers, str) else layers
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    candidates = {
        name: mod for name, mod in model.named_modules() if isinstance(mod, PRUNABLE_TYPES)
    }
    if layers is not None:
        for pattern in layers:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
                raise ValueError(
                    f"layer pattern {pattern!r} matches no Linear/Conv module; "
                    f"available: {sorted(candidates)}"
                )
        candidates = {
            n: m for n, m in candidates.items() if any(fnmatch.fnmatchcase(n, p) for p in layers)
        }
    chosen = {
        n: m for n, m in candidates.items() if not any(fnmatch.fnmatchcase(n, p) for p in skip)
    }
    if not chosen:
        raise ValueError(
            "no prunable parameters: the model has no Linear/Conv module left after "
            f"layers={layers!r}, skip={skip!r}"
        )
    return chosen


def weight_param(module: nn.Module) -> nn.Parameter:
    """The parameter that holds a module's weight: ``weight_orig`` when pruned, else ``weight``.

    Updates must be written here; a write to ``module.weight`` of a pruned module is lost at the
    next forward pass.

    Returns:
        The trainable weight parameter.
    """
    return module.weight_orig if hasattr(module, "weight_orig") else module.weight


def weight_mask(module: nn.Module) -> Tensor | None:
    """The module's current pruning mask, or None if it was never pruned.

    Returns:
        A float tensor of the weight's shape (1 = kept) or None.
    """
    return getattr(module, "weight_mask", None)


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the forward pass uses (``weight_orig * weight_mask`` when pruned).

    Returns:
        A detached tensor of the weight's shape.
    """
    mask = weight_mask(module)
    w = weight_param(module).detach()
    return w * mask if mask is not None else w


@dataclass(frozen=True)
class Layout:
    """Where each selected weight lives inside the flat vector of length ``d``.

    ``names`` are module names (``"fc1"``); the parameter is that module's weight.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, modules: dict[str, nn.Module]) -> Layout:
        """Layout of the weights of ``modules`` (as returned by :func:`select_modules`).

        Returns:
            The layout, in the order of ``modules``.
        """
        return cls(tuple(modules), tuple(weight_param(m).shape for m in modules.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of each layer's weight."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start index of each layer in the flat vector."""
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    @property
    def d(self) -> int:
        """Total length of the flat vector."""
        return sum(self.sizes)

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Cut a flat (d,) vector, or (..., d) batch of them, into per-layer tensors.

        Returns:
            Layer name to a view of shape ``(..., *layer_shape)``.

        Raises:
            ValueError: If the last dimension is not ``d``.
        """
        if flat.shape[-1] != self.d:
            raise ValueError(
                f"expected a last dimension of {self.d}, got shape {tuple(flat.shape)}"
            )
        lead = flat.shape[:-1]
        parts = torch.split(flat, list(self.sizes), dim=-1)
        return {
            n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes, strict=False)
        }

    def flatten(self, tensors: dict[str, Tensor] | Iterable[Tensor]) -> Tensor:
        """Concatenate per-layer tensors (in layout order) into one flat vector.

        Returns:
            A (d,) tensor.
        """
        items = [tensors[n] for n in self.names] if isinstance(tensors, dict) else list(tensors)
        return torch.cat([t.reshape(-1) for t in items])


def flat_weights(modules: dict[str, nn.Module]) -> Tensor:
    """The effective weights of ``modules`` as one detached flat vector.

    Returns:
        A (d,) tensor in the order of ``modules``.
    """
    return torch.cat([effective_weight(m).reshape(-1) for m in modules.values()])


def flat_masks(modules: dict[str, nn.Module]) -> Tensor:
    """The pruning masks of ``modules`` as one flat bool vector (True = still present).

    Returns:
        A (d,) bool tensor; all True for modules never pruned.
    """
    parts = []
    for m in modules.values():
        mask = weight_mask(m)
        w = weight_param(m)
        parts.append(
            (mask != 0).reshape(-1)
            if mask is not None
            else torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        )
    return torch.cat(parts)
