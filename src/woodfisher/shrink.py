"""Physical removal: a smaller model without the channels that pruning zeroed.

:func:`shrink` copies the model, bakes its masks, finds every output channel whose removal is
exact (see :func:`woodfisher.pruning.channels.dead_channels`: nobody reads it, or it carries exact
zeros) and cuts it out with Torch-Pruning's dependency graph, which also shrinks the consumers'
input columns, BatchNorm entries and the flatten→Linear index maps. Channels tied together by a
residual add stay (their group is refused, see :mod:`woodfisher.pruning.channels`). The result is
checked on the example inputs: its outputs must equal the masked model's.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> with torch.no_grad():
    ...     net[2].weight[:, :3] = 0  # nobody reads hidden units 0-2
    >>> small = shrink(net, torch.randn(5, 4))
    >>> small[0].out_features, small[2].in_features
    (3, 3)
    >>> kept_channels(small)
    {'0': [3, 4, 5]}
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from woodfisher.flops import run_model
from woodfisher.pruning.channels import (
    baked_copy,
    dead_channels,
    import_torch_pruning,
    trace_channels,
)

__all__ = ["apply_kept_channels", "kept_channels", "shrink"]

_ATTR = "woodfisher_kept_channels"


def _out_fn(tp, module: nn.Module):
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else (
        tp.prune_conv_out_channels
    )


def _remove(net: nn.Module, graph, removals: dict[str, list[int]]) -> None:
    tp = import_torch_pruning()
    mods = dict(net.named_modules())
    for name, idxs in removals.items():
        if idxs:
            graph.get_pruning_group(mods[name], _out_fn(tp, mods[name]), idxs=idxs).prune()


def _outputs(model: nn.Module, example_inputs: object) -> torch.Tensor:
    with torch.no_grad():
        out = run_model(model, example_inputs)
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def shrink(model: nn.Module, example_inputs: object, *, rtol: float = 1e-4) -> nn.Module:
    """A new, smaller module with every exactly removable zero channel taken out.

    Args:
        model: A (masked or baked) model; not changed.
        example_inputs: A batch the model accepts (traced once, then used for the check).
        rtol: Allowed difference of the outputs, relative to their largest magnitude.

    Returns:
        The shrunk model (in the training mode of ``model``), masks baked;
        :func:`kept_channels` tells which output channels of each layer it kept.

    Raises:
        ValueError: If no channel is removable (none is zero, or every zero channel is tied to
            others by a residual add), torch-pruning is missing, or the shrunk model's outputs
            differ from the masked model's.
    """
    was_training = model.training
    net = baked_copy(model)
    reference = copy.deepcopy(model).eval()
    expected = _outputs(reference, example_inputs)
    graph, net, deps = trace_channels(net, example_inputs, baked=True)
    removals, kept, blocked = {}, {}, []
    for name, info in deps.items():
        dead = dead_channels(net, info) if info.reason is None else None
        if dead is None:
            if _zero_rows(net, name, info.channels) and info.consumers is not None:
                if not info.reason.startswith("no layer reads"):  # model outputs stay
                    blocked.append(f"{name} ({info.reason})")
            continue
        if dead.all():
            dead[-1] = False  # a layer keeps one (silent) channel so the graph stays connected
        if dead.any():
            removals[name] = dead.nonzero().reshape(-1).tolist()
            kept[name] = (~dead).nonzero().reshape(-1).tolist()
    if not removals:
        why = f"; zero channels tied to others: {', '.join(blocked)}" if blocked else ""
        raise ValueError(
            "nothing to shrink: no output channel of a Linear/Conv is exactly removable (prune "
            f"with pattern='channels' first){why}"
        )
    _remove(net, graph, removals)
    got = _outputs(net, example_inputs)
    scale = float(expected.abs().max()) or 1.0
    if got.shape != expected.shape or float((got - expected).abs().max()) > rtol * scale:
        raise ValueError(
            "the shrunk model's outputs differ from the masked model's "
            f"(max difference {float((got - expected).abs().max()):.3g}); its zero channels are "
            "not removable exactly"
        )
    setattr(net, _ATTR, kept)
    net.train(was_training)
    return net


def _zero_rows(net: nn.Module, name: str, channels: int) -> bool:
    w = net.get_submodule(name).weight.detach().reshape(channels, -1)
    return bool((w.abs().amax(1) == 0).any())


def kept_channels(model: nn.Module) -> dict[str, list[int]]:
    """Output channels of each layer a shrunk model kept (indices into the original layer).

    Returns:
        Layer name to kept indices; empty for a model :func:`shrink` did not make.
    """
    return dict(getattr(model, _ATTR, {}))


def apply_kept_channels(
    model: nn.Module, kept: dict[str, list[int]], example_inputs: object
) -> nn.Module:
    """Give a freshly built model the shape of a shrunk one (to load its weights into).

    Args:
        model: A model of the original architecture (changed in place).
        kept: :func:`kept_channels` of the shrunk model.
        example_inputs: A batch the model accepts.

    Returns:
        ``model``, with the same layer shapes as the shrunk model.

    Raises:
        ValueError: If a layer name or index does not belong to the model.
    """
    graph, _, deps = trace_channels(model, example_inputs, baked=True)
    removals = {}
    for name, idxs in kept.items():
        if name not in deps or deps[name].reason is not None:
            raise ValueError(f"layer {name!r} has no removable channels in this model")
        if any(not 0 <= i < deps[name].channels for i in idxs):
            raise ValueError(f"kept channel index out of range for layer {name!r}")
        removals[name] = sorted(set(range(deps[name].channels)) - set(idxs))
    _remove(model, graph, removals)
    setattr(model, _ATTR, {k: list(v) for k, v in kept.items()})
    return model
