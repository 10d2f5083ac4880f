"""Checkpoints as plain data: a state dict, the model spec, the dataset and training metadata.

Files are written atomically (temporary file in the same directory, then ``os.replace``) and
read with ``torch.load(..., weights_only=True)``: a checkpoint is data, not code.

Pruned models carry ``torch.nn.utils.prune`` state (``fc1.weight_orig`` and ``fc1.weight_mask``);
:func:`load_checkpoint` re-creates that reparametrisation before loading so masks survive.
A model whose architecture a compressor changed records the replaced submodules in its spec
(``spec["modules"]``: name to :func:`woodfisher.models.module_spec`); loading rebuilds them
before the state dict is loaded.

Example:
    >>> import tempfile, os
    >>> from woodfisher.models import build_model, module_spec, replace_modules, swapped_modules
    >>> model = build_model("mlpnet-small", input_shape=(1, 8, 8))
    >>> spec = {"name": "mlpnet-small", "input_shape": [1, 8, 8], "num_classes": 10}
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> _ = save_checkpoint(path, model, spec)
    >>> loaded, info = load_checkpoint(path)
    >>> info["model"]["name"]
    'mlpnet-small'
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from woodfisher import __version__
from woodfisher.models import build_model, module_spec, replace_modules, swapped_modules

__all__ = [
    "FORMAT",
    "CheckpointError",
    "atomic_save",
    "atomic_save_json",
    "atomic_savefig",
    "check_writable",
    "load_checkpoint",
    "refresh_pruned_weights",
    "restore_pruning",
    "save_checkpoint",
    "versions",
]

FORMAT = "woodfisher-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("format", "state_dict", "model")


class CheckpointError(ValueError):
    """A file is not a (readable) woodfisher checkpoint."""


class WriteError(OSError):
    """Writing a file failed (e.g. the disk is full); the file at the path is as it was."""


def versions() -> dict[str, str]:
    """Versions worth recording next to results (woodfisher, torch, python).

    Returns:
        ``{"woodfisher": ..., "torch": ..., "python": ...}``.
    """
    return {"woodfisher": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


def check_writable(path: str | os.PathLike) -> Path:
    """Check, before any long work, that a file can be written at ``path``.

    Args:
        path: The output file.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: If the parent directory is missing or not writable, or ``path`` is a
            directory.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(
            f"output path {path} is a directory; give a file name such as {path}/model.pt"
        )
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: directory {parent} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".wf-check-"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {path}: directory {parent} is not writable ({e})") from e
    return path


def _atomic_write(path: str | os.PathLike, write: Any, mode: str) -> Path:
    """Write ``path`` through a temporary file in its directory, fsync, then ``os.replace``.

    A crash or SIGKILL at any moment leaves either the old file or the new one, and no
    temporary file is left behind on error.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise WriteError(
                err.errno, f"could not write {path}: {err.strerror or err}; {kept}"
            ) from err
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` so that ``path`` is never half-written.

    Args:
        obj: Anything ``torch.save`` accepts (keep it loadable with ``weights_only=True``).
        path: The destination; its directory must exist.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: If the directory is missing or not writable (the destination is untouched).
    """
    return _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` so that ``path`` is never half-written.

    Args:
        obj: JSON-serialisable data (anything else is written as its ``str``).
        path: The destination; its directory must exist.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: If the directory is missing or not writable (the destination is untouched).
    """
    return _atomic_write(
        path, lambda f: f.write(json.dumps(obj, indent=2, default=str) + "\n"), "w"
    )


def atomic_savefig(fig: Any, path: str | os.PathLike, **savefig_kw: Any) -> Path:
    """Save a matplotlib figure as PNG so that ``path`` is never half-written.

    Args:
        fig: A ``matplotlib.figure.Figure``.
        path: The destination; its directory must exist.
        **savefig_kw: Passed to ``fig.savefig`` (e.g. ``dpi``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: If the directory is missing or not writable (the destination is untouched).
    """
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", **savefig_kw), "wb")


def _plain(value: Any) -> Any:
    """Reduce ``value`` to types ``torch.load(weights_only=True)`` accepts.

    Dicts get string keys, tuples become lists, str subclasses (``torch.__version__``) become
    ``str`` and numpy scalars Python numbers; anything else is stored as its ``str``.
    """
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):
        return str(value)
    for kind in (bool, int, float):
        if isinstance(value, kind):
            return kind(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    spec: dict[str, Any],
    normalisation: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its description to ``path`` atomically.

    Args:
        path: Output file (its directory must exist).
        model: The model; pruning state (``*_orig`` / ``*_mask``) is kept as it is.
        spec: How to rebuild the model: ``name``, ``input_shape``, ``num_classes`` and optional
            ``kwargs`` for :func:`woodfisher.models.build_model`; optional ``modules`` (name to
            :func:`woodfisher.models.module_spec`) for submodules that replace the built ones
            (re-described from ``model`` as it is; registered woodfisher layers such as
            ``DCTConv2d`` are added by themselves).
        normalisation: The dataset: ``{"dataset": name, "mean": ..., "std": ...}``.
        meta: Training metadata (epochs, seed, accuracy, time, ...); versions are added.

    Returns:
        The path written.

    Raises:
        ValueError: If ``spec`` lacks a key or the directory is not writable.
    """
    missing = [k for k in ("name", "input_shape", "num_classes") if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {missing}; need name, input_shape, num_classes")
    path = check_writable(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model": _plain({"kwargs": {}, **spec, **_module_specs(model, spec)}),
        "dataset": _plain(normalisation or {}),
        "meta": _plain({**(meta or {}), "versions": versions()}),
    }
    return atomic_save(payload, path)


def _module_specs(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    # Describe the replaced submodules as they are now (a spec carried over from a loaded
    # checkpoint may name layers converted back since), plus every registered woodfisher layer.
    names = list(spec.get("modules") or {})
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"model spec replaces {name!r}, which the model does not have; "
                             "drop it from spec['modules']") from None
    modules = {n: module_spec(model.get_submodule(n)) for n in names}
    modules.update(swapped_modules(model))
    return {"modules": modules} if modules else {}


def refresh_pruned_weights(model: nn.Module) -> None:
    """Recompute ``module.weight = weight_orig * weight_mask`` for every pruned tensor.

    ``torch.nn.utils.prune`` refreshes the attribute only in a forward pre-hook, so after
    ``load_state_dict`` (or a direct write to ``weight_orig``) it is stale until the next
    forward pass; call this to bring it up to date.

    Args:
        model: Any module.
    """
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(module, hook._tensor_name, hook.apply_mask(module))


def restore_pruning(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``model`` the ``torch.nn.utils.prune`` state that ``state`` was saved with.

    For every ``X_mask`` with its ``X_orig`` in ``state``, re-create the reparametrisation with
    ``prune.custom_from_mask`` (tensors already pruned are left alone), so that
    ``model.load_state_dict(state)`` then finds ``X_orig`` and ``X_mask``.

    Args:
        model: A freshly built model of the same architecture.
        state: A state dict saved from the (possibly pruned) model.

    Raises:
        CheckpointError: If a mask names a tensor the model does not have.
    """
    modules = dict(model.named_modules())
    for key, mask in state.items():
        if not key.endswith("_mask"):
            continue
        prefix, _, tensor = key[: -len("_mask")].rpartition(".")
        if f"{prefix + '.' if prefix else ''}{tensor}_orig" not in state:
            continue
        module = modules.get(prefix)
        if module is None or not hasattr(module, tensor):
            raise CheckpointError(
                f"checkpoint has pruning mask {key!r} but the model has no tensor "
                f"{prefix}.{tensor}; the model spec does not match the state dict"
            )
        if hasattr(module, f"{tensor}_mask"):
            continue
        prune.custom_from_mask(module, tensor, mask=mask)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: The file.
        map_location: Where to put the tensors.

    Returns:
        ``(model, info)``: the rebuilt model in eval mode (with its pruning masks, if any) and
        ``info = {"model": spec, "dataset": {...}, "meta": {...}, "path": str}``.

    Raises:
        CheckpointError: If the file is missing, not loadable with ``weights_only=True``, or
            not a woodfisher checkpoint matching its model spec.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found (expected a file written by "
                              "`woodfisher train`)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a woodfisher checkpoint: torch.load(weights_only=True) failed "
            f"({reason[:200]})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a woodfisher checkpoint (found a {type(payload).__name__} without "
            f"format={FORMAT!r}); write one with `woodfisher train` or save_checkpoint()"
        )
    version = payload.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in checkpoint format version {version!r}, newer than the "
            f"{FORMAT_VERSION} this woodfisher ({__version__}) reads; upgrade woodfisher"
        )
    missing = [k for k in _REQUIRED if k not in payload]
    spec = payload.get("model", {})
    if not isinstance(spec, dict):
        missing.append("model")
    else:
        missing += [f"model.{k}" for k in ("name", "input_shape", "num_classes") if k not in spec]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}")
    state = payload["state_dict"]
    try:
        model = build_model(spec["name"], spec["input_shape"], spec["num_classes"],
                            **spec.get("kwargs", {}))
        replace_modules(model, spec.get("modules", {}))
        restore_pruning(model, state)
        model.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except (ValueError, RuntimeError, TypeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint {path} does not match its model spec: {msg}") from e
    refresh_pruned_weights(model)
    model.eval()
    info = {
        "model": spec,
        "dataset": payload.get("dataset", {}),
        "meta": payload.get("meta", {}),
        "path": str(path),
    }
    return model, info
