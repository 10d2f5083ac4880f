"""``plan``: per-rank memory and communication of a prune, before anything is allocated."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from woodfisher.cli.common import _DEFAULTS, MODEL_HELP, _stdout, app, user_errors

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"80G"``, ``"1.5TB"`` or a plain number of bytes.

    Returns:
        Bytes.

    Raises:
        ValueError: If the text is not a size.
    """
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"--memory must be a size like 16GiB, 80G or 1.5TB, got {text!r}")
    try:
        return int(float(match.group(1)) * _UNITS[unit])
    except ValueError:
        raise ValueError(
            f"--memory must be a size like 16GiB, 80G or 1.5TB, got {text!r}"
        ) from None


def _layer_sizes(model: str | None, checkpoint: Path | None, params: str | None,
                 input_shape: str, num_classes: int) -> tuple[list[int], int, int, str]:
    """Layer sizes, activation entries per sample, model bytes and a description."""
    import torch

    from woodfisher.plan import activation_numel

    given = [x is not None for x in (model, checkpoint, params)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --model, --checkpoint or --params")
    if params is not None:
        try:
            sizes = [int(float(p)) for p in params.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--params must be comma-separated counts, got {params!r}") from None
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--params must be positive counts, got {params!r}")
        return sizes, 0, 0, f"{sum(sizes):,} weights in {len(sizes)} layer(s)"
    from woodfisher.params import select_modules, weight_param

    if checkpoint is not None:
        from woodfisher.checkpoint import load_checkpoint

        net, info = load_checkpoint(checkpoint)
        shape = tuple(info["model"]["input_shape"])
        name = f"{info['model']['name']} from {checkpoint}"
    else:
        from woodfisher.models import build_model

        try:
            shape = tuple(int(s) for s in input_shape.split(","))
        except ValueError:
            raise ValueError(f"--input-shape must be like 1,28,28, got {input_shape!r}") from None
        with torch.device("meta"):  # shapes only: nothing is allocated
            net = build_model(model, shape, num_classes)
        name = model
    sizes = [weight_param(m).numel() for m in select_modules(net).values()]
    nbytes = sum(p.numel() * p.element_size() for p in net.parameters())
    return sizes, activation_numel(net, shape), nbytes, f"{name}, input {shape}"


@app.command()
@user_errors
def plan(
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Plan for this checkpoint.")] = None,
    params: Annotated[
        str | None, typer.Option(help="Or just the weights per layer, e.g. 1e9 or 4e6,1e6.")
    ] = None,
    input_shape: Annotated[str, typer.Option(help="Input shape for --model.")] = "1,28,28",
    num_classes: Annotated[int, typer.Option(help="Classes for --model.")] = 10,
    num_grads: Annotated[int, typer.Option(help="Gradients m.")] = _DEFAULTS["num_grads"],
    block_size: Annotated[int, typer.Option(help="Fisher block size B.")] = _DEFAULTS[
        "block_size"
    ],
    nproc: Annotated[int, typer.Option(help="Ranks P (torchrun --nproc-per-node x nodes).")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda (what the ranks compute on).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    memory: Annotated[
        str | None, typer.Option(help="Memory per rank, e.g. 16GiB: say what fits.")
    ] = None,
    recompute_by: Annotated[str, typer.Option(help="auto, downdate or resample.")] = "auto",
    steps: Annotated[int, typer.Option(help="Recompute steps (for communication).")] = 9,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Per-rank memory and communication of a prune, computed before anything is allocated."""
    import resource

    import torch

    from woodfisher.fisher.memory import format_bytes
    from woodfisher.plan import fitting, plan_prune

    if dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda for a plan, got {device!r}")
    sizes, acts, model_bytes, what = _layer_sizes(model, checkpoint, params, input_shape,
                                                 num_classes)
    # On CPU the process itself (Python, torch) counts; on a GPU only tensors do.
    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if device == "cpu" else 0
    kw = dict(dtype=getattr(torch, dtype), device=device, activations=acts,
              recompute_by=recompute_by, baseline=runtime + model_bytes, steps=steps)
    p = plan_prune(sizes, num_grads, block_size, nproc, **kw)
    limit = parse_bytes(memory) if memory is not None else None
    if limit is not None and p.total_bytes > limit:
        alt = fitting(sizes, num_grads, block_size, nproc, limit, **kw)
        ways = [f"--nproc {alt['nproc']}" if alt["nproc"] else None,
                f"--block-size {alt['block_size']}" if alt["block_size"] else None,
                f"--num-grads {alt['num_grads']}" if alt["num_grads"] else None]
        ways = [w for w in ways if w]
        raise ValueError(
            f"{what}: m={num_grads}, B={block_size}, P={nproc} needs "
            f"{format_bytes(p.total_bytes)} per rank, more than --memory {memory}; "
            + ("fits with " + " or ".join(ways) if ways else "nothing nearby fits")
        )
    out = {"what": what, **p.to_dict(), "memory": limit}
    if json_out:
        typer.echo(json.dumps(out))
        return
    table = Table(title=f"{what}: m={num_grads}, B={block_size}, P={nproc}, {dtype} on {device}"
                  f" ({p.path} path, {p.chunk_rows} gradient rows per chunk)")
    table.add_column("per rank")
    table.add_column("bytes", justify="right")
    for k, v in p.parts.items():
        table.add_row(k, format_bytes(v))
    table.add_row("[b]total[/b]", f"[b]{format_bytes(p.total_bytes)}[/b]")
    console = _stdout()
    console.print(table)
    if p.communication:
        c = p.communication
        console.print(
            f"sent per rank: gradient columns {format_bytes(c['gradients'])} (once), "
            f"selection {format_bytes(c['per_step'])} per step, final weights "
            f"{format_bytes(c['assemble'])}"
        )
    if limit is not None:
        console.print(f"fits in {memory} per rank")
