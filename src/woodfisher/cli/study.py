"""``analyze-hessian``: the curvature study on a small network (or a layer of your model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from woodfisher.cli.common import (
    DataDir,
    JsonOut,
    Quiet,
    Seed,
    _checkpoint_and_data,
    _stderr_log,
    _stdout,
    app,
    user_errors,
)


def _parse_ints(text: str, what: str, allow_full: bool = False) -> list[int | None]:
    out: list[int | None] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if allow_full and part == "full":
            out.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            value = 0
        if value < 1:
            extra = " or 'full'" if allow_full else ""
            raise ValueError(f"{what} must be comma-separated positive integers{extra}, "
                             f"got {text!r}")
        out.append(value)
    if not out:
        raise ValueError(f"{what} is empty; give at least one value")
    return out


@app.command("analyze-hessian")
@user_errors
def analyze_hessian(
    out: Annotated[Path, typer.Option(
        help="Directory for the four figures (error_vs_m, heatmaps, fidelity, ihvp PNGs) and "
             "study.json; or NAME.png to write NAME-error_vs_m.png ... NAME.json beside it."
    )] = Path("hessian-study"),
    model: Annotated[Path | None, typer.Option(
        "--model", help="A checkpoint of `woodfisher train` to study (its dataset's training "
                        "split gives the samples); default: a 64-40-20-10 MLP trained briefly "
                        "on digits.")] = None,
    layer: Annotated[str | None, typer.Option(
        help="Layer to study: module name or index among the Linear/Conv layers (0 = first); "
             "default the second. At most 4000 weights (the exact Hessian is d²).")] = None,
    num_grads: Annotated[str, typer.Option(
        help="Comma-separated numbers of gradients m for WoodFisher.")] = "10,30,100,300,1000",
    block_sizes: Annotated[str, typer.Option(
        help="Comma-separated WoodFisher block sizes; 'full' for one block.")] = "full,50,20",
    samples: Annotated[int, typer.Option(
        help="Samples N for the loss, Hessian and Fisher.")] = 1000,
    damp: Annotated[float, typer.Option(help="Dampening λ added to every estimate.")] = 1e-3,
    seed: Seed = 0,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Compare WoodFisher, diagonal Fisher and K-FAC with the exact Hessian of one layer.

    Writes four figures and the JSON result (see --out) and prints the table (or, with
    --json, the whole result as one JSON object).
    """
    from woodfisher.checkpoint import atomic_save_json, check_writable
    from woodfisher.fisher.study import analyze_hessian as run_study
    from woodfisher.fisher.study_plots import output_paths, print_hessian_table, write_figures

    paths = output_paths(out)
    if out.suffix.lower() != ".png":
        if out.exists() and not out.is_dir():
            raise ValueError(
                f"--out {out} exists and is not a directory; give a directory or a NAME.png"
            )
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: the directory {out.parent} does not exist")
        out.mkdir(exist_ok=True)
    for path in paths.values():
        check_writable(path)
    ms = _parse_ints(num_grads, "--num-grads")
    blocks = _parse_ints(block_sizes, "--block-sizes", allow_full=True)
    log = _stderr_log(quiet)
    net, data = None, None
    if model is not None:
        import torch

        net, _, splits = _checkpoint_and_data(model, None, data_dir)
        X, Y = splits.train.tensors[:2]
        net, data = net.double(), (X.double(), Y)
        torch.manual_seed(seed)
    result = run_study(net, data, layer=layer, num_grads=ms, block_sizes=blocks,
                       num_samples=samples, damp=damp, seed=seed, log=log)
    if model is not None:
        result["setup"]["model"] = str(model)
    write_figures(result, out)
    atomic_save_json(result, paths["json"])
    if json_out:
        typer.echo(json.dumps(result))
        return
    print_hessian_table(result, console=_stdout())
    _stdout().print("wrote " + ", ".join(str(p) for p in paths.values()))
