"""``analyze-hessian``: the curvature study on a small network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from woodfisher.cli.common import _stdout, app, user_errors


@app.command("analyze-hessian")
@user_errors
def analyze_hessian(
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("hessian-study.png"),
    damp: Annotated[float, typer.Option(help="Dampening added to every estimate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Compare WoodFisher, diagonal Fisher and K-FAC with the exact Hessian of a small MLP."""
    from woodfisher.checkpoint import check_writable
    from woodfisher.fisher.study import analyze_hessian as run_study
    from woodfisher.fisher.study import print_hessian_table

    check_writable(out)
    rows = run_study(out_png=out, seed=seed, damp=damp)
    if json_out:
        typer.echo(json.dumps(rows))
        return
    print_hessian_table(rows, console=_stdout())
    _stdout().print(f"wrote {out}")

