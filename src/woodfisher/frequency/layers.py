"""``DCTConv2d``: a Conv2d whose learnable ``weight`` holds the DCT coefficients of its kernels.

The parameter ``weight`` of a :class:`DCTConv2d` has the kernel's shape ``(out, in/groups, k,
k)``, but each k×k slice is the orthonormal 2-D DCT ``C = A W Aᵀ`` of the spatial kernel; the
forward pass convolves with ``W = Aᵀ C A``. Because the coefficients *are* the module's
``weight``, everything in woodfisher that works on a Conv2d's weight works on coefficients
unchanged: ``torch.nn.utils.prune`` masks (``weight_orig``/``weight_mask``), per-sample gradients
and the inverse Fisher (:func:`woodfisher.fisher_inverse`: the Fisher in the DCT basis is
``D F Dᵀ`` with ``D = I ⊗ A ⊗ A``), ``woodfisher.prune``, ``count_flops`` (its ``nonzero_macs``
are the frequency-domain multiplies) and checkpoints (the layer is registered with
:func:`woodfisher.models.register_module_type`, so a saved model records it and
:func:`woodfisher.load_checkpoint` rebuilds it). The one thing to keep in mind: a
DCTConv2d's ``weight`` is not a spatial kernel — use :meth:`DCTConv2d.spatial_weight` or
:meth:`DCTConv2d.to_conv2d` for that.

Example:
    >>> conv = nn.Conv2d(2, 4, 3, padding=1)
    >>> dconv = DCTConv2d.from_conv2d(conv)
    >>> x = torch.randn(1, 2, 5, 5)
    >>> torch.allclose(dconv(x), conv(x), atol=1e-5)
    True
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    >>> to_frequency(net)
    {'converted': ['0'], 'skipped': {'2': '1×1 kernel: a single coefficient, nothing to gain'}}
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from woodfisher.frequency.dct import dct2, idct2
from woodfisher.models import MODULE_TYPES, register_module_type
from woodfisher.params import effective_weight

__all__ = [
    "DCTConv2d",
    "eligible_convs",
    "frequency_layers",
    "ineligible_reason",
    "to_frequency",
    "to_spatial",
]


class DCTConv2d(nn.Conv2d):
    """A 2-D convolution parametrised by the orthonormal DCT coefficients of its kernels.

    Constructed like ``nn.Conv2d`` (square kernels only); usually made from a trained conv with
    :meth:`from_conv2d`. ``weight`` holds coefficients; with no coefficient pruned the layer
    computes exactly what the Conv2d it came from computes (up to float rounding).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.kernel_size[0] != self.kernel_size[1]:
            raise ValueError(
                f"DCTConv2d needs a square kernel, got {tuple(self.kernel_size)}; leave this "
                "conv spatial"
            )

    def reset_parameters(self) -> None:
        """Initialise as ``nn.Conv2d`` does, then store the DCT of that spatial kernel."""
        super().reset_parameters()
        if self.kernel_size[0] == self.kernel_size[1]:  # else __init__ refuses the layer
            with torch.no_grad():
                self.weight.copy_(dct2(self.weight))

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> DCTConv2d:
        """The DCTConv2d computing what ``conv`` computes (its effective weight, masks applied).

        A spatial pruning mask on ``conv`` is baked into the kernel before the transform (the
        DCT of a sparse kernel is dense in general), so the new layer starts unpruned.

        Args:
            conv: A Conv2d with a square kernel larger than 1×1.

        Returns:
            A new module on ``conv``'s device and dtype; ``conv`` is left as it is.

        Raises:
            ValueError: If ``conv`` is not eligible (see :func:`ineligible_reason`).
        """
        reason = ineligible_reason(conv)
        if reason is not None:
            raise ValueError(f"cannot convert {type(conv).__name__} to DCTConv2d: {reason}")
        w = effective_weight(conv)
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(dct2(w))
            if conv.bias is not None:
                new.bias.copy_(conv.bias.detach())
        new.train(conv.training)
        return new

    @property
    def coefficients(self) -> Tensor:
        """The masked DCT coefficients the forward pass uses, shape of the kernel (detached)."""
        return effective_weight(self)

    def spatial_weight(self) -> Tensor:
        """The spatial kernel ``Aᵀ C A`` of the (masked) coefficients (detached).

        Returns:
            A tensor of the kernel's shape.
        """
        return idct2(effective_weight(self))

    def to_conv2d(self) -> nn.Conv2d:
        """An ordinary ``nn.Conv2d`` with the spatial kernel of the masked coefficients.

        Returns:
            A new unpruned Conv2d computing what this layer computes.
        """
        w = self.spatial_weight()
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        conv.train(self.training)
        return conv

    def patches_to_weight_basis(self, cols: Tensor) -> Tensor:
        """Unfolded input patches ``(n, C·k·k, L)`` in the coefficients' basis (for K-FAC).

        ``⟨patch, W⟩ = ⟨A patch Aᵀ, C⟩``, so the activations that multiply the coefficients
        are the DCTs of the patches.

        Args:
            cols: ``torch.nn.functional.unfold`` of the layer's input.

        Returns:
            The same shape, each k×k patch slice transformed.
        """
        n, features, locations = cols.shape
        k = self.kernel_size[0]
        patches = cols.reshape(n, features // (k * k), k, k, locations).movedim(-1, 2)
        return dct2(patches).movedim(2, -1).reshape(n, features, locations)

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(input, idct2(self.weight), self.bias)


# Checkpoints describe a DCTConv2d like a Conv2d (same arguments) and rebuild it on load.
register_module_type(DCTConv2d, MODULE_TYPES["Conv2d"][1])


def ineligible_reason(module: nn.Module) -> str | None:
    """Why a module cannot become a DCTConv2d, or None if it can.

    Args:
        module: Any module.

    Returns:
        None for a Conv2d with a square kernel larger than 1×1 that is not a DCTConv2d yet;
        otherwise a short reason.
    """
    if isinstance(module, DCTConv2d):
        return "already a DCTConv2d"
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a 2-D convolution"
    kh, kw = module.kernel_size
    if kh != kw:
        return f"non-square {kh}×{kw} kernel: left spatial"
    if kh == 1:
        return "1×1 kernel: a single coefficient, nothing to gain"
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    patterns = [patterns] if isinstance(patterns, str) else patterns
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def eligible_convs(
    model: nn.Module,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The Conv2d layers FDNP works on (DCTConv2d layers included), and the others with why.

    Args:
        model: The network.
        layers: ``fnmatch`` patterns of conv names to consider (default: every Conv2d).
        skip: Patterns of conv names to leave out.

    Returns:
        ``(names, skipped)``: eligible names in registration order, and ``{name: reason}`` for
        every considered Conv2d left out (non-square or 1×1 kernels, or excluded by ``skip``).

    Raises:
        ValueError: If a pattern in ``layers`` matches no Conv2d.
    """
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if layers is not None:
        for p in [layers] if isinstance(layers, str) else layers:
            if not any(fnmatch.fnmatchcase(n, p) for n in convs):
                raise ValueError(
                    f"layer pattern {p!r} matches no Conv2d; available: {sorted(convs)}"
                )
    names, skipped = [], {}
    for name, conv in convs.items():
        if layers is not None and not _matches(name, layers):
            continue
        reason = "excluded by skip" if _matches(name, skip) else (
            None if isinstance(conv, DCTConv2d) else ineligible_reason(conv))
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    return names, skipped


def to_frequency(
    model: nn.Module,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """Replace every eligible Conv2d of ``model`` by its :class:`DCTConv2d` (in place).

    A conv's spatial pruning mask, if any, is baked into the kernel first.

    Args:
        model: The network.
        layers: ``fnmatch`` patterns of conv names to convert (default: every Conv2d).
        skip: Patterns of conv names to leave spatial.

    Returns:
        ``{"converted": [names], "skipped": {name: reason}}``; ``skipped`` lists the Conv2d
        layers left spatial (non-square or 1×1 kernels, or excluded by ``skip``).

    Raises:
        ValueError: If a pattern in ``layers`` matches no Conv2d.
    """
    names, skipped = eligible_convs(model, layers, skip)
    for name in names:
        conv = model.get_submodule(name)
        if not isinstance(conv, DCTConv2d):
            _replace(model, name, DCTConv2d.from_conv2d(conv))
    return {"converted": names, "skipped": skipped}


def to_spatial(model: nn.Module) -> list[str]:
    """Replace every :class:`DCTConv2d` of ``model`` by an ordinary Conv2d (in place).

    Masks are baked: the new convs carry the spatial kernels of the kept coefficients and no
    pruning state.

    Args:
        model: The network.

    Returns:
        The names of the replaced layers.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, DCTConv2d)]
    for name in names:
        _replace(model, name, model.get_submodule(name).to_conv2d())
    return names


def frequency_layers(model: nn.Module) -> dict[str, DCTConv2d]:
    """The model's DCTConv2d layers by name, in registration order.

    Args:
        model: The network.

    Returns:
        Module name to layer.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, DCTConv2d)}
