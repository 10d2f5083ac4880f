"""``fdnp``: frequency-domain dynamic pruning of a checkpoint's convolutions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from woodfisher.cli.common import (
    DataDir,
    DeviceOpt,
    JsonOut,
    Quiet,
    Seed,
    _stdout,
    app,
    user_errors,
)

DOMAIN_HELP = "frequency (FDNP: prune DCT coefficients) or spatial (plain DNS on the weights)."
CRITERION_HELP = (
    "magnitude (DNS's |w|) or woodfisher (ours: |w|/sqrt([F⁻¹]_qq), the OBS saliency's root)."
)


def _patterns(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(p.strip() for p in text.split(",") if p.strip())


@app.command()
@user_errors
def fdnp(
    checkpoint: Annotated[Path, typer.Argument(help="Trained checkpoint (`woodfisher train`).")],
    compression: Annotated[
        float, typer.Option(help="Target ratio of the convs' coefficients to kept ones.")
    ] = 8.0,
    c: Annotated[
        float | None,
        typer.Option("--c", help="DNS's own rule instead of a target: θ = max(μ + cσ, 0)."),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    band_adaptive: Annotated[
        bool, typer.Option(help="BA-FDNP: thresholds rising with frequency band u+v.")
    ] = True,
    band_slope: Annotated[
        float | None, typer.Option(help="Log-ratio of the top band's threshold to the DC's.")
    ] = None,
    domain: Annotated[str, typer.Option(help=DOMAIN_HELP)] = "frequency",
    criterion: Annotated[str, typer.Option(help=CRITERION_HELP)] = "magnitude",
    allocation: Annotated[
        str, typer.Option(help="score (one threshold on all layers' scores), global (one c for "
                          "all layers) or uniform (each layer at the target).")
    ] = "score",
    ramp: Annotated[
        float | None, typer.Option(help="Fraction of the update period the target ramps over.")
    ] = None,
    stop: Annotated[
        float | None, typer.Option(help="Fraction of the run after which masks freeze.")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (cosine).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    train_subset: Annotated[
        int | None, typer.Option(help="Train on the first N training samples only.")
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated patterns of convs to prune.")
    ] = None,
    skip: Annotated[str | None, typer.Option(help="Comma-separated patterns of convs to skip.")
                    ] = None,
    seed: Seed = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="Output checkpoint (default CHECKPOINT-fdnp.pt); the resume file, "
                     "JSON log and the two PNGs are written next to it."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT's resume file.")] = False,
    data_dir: DataDir = None,
    device: DeviceOpt = "auto",
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Train CHECKPOINT while pruning its convs' DCT coefficients dynamically (FDNP); resumable."""
    from woodfisher.device import resolve_device
    from woodfisher.frequency.outputs import run_fdnp

    dev = resolve_device(device)
    options = {
        "compression": None if c is not None else compression, "c": c, "epochs": epochs,
        "band_adaptive": band_adaptive, "band_slope": band_slope, "domain": domain,
        "criterion": criterion, "allocation": allocation, "ramp": ramp, "stop": stop, "lr": lr,
        "batch_size": batch_size, "train_subset": train_subset, "layers": _patterns(layers),
        "skip": _patterns(skip), "seed": seed,
    }
    options = {k: v for k, v in options.items()
               if v is not None or k in ("compression", "layers", "skip")}
    res = run_fdnp(checkpoint, out, resume=resume,
                   data_dir=None if data_dir is None else str(data_dir), progress=not quiet,
                   device=dev, **options)
    if json_out:
        typer.echo(json.dumps(res, default=str))
        return
    console = _stdout()
    table = Table(title=f"{res['method']}: kept coefficients per layer")
    for col in ("layer", "shape", "kept", "compression", "c", "kept per band (low → high)"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for row in res["layers"]:
        bands = " ".join(f"{100 * f:.0f}" for f in row.get("bands", [])) or "-"
        c_val = row["c"]
        table.add_row(row["name"], "×".join(map(str, row["shape"])),
                      f"{row['kept']}/{row['numel']}", f"{row['compression'] or 0:.2f}×",
                      "-" if c_val is None else f"{c_val:.2f}", bands)
    console.print(table)
    if res["skipped"]:
        console.print("left spatial: " + "; ".join(f"{k} ({v})" for k, v in
                                                    res["skipped"].items()))
    sel = res["cost"]["selected"]
    console.print(
        f"test accuracy {res.get('test_accuracy', float('nan')):.2%} (dense "
        f"{res['dense_accuracy']:.2%}); {res['compression']:.2f}× over the pruned convs; "
        f"theoretical speed-up of those convs {sel['speedup_multiply_only']:.2f}× (multiplies "
        f"only), {sel['speedup_with_transform']:.2f}× (with the DCT of the feature maps)"
    )
    console.print(f"wrote {res['checkpoint']} (log {res['log']}, plots {res['plot']}, "
                  f"{res['bands']}; resume {res['resume']})")
