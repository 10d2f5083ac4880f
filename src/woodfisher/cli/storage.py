"""``storage``: store a checkpoint on simulated noisy analog cells (Isik et al.)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from woodfisher.cli.common import (
    DataDir,
    JsonOut,
    Quiet,
    _checkpoint_and_data,
    _parse_floats,
    _stderr_log,
    _stdout,
    app,
    user_errors,
)

STRATEGY_HELP = (
    "Coding strategy: 'naive' or tokens joined by commas from sign, pair, adaptive, split, "
    "magnitude, fisher (e.g. sign,adaptive,fisher). Repeat the option to compare several."
)
CHANNEL_HELP = (
    "Cell model: pcm (aihwkit programming noise, default), pcm:drift=SECONDS,read (drift and "
    "read noise), pcm:scale=K, gaussian:snr=DB, table:FILE.csv (level,mean,std)."
)


@app.command()
@user_errors
def storage(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to store (dense or pruned).")],
    strategy: Annotated[list[str] | None, typer.Option(help=STRATEGY_HELP)] = None,
    cells: Annotated[str, typer.Option(
        help="Analog cells per stored weight, comma-separated for a curve (e.g. 1,1.5,2).")] = "2",
    trials: Annotated[int, typer.Option(help="Noise draws per point.")] = 20,
    channel: Annotated[str, typer.Option(help=CHANNEL_HELP)] = "pcm",
    ladder: Annotated[bool, typer.Option(
        help="Also run naive and every prefix of each strategy (naive, sign, "
             "sign+adaptive, ...).")] = True,
    quant_bits: Annotated[int | None, typer.Option(
        help="Quantize weights per channel to this many bits before storing.")] = None,
    digits: Annotated[int, typer.Option(help="Cells per copy of a 'split' code.")] = 2,
    granularity: Annotated[str, typer.Option(
        help="Allocation groups: row (output channel) or weight.")] = "row",
    side_coding: Annotated[str, typer.Option(
        help="Masks and allocation maps: plain (bitmap) or entropy (ideal coder).")] = "plain",
    fisher_grads: Annotated[int, typer.Option(
        help="Training samples for the Fisher diagonal (fisher allocation).")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the noise draws and the Fisher sample.")] = 0,
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="JSON report to write (and a PNG beside it).")] = Path(
        "storage.json"),
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Store CHECKPOINT on noisy analog cells; table, JSON and accuracy-vs-cells plot.

    Every strategy runs at every budget in --cells it can spend; the Fisher diagonal comes
    from the training split, accuracy from the test split.
    """
    from woodfisher.checkpoint import atomic_save_json, check_writable
    from woodfisher.compare import pruning_batches
    from woodfisher.storage import Strategy, fisher_diagonal, make_channel
    from woodfisher.storage.report import ladder as strategy_ladder
    from woodfisher.storage.report import plot_storage, storage_table, sweep

    check_writable(out)
    png = out.with_suffix(".png")
    check_writable(png)
    given = strategy or ["sign,adaptive,fisher"]
    parsed = [Strategy.parse(s, digits=digits, granularity=granularity) for s in given]
    names = strategy_ladder(given) if ladder else [p.name for p in parsed]
    budgets = _parse_floats(cells, "--cells")
    if not budgets:
        raise ValueError(f"--cells needs at least one number, got {cells!r}")
    chan = make_channel(channel, seed)
    log = _stderr_log(quiet)
    model, info, splits = _checkpoint_and_data(checkpoint, None, data_dir)
    fisher = None
    if any(Strategy.parse(n).allocation == "fisher" for n in names):
        log(f"Fisher diagonal from {fisher_grads} training samples ...")
        fisher = fisher_diagonal(model, pruning_batches(splits.train, fisher_grads, seed),
                                 num_grads=fisher_grads, seed=seed, progress=not quiet)
    result = sweep(model, splits.test, names, budgets, log=log, trials=trials, channel=chan,
                   seed=seed, fisher=fisher, quant_bits=quant_bits, digits=digits,
                   granularity=granularity, side_coding=side_coding, progress=not quiet)
    report = {
        "checkpoint": str(checkpoint),
        "model": info["model"]["name"],
        "dataset": splits.name,
        "channel": chan.describe(),
        "strategies": names,
        "cells": budgets,
        "trials": trials,
        "seed": seed,
        "fisher_grads": fisher_grads if fisher is not None else None,
        **result,
    }
    atomic_save_json(report, out)
    title = f"{report['model']} on {report['dataset']}, channel {chan.name}"
    plot_storage(result, png, title=title)
    if json_out:
        typer.echo(json.dumps(report))
        return
    console = _stdout()
    console.print(storage_table(result, title=f"{title}: accuracy (%) over {trials} draws"))
    for s in result["skipped"]:
        console.print(f"skipped {s['strategy']} at cells={s['cells']:g}: {s['reason']}")
    console.print(f"wrote {out} and {png}")
