"""``prune``, ``compare`` and ``gradual``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from woodfisher.cli.common import (
    _DEFAULTS,
    DAMP_HELP,
    DATA_DIR_HELP,
    GRADUAL_RELATIVE_DAMP_HELP,
    METHOD_HELP,
    PARAMS_HELP,
    PATTERN_HELP,
    RECOMPUTE_BY_HELP,
    RECOMPUTE_HELP,
    REFRESH_HELP,
    RELATIVE_DAMP_HELP,
    TARGET_HELP,
    UPDATE_HELP,
    DeviceOpt,
    _checkpoint_and_data,
    _damp_options,
    _parse_floats,
    _parse_recompute,
    _pattern_sparsity,
    _stderr_log,
    _stdout,
    app,
    user_errors,
)
from woodfisher.compare import compare_table


def _on_ranks(command: Callable[..., None], args: dict[str, object]) -> None:
    """Run ``command(**args, lead=...)`` here, or as one rank of a ``torchrun`` job.

    Under torchrun the process joins the group (gloo on CPU, NCCL on CUDA), every rank must
    have the same command line, ``device`` becomes this rank's device, and only rank 0 (the
    lead) evaluates, prints and writes.
    """
    import sys

    from woodfisher.device import resolve_device
    from woodfisher.distributed import in_torchrun, init_from_env, shutdown

    if not in_torchrun():
        command(**args, lead=True)
        return
    group = init_from_env(resolve_device(args["device"]))
    try:
        group.check_agree("the command line", sys.argv[1:])
        command(**{**args, "device": str(group.device)}, lead=group.rank == 0)
    finally:
        shutdown()


@app.command()
@user_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to prune.")],
    sparsity: Annotated[
        float | None,
        typer.Option(help="Fraction of selected weights (or MACs) to zero; default 0.9, "
                     "implied by N:M."),
    ] = None,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "woodfisher",
    pattern: Annotated[str, typer.Option(help=PATTERN_HELP)] = "unstructured",
    target: Annotated[str, typer.Option(help=TARGET_HELP)] = "params",
    shrink: Annotated[
        bool, typer.Option(help="Also remove zeroed channels physically; with --out, write "
                           "OUT.shrunk.safetensors.")
    ] = False,
    update: Annotated[str | None, typer.Option(help=UPDATE_HELP)] = None,
    scope: Annotated[str, typer.Option(help="global (one threshold) or layerwise.")] = "global",
    num_grads: Annotated[int | None, typer.Option(help="Gradients sampled for the Fisher.")] = None,
    samples_per_grad: Annotated[int, typer.Option(help="Samples averaged per gradient.")] = 1,
    block_size: Annotated[int | None, typer.Option(help="Fisher block size.")] = _DEFAULTS[
        "block_size"
    ],
    damp: Annotated[str | None, typer.Option(help=DAMP_HELP)] = None,
    relative_damp: Annotated[float | None, typer.Option(help=RELATIVE_DAMP_HELP)] = None,
    recompute: Annotated[str, typer.Option(help=RECOMPUTE_HELP)] = _DEFAULTS["recompute"],
    recompute_by: Annotated[str, typer.Option(help=RECOMPUTE_BY_HELP)] = _DEFAULTS[
        "recompute_by"
    ],
    refresh: Annotated[float, typer.Option(help=REFRESH_HELP)] = _DEFAULTS["refresh"],
    layers: Annotated[list[str] | None, typer.Option(help="Module name patterns to prune.")] = None,
    skip: Annotated[
        list[str] | None, typer.Option(help="Module or parameter name patterns to skip.")
    ] = None,
    params: Annotated[list[str] | None, typer.Option(help=PARAMS_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample draw.")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help=DATA_DIR_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="Pruned checkpoint to write (and OUT.json).")] = (
        None
    ),
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Prune CHECKPOINT one-shot; print a table and write the pruned model and a JSON report.

    Under ``torchrun --nproc-per-node P -m woodfisher prune ...`` the job runs over P processes
    (gloo on CPU, NCCL on GPU) with the same result; rank 0 prints and writes.
    """
    _on_ranks(_prune_command, dict(locals()))


def _prune_command(
    checkpoint, sparsity, method, pattern, target, shrink, update, scope, num_grads,
    samples_per_grad, block_size, damp, relative_damp, recompute, recompute_by, refresh, layers,
    skip, params,
    seed, data_dir, out, device, quiet, json_out, lead,
) -> None:
    import copy

    from woodfisher.checkpoint import atomic_save_json, check_writable, save_checkpoint
    from woodfisher.compare import pruning_batches
    from woodfisher.device import resolve_device
    from woodfisher.pruning import prune as prune_model
    from woodfisher.pruning.patterns import parse_pattern
    from woodfisher.train import evaluate as evaluate_model
    from woodfisher.train import sparsity_report

    dev = resolve_device(device)
    parse_pattern(pattern)
    sparsity = _pattern_sparsity(pattern, sparsity, 0.9)
    shrunk_path = None if out is None else out.with_suffix(".shrunk.safetensors")
    if out is not None and lead:
        check_writable(out)
        check_writable(out.with_suffix(".json"))
        if shrink:
            check_writable(shrunk_path)
    model, info, splits = _checkpoint_and_data(checkpoint, None, data_dir)
    model.to(dev)
    before = evaluate_model(model, splits.test) if lead else None
    grads = num_grads or _DEFAULTS["num_grads"]
    batches = pruning_batches(splits.train, grads * samples_per_grad + 1000, seed)
    pruned = copy.deepcopy(model)
    result = prune_model(
        pruned,
        batches,
        sparsity,
        method=method,
        pattern=pattern,
        target=target,
        update=update,
        scope=scope,
        num_grads=num_grads,
        samples_per_grad=samples_per_grad,
        block_size=block_size,
        **_damp_options(damp, relative_damp),
        recompute=_parse_recompute(recompute),
        recompute_by=recompute_by,
        refresh=refresh,
        layers=layers or None,
        skip=skip or None,
        params=params or None,
        seed=seed,
        progress=not quiet and lead,
    )
    if not lead:
        return  # rank 0 evaluates, prints and writes
    after = evaluate_model(pruned, splits.test)
    report = {
        "checkpoint": str(checkpoint),
        "model": info["model"]["name"],
        "dataset": splits.name,
        "device": str(dev),
        "before": before,
        "after": after,
        "sparsity": sparsity_report(pruned)["sparsity"],
        "prune": result.to_dict(),
    }
    small = None
    if shrink:
        from woodfisher.flops import count_flops
        from woodfisher.shrink import shrink as shrink_model

        example = splits.test.tensors[0][:2]
        small = shrink_model(pruned, example)
        dense_flops = count_flops(model, example)
        report["shrink"] = {
            "params": sum(p.numel() for p in small.parameters()),
            "dense_params": sum(p.numel() for p in model.parameters()),
            "macs": count_flops(small, example).total_macs,
            "dense_macs": dense_flops.total_macs,
            "accuracy": evaluate_model(small, splits.test)["accuracy"],
        }
    if out is not None:
        if small is not None:
            from woodfisher.export import save_shrunk

            save_shrunk(small, info["model"], shrunk_path, info["dataset"])
            report["shrink"]["out"] = str(shrunk_path)
        save_checkpoint(
            out,
            pruned,
            info["model"],
            info["dataset"],
            {
                **info["meta"],
                "pruning": result.to_dict(),
                "test_accuracy": after["accuracy"],
                "test_loss": after["loss"],
            },
        )
        atomic_save_json(report, out.with_suffix(".json"))
        report["out"] = str(out)
    if json_out:
        typer.echo(json.dumps(report))
        return
    console = _stdout()
    table = Table(title=f"{method} ({result.update} update), pattern {result.pattern}, to "
                  f"{result.steps[-1]:.0%} of the {result.target}")
    for col in ("layer", "kind", "shape", "params", "sparsity"):
        table.add_column(col, justify="right" if col in ("params", "sparsity") else "left")
    for layer in result.layers:
        parts = ", ".join(f"{k} {v:.0%}" for k, v in layer.parts.items())
        table.add_row(
            layer.name,
            layer.kind,
            "×".join(map(str, layer.shape)),
            str(layer.numel),
            f"{layer.sparsity:.2%}" + (f" ({parts})" if parts else ""),
        )
    console.print(table)
    if result.skipped:
        console.print(_skipped_summary(result.skipped))
    console.print(
        f"accuracy {before['accuracy']:.2%} -> {after['accuracy']:.2%}, "
        f"loss {before['loss']:.4f} -> {after['loss']:.4f}, overall sparsity "
        f"{result.sparsity:.2%}; phases: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.times.items())
    )
    if result.structure and "flops" in result.structure:
        console.print(f"MACs removed: {result.structure['flops']['removed_fraction']:.2%}; "
                      f"skipped layers: {result.structure['skipped'] or 'none'}")
    if small is not None:
        sh = report["shrink"]
        console.print(
            f"shrunk: {sh['params']} parameters (dense {sh['dense_params']}), {sh['macs']} MACs "
            f"(dense {sh['dense_macs']}), accuracy {sh['accuracy']:.2%}"
        )
    if result.ranks:
        console.print(
            f"{len(result.ranks)} ranks: "
            + "; ".join(
                f"rank {r['rank']} {sum(r['times'].values()):.1f} s, "
                f"peak {r.get('peak_cuda_bytes', r['peak_rss_bytes']) / 2**30:.2f} GiB"
                for r in result.ranks
            )
        )
    if out is not None:
        extra = f" and {shrunk_path}" if small is not None else ""
        console.print(f"wrote {out}, {out.with_suffix('.json')}{extra}")


def _skipped_summary(skipped: dict[str, str]) -> str:
    """One line per reason: how many parameters were left out, and a few of their names."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    lines = [f"not pruned ({len(skipped)} parameters, all listed in the JSON report):"]
    for reason, names in by_reason.items():
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        lines.append(f"  {len(names)} × {reason}: {shown}")
    return "\n".join(lines)


@app.command()
@user_errors
def compare(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to prune.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = (
        "magnitude,diag-fisher,kfac,woodfisher"
    ),
    sparsities: Annotated[
        str | None,
        typer.Option(help="Comma-separated sparsities (default 0.5,...,0.98; N:M: implied)."),
    ] = None,
    pattern: Annotated[str, typer.Option(help=PATTERN_HELP)] = "unstructured",
    target: Annotated[str, typer.Option(help=TARGET_HELP)] = "params",
    update: Annotated[str | None, typer.Option(help=UPDATE_HELP)] = None,
    num_grads: Annotated[int | None, typer.Option(help="Gradients sampled for the Fisher.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Fisher block size.")] = _DEFAULTS[
        "block_size"
    ],
    damp: Annotated[str | None, typer.Option(help=DAMP_HELP)] = None,
    relative_damp: Annotated[float | None, typer.Option(help=RELATIVE_DAMP_HELP)] = None,
    recompute: Annotated[str, typer.Option(help=RECOMPUTE_HELP)] = _DEFAULTS["recompute"],
    seed: Annotated[int, typer.Option(help="Seed of the sample draw.")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help=DATA_DIR_HELP)] = None,
    out: Annotated[Path, typer.Option(help="JSON report to write (and a PNG beside it).")] = Path(
        "compare.json"
    ),
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Prune CHECKPOINT with several methods at several sparsities; table, JSON and plot."""
    from woodfisher.checkpoint import atomic_save_json, check_writable
    from woodfisher.compare import compare as run_compare
    from woodfisher.compare import plot_compare
    from woodfisher.device import resolve_device
    from woodfisher.pruning.patterns import parse_pattern

    dev = resolve_device(device)
    check_writable(out)
    pat = parse_pattern(pattern)
    if sparsities is None:
        sparsities = (
            f"{pat.implied_sparsity}" if pat.kind == "nm" else "0.5,0.7,0.8,0.9,0.95,0.98"
        )
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    model, info, splits = _checkpoint_and_data(checkpoint, None, data_dir)
    model.to(dev)
    options = {
        "update": update,
        "num_grads": num_grads,
        "block_size": block_size,
        **_damp_options(damp, relative_damp),
        "recompute": _parse_recompute(recompute),
        "pattern": pattern,
        "target": target,
    }
    report = run_compare(
        model,
        splits,
        method_list,
        _parse_floats(sparsities, "--sparsities"),
        seed=seed,
        options=options,
        log=_stderr_log(quiet),
    )
    report["checkpoint"] = str(checkpoint)
    report["device"] = str(dev)
    atomic_save_json(report, out)
    png = plot_compare(
        report, out.with_suffix(".png"), title=f"{info['model']['name']} on {splits.name}, one-shot"
    )
    console = _stdout()
    console.print(compare_table(report))
    console.print(f"wrote {out} and {png}")


@app.command()
@user_errors
def gradual(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Trained checkpoint (from `woodfisher train`).")
    ] = None,
    checkpoint_opt: Annotated[
        Path | None, typer.Option("--checkpoint", help="The checkpoint, as an option.")
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(help="Final sparsity of the pruned weights (default 0.9; N:M: implied)."),
    ] = None,
    pattern: Annotated[str, typer.Option(help=PATTERN_HELP)] = "unstructured",
    target: Annotated[str, typer.Option(help=TARGET_HELP)] = "params",
    initial_sparsity: Annotated[float, typer.Option(help="Target of the first step.")] = 0.5,
    epochs: Annotated[int, typer.Option(help="Epochs in all (pruning + fine-tuning).")] = 10,
    start: Annotated[int, typer.Option(help="Epoch of the first pruning step (0-based).")] = 0,
    end: Annotated[
        int | None, typer.Option(help="Epoch of the last pruning step (default ~2/3 in).")
    ] = None,
    prune_every: Annotated[int, typer.Option(help="Epochs between pruning steps.")] = 1,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "woodfisher",
    lr: Annotated[float, typer.Option(help="Peak fine-tuning learning rate (cosine).")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Fine-tuning batch size.")] = 128,
    num_grads: Annotated[
        int | None, typer.Option(help="Gradients per pruning step (default: the method's).")
    ] = None,
    block_size: Annotated[
        int | None, typer.Option(help="Fisher block size (default: the method's).")
    ] = None,
    damp: Annotated[str | None, typer.Option(help=DAMP_HELP)] = None,
    relative_damp: Annotated[float | None, typer.Option(help=GRADUAL_RELATIVE_DAMP_HELP)] = None,
    update: Annotated[str | None, typer.Option(help=UPDATE_HELP)] = None,
    recompute_by: Annotated[str | None, typer.Option(help=RECOMPUTE_BY_HELP)] = None,
    train_subset: Annotated[
        int | None, typer.Option(help="Use only the first N training samples.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output checkpoint (default: CHECKPOINT-gradual.pt); the resume file, "
            "JSON log and PNG plot are written next to it."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT's resume file.")] = False,
    data_dir: Annotated[Path | None, typer.Option(help=DATA_DIR_HELP)] = None,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Prune CHECKPOINT gradually to SPARSITY while fine-tuning with masks; resumable.

    Under ``torchrun --nproc-per-node P -m woodfisher gradual ...`` the pruning steps run over
    the P processes and the fine-tuning is data parallel (DistributedDataParallel); rank 0
    prints and writes.
    """
    _on_ranks(_gradual_command, dict(locals()))


def _gradual_command(
    checkpoint, checkpoint_opt, sparsity, initial_sparsity, epochs, start, end, prune_every,
    method, pattern, target, lr, batch_size, num_grads, block_size, damp, relative_damp, update,
    recompute_by, train_subset, seed, out, resume, data_dir, device, quiet, json_out, lead,
) -> None:
    from woodfisher.device import resolve_device

    dev = resolve_device(device)
    from woodfisher.gradual import run_gradual

    if (checkpoint is None) == (checkpoint_opt is None):
        raise ValueError("give the checkpoint once: as the argument or as --checkpoint")
    from woodfisher.pruning.patterns import parse_pattern

    pat = parse_pattern(pattern)
    sparsity = _pattern_sparsity(pattern, sparsity, 0.9)
    if sparsity is None:
        sparsity = pat.implied_sparsity
    options = {
        "num_grads": num_grads,
        "block_size": block_size,
        "update": update,
        "recompute_by": recompute_by,
        **_damp_options(damp, relative_damp),
        "pattern": None if pattern == "unstructured" else pattern,
        "target": None if target == "params" else target,
    }
    res = run_gradual(
        checkpoint or checkpoint_opt,
        out=out,
        final_sparsity=sparsity,
        initial_sparsity=initial_sparsity,
        epochs=epochs,
        start=start,
        end=end,
        prune_every=prune_every,
        method=method,
        lr=lr,
        batch_size=batch_size,
        prune_options={k: v for k, v in options.items() if v is not None},
        train_subset=train_subset,
        seed=seed,
        resume=resume,
        data_dir=None if data_dir is None else str(data_dir),
        progress=not quiet and lead,
        device=dev,
    )
    if not lead:
        return
    if json_out:
        typer.echo(json.dumps(res))
        return
    _stdout().print(
        f"{res['method']} gradual to {res['sparsity']:.2%} in {res['epochs']} epochs: test "
        f"accuracy {res['accuracy']:.2%} (dense {res['dense_accuracy']:.2%}) -> {res['checkpoint']}"
        f" (log {res['log']}, plot {res['plot']}, resume {res['resume']})"
    )

