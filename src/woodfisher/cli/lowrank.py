"""``lowrank``: factorise a checkpoint's layers under a budget, fine-tune, prune, quantize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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

RULES_HELP = (
    "Rank rule: uniform, energy, erank, l1, fisher (ours: least Fisher-predicted loss), rene "
    "(RENE's search); or one integer rank for every layer."
)


def _parse_ranks(text: str) -> str | int:
    try:
        return int(text)
    except ValueError:
        return text


def _layer_table(rows: list[dict], skipped: list[dict]) -> Table:
    table = Table(title="factorised layers")
    for col in ("layer", "method", "rank", "params", "MACs", "erank", "rel. error"):
        table.add_column(col, justify="left" if col in ("layer", "method") else "right")
    for r in rows:
        table.add_row(
            r["name"], r["method"], "×".join(map(str, r["ranks"])),
            f"{r['params']}/{r['dense_params']}", f"{r['macs']}/{r['dense_macs']}",
            f"{r['erank']:.1f}/{r['full_rank']}", f"{r['rel_error']:.3f}",
        )
    for s in skipped:
        table.add_row(s["name"], "dense", "-", "-", "-", "-", s["reason"])
    return table


@app.command()
@user_errors
def lowrank(
    checkpoint: Annotated[Path, typer.Argument(help="Trained checkpoint to factorise.")],
    params: Annotated[
        float | None, typer.Option(help="Fraction of the selected layers' weights to keep.")
    ] = None,
    flops: Annotated[
        float | None, typer.Option(help="Fraction of the selected layers' MACs to keep.")
    ] = None,
    method: Annotated[
        str, typer.Option(help="Convolutions: svd, tucker2 or cp (Linear layers use SVD).")
    ] = "tucker2",
    ranks: Annotated[str, typer.Option(help=RULES_HELP)] = "uniform",
    weighting: Annotated[
        str | None, typer.Option(help="'fisher' for Fisher-weighted decompositions.")
    ] = None,
    curvature: Annotated[
        str, typer.Option(help="Fisher of the fisher rule: diagonal or woodfisher.")
    ] = "diagonal",
    num_grads: Annotated[int, typer.Option(help="Gradients sampled for the Fisher.")] = 256,
    num_samples: Annotated[
        int, typer.Option(help="Training samples held out for the fisher/rene rules.")
    ] = 1024,
    finetune: Annotated[
        int, typer.Option(help="Epochs of fine-tuning with distillation (0: none).")
    ] = 0,
    lr: Annotated[float, typer.Option(help="Peak fine-tuning learning rate.")] = 1e-2,
    lam: Annotated[
        float, typer.Option(help="Weight of reconstruction + layer-output distillation.")
    ] = 0.5,
    train_subset: Annotated[
        int | None, typer.Option(help="Fine-tune on the first N training samples only.")
    ] = None,
    prune: Annotated[
        float | None, typer.Option(help="Then prune the factors to this sparsity (WoodFisher).")
    ] = None,
    bits: Annotated[int | None, typer.Option(help="Then quantize the weights (1..16).")] = None,
    layers: Annotated[list[str] | None, typer.Option(help="Module name patterns.")] = None,
    skip: Annotated[list[str] | None, typer.Option(help="Module name patterns to skip.")] = None,
    min_weights: Annotated[int, typer.Option(help="Smaller layers stay dense.")] = 512,
    keep_classifier: Annotated[
        bool, typer.Option(help="Keep the output layer dense (RENE's default).")
    ] = True,
    resume: Annotated[
        bool, typer.Option(help="Continue a killed --finetune run from OUT.resume.pt.")
    ] = False,
    seed: Seed = 0,
    data_dir: DataDir = None,
    out: Annotated[
        Path | None, typer.Option(help="Factorised checkpoint to write (and OUT.json).")
    ] = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Factorise CHECKPOINT's layers to a parameter or FLOP budget; report and save."""
    import torch

    from woodfisher.checkpoint import atomic_save_json, check_writable, save_checkpoint
    from woodfisher.compare import pruning_batches
    from woodfisher.flops import count_flops
    from woodfisher.lowrank import checkpoint_spec, decompose
    from woodfisher.lowrank.size import quantize, size_bits
    from woodfisher.lowrank.training import finetune as finetune_model
    from woodfisher.quant import check_bits
    from woodfisher.train import evaluate

    if out is not None:
        check_writable(out)
        check_writable(out.with_suffix(".json"))
    if bits is not None:
        check_bits(bits, "--bits")
    if prune is not None and not 0 <= prune < 1:
        raise ValueError(f"--prune must be a sparsity in [0, 1), got {prune}")
    if finetune < 0:
        raise ValueError(f"--finetune must be >= 0 epochs, got {finetune}")
    if resume and (out is None or not finetune):
        raise ValueError("--resume continues a --finetune run from OUT.resume.pt: give "
                         "--finetune N and the same --out as the killed run")
    resume_path = out.with_suffix(".resume.pt") if out is not None and finetune else None
    if resume_path is not None:
        check_writable(resume_path)
    log = _stderr_log(quiet)
    model, info, splits = _checkpoint_and_data(checkpoint, None, data_dir)
    if params is None and flops is None and isinstance(_parse_ranks(ranks), str):
        params = 0.5
    held_out = pruning_batches(splits.train, num_samples, seed)
    example = torch.zeros(1, *splits.input_shape)
    small = decompose(
        model, params=params, flops=flops, method=method, ranks=_parse_ranks(ranks),
        data=held_out, weighting=weighting, layers=layers or None, skip=skip or None,
        min_weights=min_weights, keep_classifier=keep_classifier, curvature=curvature,
        num_grads=num_grads, seed=seed, progress=not quiet,
    )
    dense_eval = evaluate(model, splits.test)
    report = {
        "checkpoint": str(checkpoint), "model": info["model"]["name"], "dataset": splits.name,
        "dense": dense_eval, "lowrank": small.lowrank, "seed": seed,
        "decomposed": evaluate(small, splits.test),
    }
    if finetune:
        data = splits.train
        if train_subset is not None:
            data = torch.utils.data.TensorDataset(*(t[:train_subset] for t in data.tensors))
        log(f"fine-tuning {finetune} epochs with distillation (lam={lam}, lr={lr})")
        report["finetune"] = finetune_model(small, model, data, finetune, lr=lr, lam=lam,
                                            seed=seed, progress=not quiet,
                                            resume_path=resume_path, resume=resume)
        report["finetuned"] = evaluate(small, splits.test)
    if prune is not None:
        from woodfisher.pruning import prune as prune_model

        names = [row["name"] for row in small.lowrank["layers"]]
        log(f"pruning the factors to {prune:.0%} (WoodFisher)")
        res = prune_model(small, held_out, prune, layers=[f"{n}.*" for n in names], seed=seed,
                          progress=not quiet)
        report["prune"] = res.to_dict()
        report["pruned"] = evaluate(small, splits.test)
    if bits is not None:
        quantize(small, bits)
        report["quantized"] = {"bits": bits, **evaluate(small, splits.test)}
    report["size"] = {"dense": size_bits(model), "compressed": size_bits(small, bits)}
    report["flops"] = {"dense": count_flops(model, example).total_macs,
                       "compressed": count_flops(small, example).nonzero_macs}
    final = evaluate(small, splits.test)
    report["final"] = final
    if out is not None:
        spec = checkpoint_spec(small, info["model"])
        meta = {**info["meta"], "lowrank": small.lowrank, "test_accuracy": final["accuracy"],
                "test_loss": final["loss"]}
        save_checkpoint(out, small, spec, info["dataset"], meta)
        atomic_save_json(report, out.with_suffix(".json"))
        report["out"] = str(out)
    if json_out:
        typer.echo(json.dumps(report, default=str))
        return
    console = _stdout()
    console.print(_layer_table(small.lowrank["layers"], small.lowrank["skipped"]))
    stages = [("dense", dense_eval), ("decomposed", report["decomposed"])]
    stages += [(k, report[k]) for k in ("finetuned", "pruned", "quantized") if k in report]
    console.print("accuracy: " + ", ".join(f"{k} {v['accuracy']:.2%}" for k, v in stages))
    lr_rep = small.lowrank
    console.print(
        f"selected layers keep {lr_rep['params_fraction']:.1%} of their weights and "
        f"{lr_rep['flops_fraction']:.1%} of their MACs; model "
        f"{report['size']['compressed']['bits'] / 8192:.1f} KiB vs "
        f"{report['size']['dense']['bits'] / 8192:.1f} KiB, "
        f"{report['flops']['compressed']} vs {report['flops']['dense']} MACs per example"
    )
    if out is not None:
        console.print(f"wrote {out} and {out.with_suffix('.json')}")
