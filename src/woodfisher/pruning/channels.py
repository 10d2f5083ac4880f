"""Which output channels can go, and what reads them: Torch-Pruning's dependency graph, checked.

Torch-Pruning (Fang et al., CVPR 2023; PyPI ``torch-pruning``, MIT) traces a forward pass and
groups every tensor slice coupled to one output channel. We use its graph but accept only the
groups whose removal we can state exactly: one producer (a Linear/Conv's output channel, with its
bias), BatchNorm entries, channel-wise operations (activations, pooling, flatten) and consumers
that read the channel through their input columns. Groups with more than one producer (a
residual add ties the channel to other layers' outputs), grouped convolutions, concatenations or
unknown operations are reported as not removable. On our ResNet-20 with zero-padding
shortcuts Torch-Pruning couples the 16/32/64-channel residual streams of all three stages into
one group (``F.pad`` on the channel axis is treated as element-wise), which would remove the
wrong channels: that group has many producers and is refused.

Removing channel ``j`` is then exact in two ways, which :func:`dead_channels` checks:
(a) every consumer's columns for ``j`` are zero (whatever the producer computes, nobody reads
it), or (b) the producer's row, bias and BatchNorm scale and shift are zero and every operation
in between maps 0 to 0 (the channel carries exact zeros).

The heavy import happens inside the functions: ``pip install 'woodfisher[structured]'``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from woodfisher.pruning.patterns import matrix_shape

__all__ = ["ChannelDeps", "baked_copy", "dead_channels", "import_torch_pruning", "trace_channels"]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Autograd nodes (Torch-Pruning names element-wise ops after them) that map a zero channel to a
# zero channel and never mix channels.
_ZERO_PRESERVING = (
    "Relu", "Relu6", "LeakyRelu", "Hardtanh", "MaxPool", "AvgPool", "AdaptiveAvgPool",
    "AdaptiveMaxPool", "T", "Permute", "Transpose", "View", "Reshape", "Clone", "Mul",
    "Dropout", "Gelu", "Silu", "Hardswish", "Elu", "Tanh",
)


def import_torch_pruning():
    """Import Torch-Pruning or say how to install it.

    Returns:
        The ``torch_pruning`` module.

    Raises:
        ValueError: If it is not installed.
    """
    try:
        import torch_pruning
    except ImportError:  # pragma: no cover - the extra is installed in the dev environment
        raise ValueError(
            "channel pruning and shrink need torch-pruning: pip install 'woodfisher[structured]'"
        ) from None
    return torch_pruning


@dataclass
class ChannelDeps:
    """What one producer's output channels are coupled to.

    Attributes:
        producer: Module name of the Linear/Conv whose output channels these are.
        channels: Number of output channels.
        consumers: Consumer name to, per channel, the consumer's input indices reading it
            (input features of a Linear, input channels of a Conv).
        norms: Names of the BatchNorm modules whose entry ``j`` belongs to channel ``j``.
        zero_preserving: Whether every operation between producer and consumers maps 0 to 0.
        reason: Why the channels are not removable, or None when they are.
    """

    producer: str
    channels: int
    consumers: dict[str, list[list[int]]] = field(default_factory=dict)
    norms: list[str] = field(default_factory=list)
    zero_preserving: bool = True
    reason: str | None = None


def _op_name(module: nn.Module) -> str:
    text = str(module)
    if "(" in text and text.endswith(")"):
        inner = text[text.index("(") + 1 : -1]
        return inner.removesuffix("Backward0").removesuffix("Backward1")
    return type(module).__name__


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its masks baked in (``model`` itself is not changed).

    A pruned module's ``weight`` attribute is ``weight_orig * weight_mask`` from the last forward
    pass; after a forward with autograd on it is not a leaf and cannot be deep-copied, so it is
    recomputed without autograd first.

    Returns:
        The copy, in eval mode.
    """
    from woodfisher.checkpoint import refresh_pruned_weights
    from woodfisher.pruning.masks import bake

    with torch.no_grad():
        refresh_pruned_weights(model)
    return bake(copy.deepcopy(model)).eval()


def trace_channels(
    model: nn.Module, example_inputs: object, *, baked: bool = False
) -> tuple[object, nn.Module, dict[str, ChannelDeps]]:
    """Trace ``model`` once and describe every Linear/Conv's output channels.

    Args:
        model: The model (not changed: a copy with masks baked in is traced).
        example_inputs: A batch the model accepts (a tensor, tuple or dict).
        baked: ``model`` is already a private baked copy (trace it directly).

    Returns:
        ``(graph, traced_copy, deps)``: Torch-Pruning's DependencyGraph over ``traced_copy``
        and producer name to :class:`ChannelDeps`.

    Raises:
        ValueError: If torch-pruning is missing or the model fails on the inputs.
    """
    tp = import_torch_pruning()
    net = model if baked else baked_copy(model)
    try:
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=example_inputs)
    except Exception as err:  # noqa: BLE001 - tracing failures are the user's model/input
        raise ValueError(
            f"could not trace the model's channels on the example inputs: "
            f"{type(err).__name__}: {err}"
        ) from err
    names = {mod: name for name, mod in net.named_modules()}
    deps: dict[str, ChannelDeps] = {}
    for name, mod in net.named_modules():
        if not isinstance(mod, _PRODUCERS):
            continue
        out = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        info = ChannelDeps(name, out)
        deps[name] = info
        if getattr(mod, "groups", 1) != 1:
            info.reason = "grouped convolution"
            continue
        fn = (
            tp.prune_linear_out_channels if isinstance(mod, nn.Linear)
            else tp.prune_conv_out_channels
        )
        for j in range(out):
            try:
                group = graph.get_pruning_group(mod, fn, idxs=[j])
            except Exception as err:  # noqa: BLE001
                info.reason = f"torch-pruning could not group it ({type(err).__name__})"
                break
            reason = _read_group(graph, group, names, mod, j, info)
            if reason:
                info.reason = reason
                break
        if info.reason is None and not info.consumers:
            info.reason = "no layer reads these channels (model outputs)"
    return graph, net, deps


def _read_group(graph, group, names, root, j, info: ChannelDeps) -> str | None:
    """Add channel ``j``'s consumers to ``info``; the reason it is not removable, if any."""
    from torch_pruning import ops

    producers = 0
    for item in group:
        dep, idxs = item.dep, list(item.idxs)
        mod = dep.target.module
        out_fn = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(mod, _PRODUCERS):
            if out_fn and not graph.is_in_channel_pruning_fn(dep.handler):
                producers += 1
                if mod is not root:
                    return f"coupled to the output channels of {names[mod]} (residual add)"
            else:
                if getattr(mod, "groups", 1) != 1:
                    return f"read by the grouped convolution {names[mod]}"
                per = info.consumers.setdefault(names[mod], [[] for _ in range(info.channels)])
                per[j] = sorted(set(per[j]) | set(idxs))
        elif isinstance(mod, _NORMS):
            if idxs != [j]:
                return f"BatchNorm {names[mod]} is indexed differently"
            if names[mod] not in info.norms:
                info.norms.append(names[mod])
        elif isinstance(mod, (ops._ElementWiseOp, ops._ReshapeOp)):
            if isinstance(mod, ops._ElementWiseOp):
                op = _op_name(mod)
                if op.startswith(("Add", "Sub", "Cat", "Stack")):
                    return f"mixed with other tensors by {op}"
                if not op.startswith(_ZERO_PRESERVING):
                    info.zero_preserving = False
        else:
            return f"coupled through {type(mod).__name__}, which is not supported"
    if producers != 1:
        return "coupled to several producers"
    return None


def consumer_flat_index(shape: torch.Size, offset: int, inputs: list[int]) -> Tensor:
    """Flat layout indices of the input columns ``inputs`` of a consumer weight.

    Args:
        shape: The consumer's weight shape ``(out, in, *kernel)``.
        offset: Its start in the flat vector.
        inputs: Input features (Linear) or input channels (Conv).

    Returns:
        (out · len(inputs) · kernel,) long tensor, row-major.
    """
    rows, cols = matrix_shape(shape)
    kernel = cols // shape[1]
    base = torch.tensor(inputs, dtype=torch.long)[:, None] * kernel + torch.arange(kernel)
    return (offset + torch.arange(rows)[:, None] * cols + base.reshape(1, -1)).reshape(-1)


def dead_channels(model: nn.Module, info: ChannelDeps, tol: float = 0.0) -> Tensor:
    """Channels of ``info.producer`` whose removal leaves the model's function unchanged.

    Args:
        model: The (traced, baked) model ``info`` describes.
        info: Its channel dependencies (must be removable).
        tol: Absolute tolerance for "zero".

    Returns:
        (channels,) bool.
    """
    mods = dict(model.named_modules())
    prod = mods[info.producer]
    unread = torch.ones(info.channels, dtype=torch.bool)
    for name, per in info.consumers.items():
        w = mods[name].weight.detach()
        for j, cols in enumerate(per):
            if cols and bool((w[:, cols].abs() > tol).any()):
                unread[j] = False
    rows = prod.weight.detach().reshape(info.channels, -1).abs().amax(1) <= tol
    silent = rows.clone()
    if prod.bias is not None:
        silent &= prod.bias.detach().abs() <= tol
    for name in info.norms:
        bn = mods[name]
        if bn.weight is not None:
            silent &= bn.weight.detach().abs() <= tol
        if bn.bias is not None:
            silent &= bn.bias.detach().abs() <= tol
        elif bn.weight is None:
            silent[:] = False  # (x − μ)/σ of a zero channel is −μ/σ, not 0
    if not info.zero_preserving:
        silent[:] = False
    return unread | silent
