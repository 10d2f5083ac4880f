"""Export a pruned model as safetensors: dense, compressed (sparse encodings) or shrunk.

Three files, all plain tensor files (no pickle) with the model's spec in their metadata:

- ``dense``: the baked state dict (zeros stored as zeros);
- ``compressed``: every weight with zeros in its smallest exact encoding: a bitmask of the
  nonzeros plus their values, CSR (row pointers, column indices, values), or for N:M weights
  the N values of every run of M plus their positions packed in ``ceil(log2 M)`` bits (2 bits
  for 2:4 and 4:8 → 3 bits stored in 4);
- ``shrunk``: the state dict of :func:`woodfisher.shrink`'s smaller model plus the kept channel
  indices, so the loader rebuilds the same shapes.

:func:`load_export` restores the exact model from any of them (``torch.equal`` on every tensor).

Example:
    >>> import tempfile, os
    >>> from woodfisher.models import build_model, replace_modules
    >>> net = build_model("mlpnet-small", (1, 4, 4), 3)
    >>> with torch.no_grad():
    ...     net.fc1.weight[:, ::2] = 0
    >>> spec = {"name": "mlpnet-small", "input_shape": [1, 4, 4], "num_classes": 3}
    >>> d = tempfile.mkdtemp()
    >>> path = save_compressed(net, spec, os.path.join(d, "m.safetensors"))
    >>> back, info = load_export(path)
    >>> torch.equal(back.fc1.weight, net.fc1.weight), info["kind"]
    (True, 'compressed')
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from woodfisher.checkpoint import _atomic_write, _plain
from woodfisher.models import build_model, replace_modules

__all__ = [
    "FORMATS",
    "decode_tensor",
    "encode_tensor",
    "load_export",
    "save_compressed",
    "save_dense",
    "save_shrunk",
]

FORMATS = ("safetensors",)
_KEY = "woodfisher"
_VERSION = 1


def _save(tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike) -> Path:
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()},
                metadata={_KEY: json.dumps(_plain(meta))})
    return _atomic_write(path, lambda f: f.write(blob), "wb")


def _baked_state(model: nn.Module) -> dict[str, Tensor]:
    from woodfisher.pruning.channels import baked_copy

    return {k: v.detach().cpu().clone() for k, v in baked_copy(model).state_dict().items()}


def _meta(kind: str, spec: dict, dataset: dict | None, extra: dict | None = None) -> dict:
    missing = [k for k in ("name", "input_shape", "num_classes") if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {missing}; need name, input_shape, num_classes")
    return {"format": f"woodfisher-{kind}", "version": _VERSION, "kind": kind,
            "model": {"kwargs": {}, **spec}, "dataset": dataset or {}, **(extra or {})}


def save_dense(model: nn.Module, spec: dict, path: str | os.PathLike,
               dataset: dict | None = None) -> Path:
    """Write the baked state dict of ``model`` as safetensors (atomically).

    Args:
        model: The (masked) model.
        spec: ``name``, ``input_shape``, ``num_classes`` (and ``kwargs``) to rebuild it.
        path: Output file.
        dataset: The dataset's name and normalisation, kept in the metadata.

    Returns:
        The path written.
    """
    return _save(_baked_state(model), _meta("dense", spec, dataset), path)


# -- encodings ----------------------------------------------------------------------------
def _pack(values: Tensor, bits: int) -> Tensor:
    """Pack small non-negative ints (< 2**bits, bits in 1, 2, 4, 8) into uint8."""
    per = 8 // bits
    v = values.to(torch.uint8).reshape(-1)
    pad = (-v.numel()) % per
    v = torch.cat([v, v.new_zeros(pad)]).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    return (v << shifts).sum(1, dtype=torch.uint8) if per > 1 else v.reshape(-1)


def _unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    return ((packed.reshape(-1, 1) >> shifts) & mask).reshape(-1)[:count].long()


def _index_bits(m: int) -> int:
    need = max(1, math.ceil(math.log2(m)))
    return next(b for b in (1, 2, 4, 8) if b >= need)


def encode_tensor(t: Tensor, nm: tuple[int, int] | None = None) -> tuple[dict[str, Tensor],
                                                                           dict[str, Any]]:
    """The smallest exact encoding of ``t``: raw, bitmask, CSR or N:M.

    Args:
        t: A tensor (2-D view: first axis rows).
        nm: ``(N, M)`` to try the N:M encoding (used when every run of M has ≤ N nonzeros).

    Returns:
        ``(parts, info)``: tensors to store (names relative to the tensor) and how to decode.
    """
    info: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    flat = t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)
    rows, cols = flat.shape
    nonzero = flat != 0
    nnz = int(nonzero.sum())
    item = t.element_size()
    options = {"raw": t.numel() * item}
    if t.is_floating_point() and t.numel() > 0:
        options["bitmask"] = math.ceil(t.numel() / 8) + nnz * item
        col_item = 2 if cols < 2**15 else 4
        options["csr"] = (rows + 1) * 4 + nnz * (col_item + item)
        if nm is not None and cols % nm[1] == 0:
            runs = nonzero.reshape(-1, nm[1])
            if bool((runs.sum(1) <= nm[0]).all()):
                bits = _index_bits(nm[1])
                options["nm"] = runs.shape[0] * nm[0] * item + math.ceil(
                    runs.shape[0] * nm[0] * bits / 8)
    # On a tie (2:4: 2 bits × 2 positions = a 4-bit mask per run) N:M wins: it is the layout
    # 2:4 sparse kernels read.
    rank = {"nm": 0, "bitmask": 1, "csr": 2, "raw": 3}
    kind = min(options, key=lambda k: (options[k], rank[k]))
    info["encoding"] = kind
    if kind == "raw":
        return {"": t.contiguous()}, info
    if kind == "bitmask":
        return {"mask": _pack(nonzero.reshape(-1), 1), "values": flat[nonzero]}, info
    if kind == "csr":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = flat.to_sparse_csr()
        col_dtype = torch.int16 if cols < 2**15 else torch.int32
        return {"crow": csr.crow_indices().to(torch.int32),
                "col": csr.col_indices().to(col_dtype), "values": csr.values()}, info
    n, m = nm
    runs = flat.reshape(-1, m)
    # Keep N slots per run: the nonzeros first (stable), padded with zeros of the run.
    order = torch.argsort((runs == 0).to(torch.int8), dim=1, stable=True)[:, :n]
    info.update({"n": n, "m": m})
    return {"values": torch.gather(runs, 1, order),
            "index": _pack(order.reshape(-1), _index_bits(m))}, info


def decode_tensor(parts: dict[str, Tensor], info: dict[str, Any]) -> Tensor:
    """Invert :func:`encode_tensor`.

    Returns:
        The original tensor, bit for bit.
    """
    shape = torch.Size(info["shape"])
    kind = info["encoding"]
    if kind == "raw":
        return parts[""]
    dtype = getattr(torch, info["dtype"])
    rows = shape[0] if len(shape) >= 2 else 1
    cols = shape.numel() // max(rows, 1)
    if kind == "bitmask":
        mask = _unpack(parts["mask"], 1, shape.numel()).bool()
        out = torch.zeros(shape.numel(), dtype=dtype)
        out[mask] = parts["values"]
        return out.reshape(shape)
    if kind == "csr":
        dense = torch.sparse_csr_tensor(parts["crow"].long(), parts["col"].long(),
                                        parts["values"], (rows, cols)).to_dense()
        return dense.reshape(shape)
    n, m = info["n"], info["m"]
    values = parts["values"]
    pos = _unpack(parts["index"], _index_bits(m), values.numel()).reshape(-1, n)
    out = torch.zeros(values.shape[0], m, dtype=dtype)
    out.scatter_(1, pos, values)
    return out.reshape(shape)


def save_compressed(model: nn.Module, spec: dict, path: str | os.PathLike,
                    dataset: dict | None = None, nm: tuple[int, int] | None = None) -> Path:
    """Write every tensor of the baked model in its smallest exact encoding.

    Args:
        model: The (masked) model.
        spec: How to rebuild it (see :func:`save_dense`).
        path: Output file.
        dataset: Dataset name and normalisation for the metadata.
        nm: ``(N, M)`` of an N:M pattern, to store runs as values + packed positions.

    Returns:
        The path written.
    """
    tensors, layout = {}, {}
    for name, t in _baked_state(model).items():
        parts, info = encode_tensor(t, nm)
        layout[name] = info
        for suffix, value in parts.items():
            tensors[f"{name}.{suffix}" if suffix else name] = value
    return _save(tensors, _meta("compressed", spec, dataset, {"tensors": layout}), path)


def save_shrunk(small: nn.Module, spec: dict, path: str | os.PathLike,
                dataset: dict | None = None) -> Path:
    """Write a model made by :func:`woodfisher.shrink` with its kept channel indices.

    Args:
        small: The shrunk model.
        spec: How to rebuild the original architecture.
        path: Output file.
        dataset: Dataset name and normalisation for the metadata.

    Returns:
        The path written.

    Raises:
        ValueError: If ``small`` does not come from :func:`woodfisher.shrink`.
    """
    from woodfisher.shrink import kept_channels

    kept = kept_channels(small)
    if not kept:
        raise ValueError("save_shrunk needs a model returned by woodfisher.shrink()")
    return _save(_baked_state(small), _meta("shrunk", spec, dataset, {"kept": kept}), path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The woodfisher metadata of an exported file.

    Returns:
        The metadata dict.

    Raises:
        ValueError: If the file is missing or not a woodfisher export.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found (expected a file written by `woodfisher export`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_KEY)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path} is not a safetensors file ({err})") from None
    if meta is None:
        raise ValueError(f"{path} is a safetensors file without woodfisher metadata")
    return json.loads(meta)


def load_export(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exact model from a dense, compressed or shrunk export.

    Args:
        path: A file written by :func:`save_dense`, :func:`save_compressed` or
            :func:`save_shrunk`.

    Returns:
        ``(model, info)``: the model in eval mode and ``info`` with ``kind``, ``model`` (spec),
        ``dataset`` and ``path``.

    Raises:
        ValueError: If the file is not a woodfisher export or does not match its spec.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    spec = meta["model"]
    model = build_model(spec["name"], spec["input_shape"], spec["num_classes"],
                        **spec.get("kwargs", {}))
    replace_modules(model, spec.get("modules", {}))
    raw = load_file(str(path))
    kind = meta.get("kind")
    if kind == "compressed":
        state = {}
        for name, info in meta["tensors"].items():
            parts = {k.removeprefix(name).lstrip("."): v for k, v in raw.items()
                     if k == name or k.startswith(name + ".")
                     and k.removeprefix(name + ".") in ("mask", "values", "crow", "col", "index")}
            state[name] = decode_tensor(parts, info)
    elif kind == "shrunk":
        from woodfisher.shrink import apply_kept_channels

        example = torch.zeros(2, *spec["input_shape"])
        apply_kept_channels(model, meta["kept"], example)
        state = raw
    elif kind == "dense":
        state = raw
    else:
        raise ValueError(f"{path}: unknown export kind {kind!r}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        msg = " ".join(str(err).split())[:300]
        raise ValueError(f"{path} does not match its model spec: {msg}") from None
    model.eval()
    return model, {"kind": kind, "model": spec, "dataset": meta.get("dataset", {}),
                   "path": str(path)}
