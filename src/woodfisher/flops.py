"""Multiply-accumulates (MACs) of a model's Linear and convolution layers, from an example input.

One forward pass with hooks records every layer's output shape, so any input shape works
(images of any size, sequences of any length). Counts are per example (the example batch's
leading dimension divides them out) and cover the weight products only: biases, activations,
normalisation and pooling are left out, as in the usual "FLOPs = MACs of conv + linear" tables.

Each weight of a layer takes part in the same number of products (``macs_per_weight``: 1 per
token for a Linear, the number of output positions for a convolution), so a layer with a
fraction ``s`` of its weights at zero skips ``s`` of its MACs; ``nonzero_macs`` counts that.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    >>> report = count_flops(net, torch.randn(2, 1, 8, 8))
    >>> [(layer.name, layer.macs) for layer in report.layers]
    [('0', 1296), ('2', 1440)]
    >>> report.total_macs
    2736
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
COUNTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV, *_CONV_T)


@dataclass(frozen=True)
class LayerFlops:
    """MACs of one layer, per example.

    Attributes:
        name: Module name.
        kind: ``"linear"``, ``"conv"`` or ``"conv_transpose"``.
        weight_numel: Entries of the weight.
        macs: Dense multiply-accumulates per example.
        macs_per_weight: Products each weight entry takes part in, per example.
        nonzero_macs: MACs of the nonzero weights (``macs`` × the weight's density).
    """

    name: str
    kind: str
    weight_numel: int
    macs: int
    macs_per_weight: float
    nonzero_macs: int


@dataclass(frozen=True)
class FlopReport:
    """Per-layer and total MACs of a model, per example.

    Attributes:
        layers: One entry per counted layer that ran, in call order.
        total_macs: Sum of the dense MACs.
        nonzero_macs: Sum of the MACs of nonzero weights.
    """

    layers: tuple[LayerFlops, ...]
    total_macs: int
    nonzero_macs: int

    def by_name(self) -> dict[str, LayerFlops]:
        """The layers keyed by module name.

        Returns:
            Module name to its entry.
        """
        return {layer.name: layer for layer in self.layers}

    def to_dict(self) -> dict[str, object]:
        """A JSON-able dict.

        Returns:
            ``{"total_macs", "nonzero_macs", "layers": [...]}``.
        """
        return {
            "total_macs": self.total_macs,
            "nonzero_macs": self.nonzero_macs,
            "layers": [asdict(layer) for layer in self.layers],
        }


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv_transpose" if isinstance(module, _CONV_T) else "conv"


def _layer_macs(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    """Dense MACs of one call over the whole batch."""
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    if isinstance(module, _CONV_T):
        # Every input position scatters into out_channels/groups · kernel outputs.
        return inp.numel() * (module.out_channels // module.groups) * kernel
    return out.numel() * (module.in_channels // module.groups) * kernel


def _weight_density(module: nn.Module) -> float:
    w = module.weight
    return float((w != 0).sum()) / w.numel() if w.numel() else 0.0


def _batch_size(example_inputs: object) -> int:
    first = example_inputs
    if isinstance(first, dict):
        first = next((v for v in first.values() if isinstance(v, Tensor)), None)
    elif isinstance(first, (tuple, list)):
        first = next((v for v in first if isinstance(v, Tensor)), None)
    if not isinstance(first, Tensor) or first.ndim == 0:
        raise ValueError(
            "example_inputs must be a batched tensor, a tuple of them or a dict of them; got "
            f"{type(example_inputs).__name__}"
        )
    return int(first.shape[0])


def run_model(model: nn.Module, example_inputs: object) -> object:
    """Call ``model`` on inputs given as a tensor, a tuple (``*args``) or a dict (``**kwargs``).

    Returns:
        Whatever the model returns.
    """
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def count_flops(model: nn.Module, example_inputs: object) -> FlopReport:
    """Count the MACs of every Linear/Conv/ConvTranspose layer for one forward pass.

    The model runs once in eval mode under ``no_grad`` (its modes are restored). A layer called
    several times (weight sharing, recurrence) is counted at every call.

    Args:
        model: Any module.
        example_inputs: A batch: a tensor, a tuple of positional inputs or a dict of keyword
            inputs; counts are divided by its leading dimension.

    Returns:
        The report, per example.

    Raises:
        ValueError: If the inputs are not batched tensors or the forward pass fails (the message
            names the input shapes).
    """
    batch = _batch_size(example_inputs)
    names = {mod: name for name, mod in model.named_modules()}
    seen: dict[str, list[int]] = {}
    modules: dict[str, nn.Module] = {}

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        if not args or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
            return
        name = names[mod]
        modules[name] = mod
        seen.setdefault(name, []).append(_layer_macs(mod, args[0], out))

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COUNTED_TYPES)
    ]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, example_inputs)
    except Exception as err:
        shapes = _describe(example_inputs)
        raise ValueError(
            f"the model failed on example inputs {shapes}: {type(err).__name__}: {err}"
        ) from err
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    layers = []
    for name, calls in seen.items():
        mod = modules[name]
        macs = sum(calls) // batch
        numel = mod.weight.numel()
        layers.append(
            LayerFlops(
                name=name,
                kind=_kind(mod),
                weight_numel=numel,
                macs=macs,
                macs_per_weight=macs / numel if numel else 0.0,
                nonzero_macs=round(macs * _weight_density(mod)),
            )
        )
    return FlopReport(
        layers=tuple(layers),
        total_macs=sum(layer.macs for layer in layers),
        nonzero_macs=sum(layer.nonzero_macs for layer in layers),
    )


def _describe(inputs: object) -> str:
    if isinstance(inputs, Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in inputs) + ")"
    return type(inputs).__name__
