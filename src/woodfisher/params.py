"""Which parameters take part, and how they map onto one flat vector.

Curvature and pruning both see the selected weights as one vector of length ``d``; a
:class:`Layout` records where each layer's weight lives in it, so that blocks never cross a
layer and results can be split back into tensors. Weights pruned with
``torch.nn.utils.prune`` are read through their ``weight_orig``/``weight_mask`` pair.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_RNN_WEIGHT = re.compile(r"^weight_(ih|hh|hr)_l\d+(_reverse)?$")
_MHA_KINDS = {
    "in_proj_weight": "attention_qkv",
    "q_proj_weight": "attention_q",
    "k_proj_weight": "attention_k",
    "v_proj_weight": "attention_v",
}
#: Kinds of prunable weights (the ``kind`` of a :class:`Target` and of report rows).
KINDS = (
    "linear",
    "conv",
    "conv_transpose",
    "attention_qkv",
    "attention_q",
    "attention_k",
    "attention_v",
    "attention_out",
    "rnn_ih",
    "rnn_hh",
    "rnn_proj",
    "embedding",
    "other",
)


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable weight tensor: a parameter ``attr`` of ``module``.

    Attributes:
        name: Its name in layouts and reports: the module name for a module's ``weight``
            (``"fc1"``), else the full parameter name (``"encoder.0.self_attn.in_proj_weight"``).
        param_name: The full parameter name as the model calls it before pruning
            (``"fc1.weight"``; ``weight_orig`` once pruned is still ``"fc1.weight"``).
        module_name: The owning module's name.
        module: The owning module.
        attr: The parameter's attribute name on ``module`` (``"weight"``, ``"in_proj_weight"``,
            ``"weight_ih_l0"``).
        kind: One of :data:`KINDS`.
    """

    name: str
    param_name: str
    module_name: str
    module: nn.Module
    attr: str
    kind: str

    @property
    def weight(self) -> Tensor:
        """The effective tensor the forward pass uses (masked when pruned)."""
        return getattr(self.module, self.attr)

    def __getattr__(self, item: str) -> object:
        # Other attributes are the module's, so code written when selections were modules
        # (``t.weight_mask``, ``t.in_features``) keeps working.
        if item.startswith("__"):
            raise AttributeError(item)
        return getattr(self.module, item)

    def parts(self) -> dict[str, slice]:
        """Named row ranges that reports show separately (q/k/v of a packed attention
        projection, the gates of a recurrent weight); empty for other kinds.

        Returns:
            Part name to a slice of rows (dimension 0).
        """
        rows = weight_param(self).shape[0]
        if self.kind == "attention_qkv":
            names = ("q", "k", "v")
        elif self.kind in ("rnn_ih", "rnn_hh"):
            names = _GATES.get(type(self.module).__name__, ())
        else:
            return {}
        if not names or rows % len(names):
            return {}
        step = rows // len(names)
        return {n: slice(i * step, (i + 1) * step) for i, n in enumerate(names)}


_GATES = {"LSTM": ("input", "forget", "cell", "output"), "GRU": ("reset", "update", "new")}


def owner(target: Target | nn.Module) -> nn.Module:
    """The module that holds a target's weight (a module stands for its own ``weight``).

    Returns:
        The module.
    """
    return target.module if isinstance(target, Target) else target


def _attr(target: Target | nn.Module) -> str:
    return target.attr if isinstance(target, Target) else "weight"


def _logical_parameters(model: nn.Module) -> list[tuple[str, str, nn.Module, str, Tensor]]:
    """``(full name, module name, module, attr, tensor)`` of every parameter, naming a pruned
    tensor by its unpruned name (``fc1.weight`` for ``fc1.weight_orig`` + ``fc1.weight_mask``)."""
    out = []
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            attr = pname
            if pname.endswith("_orig") and hasattr(mod, pname[: -len("_orig")] + "_mask"):
                attr = pname[: -len("_orig")]
            full = f"{mname}.{attr}" if mname else attr
            out.append((full, mname, mod, attr, p))
    return out


def _kind(module: nn.Module, attr: str, out_projs: set[int]) -> str | None:
    """The kind of a default-prunable weight, ``"embedding"``, or None (not a known kind)."""
    if isinstance(module, nn.MultiheadAttention):
        return _MHA_KINDS.get(attr)
    if isinstance(module, nn.RNNBase):
        m = _RNN_WEIGHT.match(attr)
        return None if m is None else {"ih": "rnn_ih", "hh": "rnn_hh", "hr": "rnn_proj"}[m[1]]
    if attr != "weight":
        return None
    if isinstance(module, nn.Linear):
        return "attention_out" if id(module) in out_projs else "linear"
    return _kind_by_type(module)


# Projections of attention layers built from plain Linear modules (Hugging Face and most
# hand-written transformers), recognised by the last part of the module name.
_ATTENTION_NAMES = {
    **dict.fromkeys(("query", "q_proj", "q_lin", "q"), "attention_q"),
    **dict.fromkeys(("key", "k_proj", "k_lin", "k"), "attention_k"),
    **dict.fromkeys(("value", "v_proj", "v_lin", "v"), "attention_v"),
    **dict.fromkeys(("qkv", "qkv_proj", "c_attn", "Wqkv"), "attention_qkv"),
    **dict.fromkeys(("out_proj", "o_proj", "out_lin"), "attention_out"),
}


def _kind_by_type(module: nn.Module) -> str | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "conv_transpose"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return None


def _as_list(patterns: Sequence[str] | str | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class Selection:
    """What takes part in pruning and curvature, and what does not.

    Attributes:
        targets: Layout name to :class:`Target`, in the order of ``model.named_modules()``.
        skipped: Full parameter name to the reason it was left out, for every parameter not
            selected.
    """

    targets: dict[str, Target]
    skipped: dict[str, str]


def select_params(
    model: nn.Module,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    params: Sequence[str] | str | None = None,
) -> Selection:
    """The weight tensors to prune, by module type or by parameter name, with reasons for the
    rest.

    By default every weight of at least two dimensions of Linear, Conv1d/2d/3d,
    ConvTranspose1d/2d/3d, MultiheadAttention (the packed ``in_proj_weight`` or the separate
    ``q/k/v_proj_weight``; ``out_proj`` is a Linear) and RNN/LSTM/GRU (``weight_ih_l*``,
    ``weight_hh_l*``, ``weight_hr_l*``) is selected. Embeddings are left out unless ``params``
    names them. ``params`` replaces the default with every floating parameter of two or more
    dimensions whose full name matches a pattern (``"*.weight"``,
    ``"encoder.*.in_proj_weight"``), whatever its module.

    Args:
        model: Any module.
        layers: ``fnmatch`` patterns on module names (``"fc*"``, ``"layer1.*"``) that keep only
            the weights of matching modules.
        skip: Patterns of module names or full parameter names to leave out.
        params: Patterns of full parameter names (names as before pruning: ``fc1.weight``).

    Returns:
        The selection.

    Raises:
        ValueError: If nothing is selected, or a pattern in ``layers``/``params`` matches
            nothing (the message lists what is available).

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
        >>> sel = select_params(net)
        >>> list(sel.targets), sel.skipped["0.weight"].split(":")[0]
        (['1'], 'embedding')
        >>> list(select_params(net, params="*.weight").targets)
        ['0', '1']
    """
    layers, skip, params = _as_list(layers), _as_list(skip) or [], _as_list(params)
    out_projs = {
        id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
    }
    candidates: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    eligible: list[str] = []  # >= 2-D floating parameters, for error messages
    for full, mname, mod, attr, p in _logical_parameters(model):
        kind = _kind(mod, attr, out_projs)
        if kind == "linear":
            kind = _ATTENTION_NAMES.get(mname.rpartition(".")[2], kind)
        if p.ndim < 2 or not p.is_floating_point():
            skipped[full] = f"{p.ndim}-D (bias, scale or normalisation): never pruned"
            continue
        eligible.append(full)
        if params is not None:
            if not _match(full, params):
                skipped[full] = f"not matched by params={params}"
                continue
            kind = kind or "other"
        elif kind is None:
            skipped[full] = (
                f"{type(mod).__name__}.{attr}: not a known prunable weight; select it with "
                "params=[...]"
            )
            continue
        elif kind == "embedding":
            skipped[full] = "embedding: off by default; select it with params=[...]"
            continue
        name = mname if attr == "weight" else full
        candidates[name] = Target(name, full, mname, mod, attr, kind)
    for label, patterns, field in (("params", params, "param_name"), ("layer", layers, None)):
        for pattern in patterns or ():
            names = (
                [t.param_name for t in candidates.values()] if field
                else [t.module_name for t in candidates.values()]
            )
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                available = (
                    eligible if field else sorted({t.module_name for t in candidates.values()})
                )
                raise ValueError(
                    f"{label} pattern {pattern!r} matches no prunable weight; available: "
                    f"{available}"
                )
    chosen = {}
    for name, t in candidates.items():
        if layers is not None and not _match(t.module_name, layers):
            skipped[t.param_name] = f"module not matched by layers={layers}"
        elif skip and (_match(t.module_name, skip) or _match(t.param_name, skip)):
            skipped[t.param_name] = f"skipped by skip={skip}"
        else:
            chosen[name] = t
    if not chosen:
        raise ValueError(
            f"no prunable parameters: nothing left after layers={layers!r}, skip={skip!r}, "
            f"params={params!r}; weights of 2+ dimensions: {eligible}"
        )
    return Selection(chosen, skipped)


def select_modules(
    model: nn.Module,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    params: Sequence[str] | str | None = None,
) -> dict[str, Target]:
    """The weights to prune, as :func:`select_params` finds them, without the skip reasons.

    Returns:
        Layout name to :class:`Target`, in order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> list(select_modules(net))
        ['0', '2']
        >>> list(select_modules(net, skip="2"))
        ['0']
    """
    return select_params(model, layers, skip, params).targets


def select_layers(
    model: nn.Module,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
) -> dict[str, nn.Module]:
    """The selected modules themselves, for code that hooks or replaces whole layers.

    Only modules whose selected weight is their ``weight`` (Linear, Conv, ...) are returned;
    weights such as attention ``in_proj_weight`` or RNN gates are not layers one can swap.

    Returns:
        Module name to module, in order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> {n: type(m).__name__ for n, m in select_layers(net, skip="2").items()}
        {'0': 'Linear'}
    """
    return {
        t.module_name: t.module
        for t in select_params(model, layers, skip).targets.values()
        if t.attr == "weight"
    }


def weight_param(module: Target | nn.Module) -> nn.Parameter:
    """The parameter that holds a weight: ``X_orig`` when pruned, else ``X`` itself.

    Updates must be written here; a write to the effective tensor of a pruned module is lost at
    the next forward pass.

    Args:
        module: A :class:`Target`, or a module (standing for its ``weight``).

    Returns:
        The trainable parameter.
    """
    mod, attr = owner(module), _attr(module)
    orig = getattr(mod, f"{attr}_orig", None)
    return orig if orig is not None else getattr(mod, attr)


def weight_mask(module: Target | nn.Module) -> Tensor | None:
    """The current pruning mask, or None if the weight was never pruned.

    Returns:
        A float tensor of the weight's shape (1 = kept) or None.
    """
    return getattr(owner(module), f"{_attr(module)}_mask", None)


def effective_weight(module: Target | nn.Module) -> Tensor:
    """The weight the forward pass uses (``X_orig * X_mask`` when pruned).

    Returns:
        A detached tensor of the weight's shape.
    """
    mask = weight_mask(module)
    w = weight_param(module).detach()
    return w * mask if mask is not None else w


@dataclass(frozen=True)
class Layout:
    """Where each selected weight lives inside the flat vector of length ``d``.

    ``names`` are the targets' names (``"fc1"`` for a module's weight, the full parameter name
    otherwise, see :class:`Target`).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, modules: dict[str, Target | nn.Module]) -> Layout:
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


def flat_weights(modules: dict[str, Target | nn.Module]) -> Tensor:
    """The effective weights of ``modules`` as one detached flat vector.

    Returns:
        A (d,) tensor in the order of ``modules``.
    """
    return torch.cat([effective_weight(m).reshape(-1) for m in modules.values()])


def flat_masks(modules: dict[str, Target | nn.Module]) -> Tensor:
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
