"""``export`` (safetensors: dense, compressed, shrunk) and the ``evaluate --latency`` tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from woodfisher.cli.common import JsonOut, _stdout, app, user_errors


def _nm_of(info: dict[str, Any]) -> tuple[int, int] | None:
    from woodfisher.pruning.patterns import parse_pattern

    pattern = (info.get("meta", {}).get("pruning") or {}).get("pattern")
    try:
        pat = parse_pattern(pattern)
    except ValueError:
        return None
    return (pat.n, pat.m) if pat.kind == "nm" else None


def _example(spec: dict[str, Any], n: int = 8) -> torch.Tensor:
    return torch.randn(n, *spec["input_shape"], generator=torch.Generator().manual_seed(0))


@app.command()
@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to export (pruned or not).")],
    format: Annotated[str, typer.Option("--format", help="File format: safetensors.")] = (
        "safetensors"
    ),
    out: Annotated[
        Path | None,
        typer.Option(help="Dense file to write (default CHECKPOINT.safetensors); "
                     "OUT.compressed.safetensors and OUT.shrunk.safetensors beside it."),
    ] = None,
    compressed: Annotated[bool, typer.Option(help="Also write the compressed form.")] = True,
    shrunk: Annotated[bool, typer.Option(help="Also write the shrunk form (zeroed channels "
                                         "removed) when there is one.")] = True,
    json_out: JsonOut = False,
) -> None:
    """Write CHECKPOINT's baked weights as safetensors, plus compressed and shrunk forms."""
    from woodfisher.checkpoint import check_writable, load_checkpoint
    from woodfisher.export import FORMATS, load_export, save_compressed, save_dense, save_shrunk

    if format not in FORMATS:
        raise ValueError(f"unknown --format {format!r}; choose from {list(FORMATS)}")
    out = out or checkpoint.with_suffix(".safetensors")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors")
    paths = {"dense": out, "compressed": out.with_suffix(".compressed.safetensors"),
             "shrunk": out.with_suffix(".shrunk.safetensors")}
    for p in paths.values():
        check_writable(p)
    model, info = load_checkpoint(checkpoint)
    spec, dataset = info["model"], info["dataset"]
    x = _example(spec)
    with torch.no_grad():
        expected = model(x)
    written = {"dense": save_dense(model, spec, paths["dense"], dataset)}
    sparse = any(bool((p == 0).any()) for n, p in model.state_dict().items()
                 if n.endswith(("weight", "weight_orig")) and p.ndim >= 2)
    if compressed and sparse:
        written["compressed"] = save_compressed(model, spec, paths["compressed"], dataset,
                                                _nm_of(info))
    notes = {}
    if shrunk:
        from woodfisher.shrink import shrink as shrink_model

        try:
            small = shrink_model(model, x)
        except ValueError as err:
            notes["shrunk"] = str(err)
        else:
            written["shrunk"] = save_shrunk(small, spec, paths["shrunk"], dataset)
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "bytes": {
        "masked": checkpoint.stat().st_size}, "files": {}, "notes": notes}
    for kind, path in written.items():
        back, _ = load_export(path)
        with torch.no_grad():
            diff = float((back(x) - expected).abs().max())
        report["files"][kind] = str(path)
        report["bytes"][kind] = path.stat().st_size
        report.setdefault("max_output_difference", {})[kind] = diff
    if json_out:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"bytes on disk of {checkpoint.name}")
    for col in ("form", "file", "bytes", "vs dense", "max |output diff|"):
        table.add_column(col, justify="left" if col in ("form", "file") else "right")
    dense = report["bytes"]["dense"]
    for kind in ("masked", "dense", "compressed", "shrunk"):
        if kind in report["bytes"]:
            b = report["bytes"][kind]
            diff = report.get("max_output_difference", {}).get(kind)
            table.add_row(kind, report["files"].get(kind, str(checkpoint)), str(b),
                          f"{b / dense:.2f}x", "" if diff is None else f"{diff:.2g}")
    console = _stdout()
    console.print(table)
    for kind, note in notes.items():
        console.print(f"no {kind} form: {note}")


def latency_summary(model: torch.nn.Module, info: dict[str, Any], splits: Any) -> dict[str, Any]:
    """Latency of the loaded model's dense, shrunk and CSR forms (for ``evaluate --latency``).

    Returns:
        :func:`woodfisher.latency.latency_report`'s dict plus ``shrink`` (a note or sizes).
    """
    from woodfisher.latency import latency_report
    from woodfisher.shrink import shrink as shrink_model

    spec = info["model"]
    small, note = None, None
    try:
        small = shrink_model(model, _example(spec))
    except ValueError as err:
        note = str(err)
    report = latency_report(model, tuple(spec["input_shape"]), shrunk=small)
    report["shrink"] = note or {"params": sum(p.numel() for p in small.parameters()),
                                "dense_params": sum(p.numel() for p in model.parameters())}
    return report


def latency_table(report: dict[str, Any]) -> Table:
    """The latency report as a table: one row per form, median ms and speed-up per batch.

    Returns:
        A rich table.
    """
    sizes = report["batch_sizes"]
    table = Table(title=f"CPU inference, median of repeats, {report['threads']} threads; 2:4 "
                        f"kernels: {report['semi_structured']['reason']}")
    table.add_column("form")
    for b in sizes:
        table.add_column(f"batch {b} (ms)", justify="right")
        table.add_column(f"speed-up {b}", justify="right")
    for form, rows in report["forms"].items():
        cells = []
        for b in sizes:
            cells += [f"{rows[str(b)]['median_ms']:.3f}", f"{report['speedup'][form][str(b)]:.2f}x"]
        table.add_row(form, *cells)
    return table
