"""Masks as ``torch.nn.utils.prune`` state: compute them, then apply them all or nothing.

A pruned module keeps ``weight_orig`` (trainable), a float ``weight_mask`` buffer and a forward
pre-hook that sets ``weight = weight_orig * weight_mask``, so it stays an ordinary module.
OBS updates are written to ``weight_orig``: a write to ``weight`` is lost at the next forward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as tprune

from woodfisher.params import Layout, Target, owner, weight_param

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_pre_hooks_always_called",
)


def compute_masks(
    modules: Mapping[str, Target | nn.Module], keep: Tensor
) -> dict[str, Tensor]:
    """Per-layer masks from a flat keep vector.

    Args:
        modules: Selected modules (layout order), as from :func:`woodfisher.params.select_modules`.
        keep: (d,) bool, True where the weight stays.

    Returns:
        Module name to a bool mask of the weight's shape.

    Raises:
        ValueError: If ``keep`` does not have length ``d``.
    """
    return {n: t.to(torch.bool).clone() for n, t in Layout.of(dict(modules)).split(keep).items()}


class _Snapshot:
    """Everything ``custom_from_mask`` and a weight write can change on some modules."""

    def __init__(self, modules: Mapping[str, Target | nn.Module]):
        self.items = []
        # One entry per module, even when several of its tensors are targets.
        for mod in {id(owner(m)): owner(m) for m in modules.values()}.values():
            params = dict(mod._parameters)
            buffers = dict(mod._buffers)
            self.items.append(
                (
                    mod,
                    params,
                    {k: p.detach().clone() for k, p in params.items() if p is not None},
                    buffers,
                    {k: b.clone() for k, b in buffers.items() if b is not None},
                    {h: dict(getattr(mod, h)) for h in _HOOK_DICTS if hasattr(mod, h)},
                    {k: v for k, v in mod.__dict__.items() if isinstance(v, Tensor)},
                )
            )

    def restore(self) -> None:
        for mod, params, pdata, buffers, bdata, hooks, attrs in self.items:
            for h, saved in hooks.items():
                getattr(mod, h).clear()
                getattr(mod, h).update(saved)
            mod._parameters.clear()
            mod._parameters.update(params)
            mod._buffers.clear()
            mod._buffers.update(buffers)
            # Plain tensor attributes: the prune hooks' computed weights (``weight``,
            # ``in_proj_weight``) live here; RNNs also re-read them into ``_flat_weights``.
            for k in [k for k, v in mod.__dict__.items() if isinstance(v, Tensor)]:
                if k not in attrs:
                    del mod.__dict__[k]
            mod.__dict__.update(attrs)
            if isinstance(mod, nn.RNNBase):
                mod._init_flat_weights()
            with torch.no_grad():
                for k, v in pdata.items():
                    params[k].copy_(v)
                for k, v in bdata.items():
                    buffers[k].copy_(v)


def apply_masks(
    model: nn.Module,
    modules: Mapping[str, Target | nn.Module],
    masks: Mapping[str, Tensor],
    new_weights: Mapping[str, Tensor] | None = None,
) -> None:
    """Prune ``modules`` in place with ``masks`` and optional new (OBS-updated) weights.

    Each mask multiplies into any earlier one (``prune.custom_from_mask``), so pruned weights
    never come back. New weights go to ``weight_orig`` with pruned entries set to exactly 0. Every
    input is checked before anything changes, and on any failure midway the modules are restored.

    Args:
        model: The model that owns ``modules`` (kept for symmetry with the CLI; not changed
            outside ``modules``).
        modules: Module name to module, for every layer in ``masks``.
        masks: Module name to a mask of the weight's shape (True / nonzero = keep).
        new_weights: Module name to the new weight values, or None to keep the current ones.

    Raises:
        ValueError: If a name is unknown, a shape differs, or a new weight is not finite.
    """
    del model
    new_weights = dict(new_weights or {})
    for name in list(masks) + list(new_weights):
        if name not in modules:
            raise ValueError(f"unknown module {name!r}; selected: {list(modules)}")
    for name, mask in masks.items():
        shape = weight_param(modules[name]).shape
        if mask.shape != shape:
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(shape)}"
            )
    for name, w in new_weights.items():
        shape = weight_param(modules[name]).shape
        if w.shape != shape:
            raise ValueError(
                f"new weight for {name!r} has shape {tuple(w.shape)}, expected {tuple(shape)}"
            )
        if not torch.isfinite(w).all():
            raise ValueError(f"new weight for {name!r} is not finite; the update diverged")
    touched = {n: modules[n] for n in dict.fromkeys(list(masks) + list(new_weights))}
    snap = _Snapshot(touched)
    try:
        for name, target in touched.items():
            mod = owner(target)
            attr = target.attr if isinstance(target, Target) else "weight"
            if name in masks:
                param = weight_param(target)
                mask = masks[name].to(device=param.device, dtype=param.dtype)
                tprune.custom_from_mask(mod, attr, mask)
            param = weight_param(target)
            with torch.no_grad():
                full = getattr(mod, f"{attr}_mask", None)
                if name in new_weights:
                    param.copy_(new_weights[name].to(param.dtype))
                if full is not None:
                    # Keeps X_orig honest: baked or not, a pruned weight reads as 0.
                    param.mul_(full)
                    setattr(mod, attr, param * full)
    except Exception:
        snap.restore()
        raise


def zero_entries(module: nn.Module, attr: str, index: Tensor) -> None:
    """Prune entries ``index`` (along dim 0) of ``module.attr`` for good, if it has one.

    For what pruning a channel takes with it (a bias, BatchNorm's weight and bias): a
    ``prune.custom_from_mask`` mask multiplied into any earlier one, and ``attr_orig`` zeroed
    too, so the entries read as 0 baked or not.

    Args:
        module: The module holding the parameter.
        attr: Its name (``"bias"``, ``"weight"``); a missing or None parameter is skipped.
        index: Entries of dim 0 to zero.
    """
    if getattr(module, attr, None) is None:
        return
    current = getattr(module, f"{attr}_orig", getattr(module, attr))
    mask = torch.ones_like(current)
    mask[index] = 0
    tprune.custom_from_mask(module, attr, mask)
    with torch.no_grad():
        orig = getattr(module, f"{attr}_orig")
        orig.mul_(getattr(module, f"{attr}_mask"))
        setattr(module, attr, orig * getattr(module, f"{attr}_mask"))


def bake(model: nn.Module) -> nn.Module:
    """Make every pruning mask permanent (``prune.remove``): plain ``weight`` parameters remain.

    Args:
        model: A model pruned with ``torch.nn.utils.prune``.

    Returns:
        The same model, changed in place.
    """
    for mod in model.modules():
        names = [
            h._tensor_name
            for h in list(mod._forward_pre_hooks.values())
            if isinstance(h, tprune.BasePruningMethod)
        ]
        for name in names:
            tprune.remove(mod, name)
    return model
