"""``longtail``: which examples compressed models lose, against memorization."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from woodfisher.cli.common import (
    DataDir,
    JsonOut,
    Quiet,
    Seed,
    _checkpoint_and_data,
    _parse_floats,
    _stderr_log,
    app,
    user_errors,
)

COMPRESSED_HELP = (
    "Compressed checkpoints of DENSE's architecture and dataset, comma-separated: one arm "
    "(e.g. several seeds of one method). Repeat the option for more arms."
)
CONTROL_HELP = (
    "Dense checkpoints trained from other seeds (comma-separated): the reseed control, analysed "
    "like an arm so seed noise is not taken for a compression effect."
)
MEMORIZATION_HELP = (
    "Runs of the Feldman-Zhang estimate (>= 2; 100 or more for usable scores), or a "
    "memorization.pt written by an earlier call. Runs are saved under OUT/memorization_runs "
    "as they finish; calling again resumes."
)


def _arm_name(infos: list[dict[str, Any]], paths: list[Path]) -> str:
    """``method sparsity`` from the pruning record (else the file name), ×count for seeds."""
    bases = []
    for info, path in zip(infos, paths, strict=True):
        meta = info["meta"] if isinstance(info["meta"], dict) else {}
        pruning = meta.get("pruning")
        if isinstance(pruning, dict) and "method" in pruning and "sparsity" in pruning:
            base = f"{pruning['method']} {100 * float(pruning['sparsity']):.0f}%"
        else:
            base = path.stem
        if base not in bases:
            bases.append(base)
    if len(bases) > 1:
        return " + ".join(bases)
    return bases[0] if len(paths) == 1 else f"{bases[0]} (×{len(paths)})"


def _same_kind(dense: dict[str, Any], other: dict[str, Any], path: Path, dense_path: Path) -> None:
    keys = ("name", "input_shape", "num_classes", "kwargs")
    a = {k: dense["model"].get(k) for k in keys}
    b = {k: other["model"].get(k) for k in keys}
    if a != b:
        raise ValueError(f"{path} is a {b['name']} {b['input_shape']}→{b['num_classes']} "
                         f"(kwargs {b['kwargs']}), but {dense_path} is a {a['name']} "
                         f"{a['input_shape']}→{a['num_classes']} (kwargs {a['kwargs']}); compare "
                         "compressed versions of the same architecture")
    da, db = dense["dataset"].get("dataset"), other["dataset"].get("dataset")
    if da != db:
        raise ValueError(f"{path} was trained on {db!r} but {dense_path} on {da!r}; compare "
                         "checkpoints of the same dataset")


def _split_paths(text: str) -> list[Path]:
    paths = [Path(p.strip()) for p in text.split(",") if p.strip()]
    if not paths:
        raise ValueError(f"expected comma-separated checkpoint paths, got {text!r}")
    return paths


@app.command()
@user_errors
def longtail(
    dense: Annotated[Path, typer.Argument(help="The dense (uncompressed) checkpoint.")],
    compressed: Annotated[list[str], typer.Option(help=COMPRESSED_HELP)],
    memorization: Annotated[str, typer.Option(help=MEMORIZATION_HELP)] = "100",
    out: Annotated[Path, typer.Option(help="Report directory (JSON, plots, image grids).")] = (
        Path("longtail")
    ),
    control: Annotated[str | None, typer.Option(help=CONTROL_HELP)] = None,
    train_subset: Annotated[int, typer.Option(
        help="Training examples to score (a seeded random subset of the training split).")] = 2000,
    test_subset: Annotated[int | None, typer.Option(
        help="Test examples to compare on (default: the whole test split).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of each memorization run.")] = 30,
    subset: Annotated[float, typer.Option(help="Fraction each run trains on.")] = 0.7,
    workers: Annotated[int | None, typer.Option(
        help="Processes for the runs (default: CPU count).")] = None,
    bins: Annotated[str, typer.Option(help="Memorization bin cut points.")] = "0.05,0.25,0.5",
    proxies: Annotated[bool, typer.Option(
        help="Also rank the scores with one-model proxies (WoodFisher self-influence, ...).")
    ] = True,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates of AUROC intervals.")] = 1000,
    seed: Seed = 0,
    data_dir: DataDir = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Which examples COMPRESSED models of DENSE lose, and are they the memorized ones?

    Scores a subset of the training examples with Feldman & Zhang's memorization estimate
    (models of DENSE's architecture trained on random 70 % subsets), finds the examples where
    each arm's modal prediction differs from DENSE's, and tests how that relates to
    memorization (binned rates, AUROC, Mann-Whitney, Spearman, a margin-controlled logistic
    regression), against an optional dense-reseed control; per-class recall changes with Welch
    tests and Benjamini-Hochberg. Writes OUT/longtail.json, two plots and image grids.
    """
    import functools

    import torch

    from woodfisher.checkpoint import check_writable, load_checkpoint
    from woodfisher.longtail import Memorization, mismatch_analysis, proxy_scores, rank_agreement
    from woodfisher.longtail import memorization as estimate_memorization
    from woodfisher.longtail.mismatch import check_bins
    from woodfisher.longtail.report import summary_table, to_json, write_report
    from woodfisher.models import build_model

    log = _stderr_log(quiet)
    cuts = _parse_floats(bins, "--bins")
    if train_subset < 1 or (test_subset is not None and test_subset < 1):
        raise ValueError(f"--train-subset and --test-subset must be positive, got "
                         f"{train_subset} and {test_subset}")
    check_bins(cuts, train_subset)
    runs: int | None = None
    mem_file: Path | None = None
    if memorization.strip().lstrip("-").isdigit():
        runs = int(memorization)
        if runs < 2:
            raise ValueError(f"--memorization must be >= 2 runs (or a memorization.pt), got "
                             f"{runs}")
    else:
        mem_file = Path(memorization)
        if not mem_file.is_file():
            raise ValueError(f"--memorization {memorization!r} is neither a number of runs nor "
                             "an existing memorization.pt; give e.g. --memorization 100")
    model, info, splits = _checkpoint_and_data(dense, None, data_dir)
    arms_paths = [_split_paths(text) for text in compressed]
    control_paths = _split_paths(control) if control else []
    loaded: list[list[tuple[Any, dict[str, Any]]]] = []
    for paths in arms_paths:
        arm = []
        for path in paths:
            m, i = load_checkpoint(path)
            _same_kind(info, i, path, dense)
            arm.append((m, i))
        loaded.append(arm)
    controls = []
    for path in control_paths:
        m, i = load_checkpoint(path)
        _same_kind(info, i, path, dense)
        controls.append(m)
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out / "longtail.json")

    Xall, yall = splits.train.tensors
    if train_subset > len(Xall):
        raise ValueError(f"--train-subset {train_subset} exceeds the {len(Xall)} training "
                         "examples")
    order = torch.randperm(len(Xall), generator=torch.Generator().manual_seed(seed))
    X, y = Xall[order[:train_subset]], yall[order[:train_subset]]
    Xt, yt = splits.test.tensors
    if test_subset is not None:
        Xt, yt = Xt[:test_subset], yt[:test_subset]
    spec = info["model"]
    scope = {"dataset": splits.name, "train_subset": train_subset, "seed": seed,
             "model": spec["name"], "test_examples": len(yt)}
    if mem_file is not None:
        mem = Memorization.load(mem_file)
        found = {k: mem.options.get(k) for k in scope}
        if found != scope:
            raise ValueError(f"{mem_file} scores other examples or another model ({found}); "
                             f"this call needs {scope}; rerun with --memorization RUNS")
    else:
        log(f"memorization: {runs} runs of {spec['name']} on {train_subset} examples "
            f"({subset:.0%} each, {epochs} epochs)")
        builder = functools.partial(build_model, spec["name"], tuple(spec["input_shape"]),
                                    int(spec["num_classes"]), **spec.get("kwargs", {}))
        mem = estimate_memorization(X, y, model=builder, runs=runs, subset=subset, epochs=epochs,
                                    seed=seed, test=(Xt, yt), workers=workers,
                                    run_dir=out / "memorization_runs", progress=not quiet)
        mem.options.update(scope)
        mem.save(out / "memorization.pt")
    log("comparing predictions")
    names: list[str] = []
    for paths, arm in zip(arms_paths, loaded, strict=True):
        name = _arm_name([i for _, i in arm], paths)
        while name in names:
            name += "'"
        names.append(name)
    analysis = mismatch_analysis(
        [model], {n: [m for m, _ in arm] for n, arm in zip(names, loaded, strict=True)},
        (X, y), (Xt, yt), mem, control=controls or None, bins=cuts, bootstrap=bootstrap,
        seed=seed)
    extra: dict[str, Any] = {"dense": str(dense), "compressed": [[str(p) for p in a]
                                                                for a in arms_paths],
                             "control": [str(p) for p in control_paths],
                             "memorization": mem.to_dict()}
    if proxies:
        log("proxies: self-influence with the WoodFisher, diagonal and identity curvature")
        scores = proxy_scores(model, X, y, seed=seed)
        extra["proxies"] = rank_agreement(scores, mem.scores)
    paths = write_report(analysis, out, X, y, splits.name, extra=extra)
    if json_out:
        typer.echo(json.dumps(to_json({**extra, "analysis": analysis,
                                       "files": {k: str(v) for k, v in paths.items()}})))
        return
    console = Console(file=sys.stdout, soft_wrap=True,
                      width=None if sys.stdout.isatty() else 200)
    console.print(summary_table(analysis))
    summary = mem.to_dict()
    console.print(f"memorization: {summary['runs']} runs, fit {summary['fit']:.1%}, held-out "
                  f"accuracy {summary['held_out_accuracy']:.1%}, median SE "
                  f"{summary['median_stderr']:.3f}")
    if proxies:
        for name, row in extra["proxies"].items():
            console.print(f"proxy {name}: Spearman {row['spearman']:.3f}, AUROC top decile "
                          f"{row['auroc_top']:.3f}")
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
