"""The ``woodfisher`` command line: thin typer wrappers around the library.

Results go to stdout, progress and status to stderr. Bad input (any ``ValueError``, which all
woodfisher errors subclass) ends with a one-line ``Error: ...`` on stderr and exit code 2, with
no traceback and no partial output file. New commands get the same behaviour with
:func:`user_errors`::

    @app.command()
    @user_errors
    def prune(checkpoint: Path, sparsity: float = 0.9) -> None:
        ...
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from woodfisher.compare import compare_table
from woodfisher.data import DATASETS
from woodfisher.gradual import GRADUAL_RELATIVE_DAMP
from woodfisher.models import MODELS
from woodfisher.pruning.methods import DEFAULTS as _DEFAULTS
from woodfisher.pruning.methods import METHODS as _METHODS

__all__ = ["app", "user_errors", "user_error_context"]

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="woodfisher",
    help="Compress neural networks with second-order information (WoodFisher).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

EXIT_BAD_INPUT = 2


@contextmanager
def user_error_context() -> Iterator[None]:
    """Turn a ``ValueError`` into ``Error: <one line>`` on stderr and exit code 2.

    Yields:
        Nothing; wrap the command body in ``with user_error_context():``.

    Raises:
        typer.Exit: With code 2 when the body raised ``ValueError``.
    """
    try:
        yield
    except ValueError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def user_errors(fn: F) -> F:
    """Decorator form of :func:`user_error_context` for typer commands.

    Args:
        fn: The command function (its signature is kept for typer).

    Returns:
        The wrapped function.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_error_context():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _stdout() -> Console:
    return Console(file=sys.stdout, soft_wrap=True)


def _stderr_log(quiet: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if not quiet:
            typer.echo(msg, err=True)

    return log


def _layer_table(layers: list[dict[str, Any]]) -> Table:
    table = Table(title="weights of Linear/Conv layers")
    for col in ("layer", "shape", "params", "zeros", "sparsity"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for row in layers:
        table.add_row(
            row["name"],
            "×".join(map(str, row["shape"])),
            str(row["numel"]),
            str(row["zeros"]),
            f"{row['sparsity']:.2%}",
        )
    return table


def _checkpoint_and_data(
    checkpoint: Path, dataset: str | None, data_dir: Path | None
) -> tuple[Any, dict[str, Any], Any]:
    """Load a checkpoint and its dataset (or ``dataset``), normalised as it was trained."""
    from woodfisher.checkpoint import load_checkpoint
    from woodfisher.data import load_dataset

    model, info = load_checkpoint(checkpoint)
    saved = info["dataset"]
    name = dataset or saved.get("dataset")
    if not name:
        raise ValueError(
            f"checkpoint {checkpoint} names no dataset; pass --dataset "
            f"({', '.join(sorted(DATASETS))})"
        )
    same = name == saved.get("dataset") and "mean" in saved
    splits = load_dataset(
        name,
        data_dir=None if data_dir is None else str(data_dir),
        normalisation=saved if same else None,
    )
    return model, info, splits


MODEL_HELP = f"Model name: {', '.join(sorted(MODELS))}."
DATASET_HELP = f"Dataset name: {', '.join(sorted(DATASETS))}."
DATA_DIR_HELP = (
    "Directory with the Fashion-MNIST IDX files (default: $WOODFISHER_DATA, "
    "then /usr/share/datasets/fashion-mnist)."
)


@app.command()
@user_errors
def train(
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "mlpnet",
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)] = "fashion-mnist",
    seed: Annotated[int, typer.Option(help="Seed of initialisation and shuffling.")] = 0,
    # 10 epochs of SGD+momentum, cosine lr 0.05, batch 128: MLPNet reaches ~89.8 % test accuracy
    # on Fashion-MNIST in ~10 s of training on 2 CPU cores.
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 0.05,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="L2 penalty.")] = 1e-4,
    schedule: Annotated[str, typer.Option(help="cosine, step or constant.")] = "cosine",
    data_dir: Annotated[Path | None, typer.Option(help=DATA_DIR_HELP)] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Checkpoint file to write (default: runs/MODEL-DATASET-seedSEED.pt)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Train MODEL on DATASET, evaluate on the test split and write a checkpoint to OUT."""
    from woodfisher.train import train_and_save

    default_out = out is None
    if default_out:
        out = Path("runs") / f"{model}-{dataset}-seed{seed}.pt"
    _, info = train_and_save(
        model,
        dataset,
        out=str(out),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        data_dir=None if data_dir is None else str(data_dir),
        progress=not quiet,
        create_dir=default_out,
    )
    meta = info["meta"]
    result = {
        "checkpoint": str(out),
        "model": model,
        "dataset": dataset,
        "seed": seed,
        "epochs": epochs,
        "accuracy": meta["test_accuracy"],
        "loss": meta["test_loss"],
        "train_time_s": meta["time_s"],
    }
    if json_out:
        typer.echo(json.dumps(result))
        return
    _stdout().print(
        f"{model} on {dataset}: test accuracy {result['accuracy']:.2%}, "
        f"loss {result['loss']:.4f}, trained {epochs} epochs in {result['train_time_s']:.1f} s "
        f"-> {out}"
    )


@app.command()
@user_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `woodfisher train`.")],
    dataset: Annotated[
        str | None, typer.Option(help="Evaluate on this dataset instead of the checkpoint's.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help=DATA_DIR_HELP)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print test accuracy, loss and per-layer sparsity of CHECKPOINT."""
    from woodfisher.train import evaluate as evaluate_model
    from woodfisher.train import sparsity_report

    model, info, splits = _checkpoint_and_data(checkpoint, dataset, data_dir)
    name = splits.name
    result = evaluate_model(model, splits.test)
    report = sparsity_report(model)
    out = {
        "checkpoint": str(checkpoint),
        "model": info["model"]["name"],
        "dataset": name,
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "n": result["n"],
        "sparsity": report["sparsity"],
        "zeros": report["zeros"],
        "numel": report["numel"],
        "layers": report["layers"],
    }
    if json_out:
        typer.echo(json.dumps(out))
        return
    console = _stdout()
    console.print(
        f"{out['model']} on {name} (test, {result['n']} samples): accuracy "
        f"{result['accuracy']:.2%}, loss {result['loss']:.4f}, "
        f"sparsity {report['sparsity']:.2%}"
    )
    console.print(_layer_table(report["layers"]))


@app.command()
@user_errors
def demo(
    out_dir: Annotated[Path, typer.Option(help="Where the checkpoint is cached.")] = Path(
        "runs/demo"
    ),
    dataset: Annotated[
        str | None,
        typer.Option(
            help="fashion-mnist or digits (default: Fashion-MNIST if "
            "its files are found, else digits)."
        ),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help=DATA_DIR_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default per dataset).")] = (
        None
    ),
    retrain: Annotated[bool, typer.Option(help="Ignore a cached checkpoint.")] = False,
    prune: Annotated[bool, typer.Option(help="Compare pruning methods after training.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Train (or reuse) MLPNet, then prune it one-shot with four methods at 50-98 %."""
    from woodfisher.demo import run_demo

    res = run_demo(
        out_dir,
        dataset=dataset,
        epochs=epochs,
        seed=seed,
        data_dir=None if data_dir is None else str(data_dir),
        retrain=retrain,
        prune=prune,
        progress=not quiet,
        log=_stderr_log(quiet),
    )
    if json_out:
        typer.echo(json.dumps(res))
        return
    console = _stdout()
    how = "cached" if res["reused"] else "trained"
    console.print(
        f"{res['model']} on {res['dataset']} ({how}, {res['epochs']} epochs, "
        f"{res['train_time_s']:.1f} s training): test accuracy {res['accuracy']:.2%}, "
        f"loss {res['loss']:.4f}"
    )
    console.print(f"checkpoint: {res['checkpoint']}")
    if res["comparison"] is not None:
        console.print(compare_table(res["comparison"]))
        console.print(f"wrote {res['report']} and {res['plot']}")


def _damp_options(damp: str | None, relative_damp: float | None) -> dict[str, object]:
    """``--damp`` and ``--relative-damp`` as prune()'s ``damp`` and ``relative_damp``."""
    if damp is None or damp in ("auto", "relative"):
        parsed = None if damp in (None, "relative") else "auto"
    else:
        try:
            parsed = float(damp)
        except ValueError:
            raise ValueError(
                f"--damp must be a positive number, 'auto' or 'relative', got {damp!r}"
            ) from None
    if relative_damp is not None and damp is not None:
        raise ValueError("give --damp or --relative-damp, not both")
    return {"damp": parsed, "relative_damp": relative_damp}


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


METHOD_HELP = "Pruning method: " + ", ".join(sorted(_METHODS)) + "."
UPDATE_HELP = (
    "Weight update: none, independent (the paper's summed single-weight OBS steps) or "
    "joint (exact OBS per block). Default: joint for second-order methods."
)
DAMP_HELP = (
    "Dampening of the Fisher: a number (absolute), 'relative' (--relative-damp x its mean "
    "diagonal, the default) or 'auto' (pick by held-out loss)."
)
_RELATIVE_DAMP_WHAT = "Damp as a multiple of the Fisher's mean diagonal, recomputed at every step"
RELATIVE_DAMP_HELP = (
    f"{_RELATIVE_DAMP_WHAT} (default {_DEFAULTS['relative_damp']:g}; not for kfac)."
)
GRADUAL_RELATIVE_DAMP_HELP = (
    f"{_RELATIVE_DAMP_WHAT} (default {GRADUAL_RELATIVE_DAMP:g} for woodfisher and woodtaylor, "
    f"chosen on a validation split; {_DEFAULTS['relative_damp']:g} for diag-fisher; not for kfac)."
)

RECOMPUTE_HELP = (
    "Steps to reach the target with fresh curvature between them, or 'auto' (no "
    "step removes more than a quarter of the remaining weights)."
)


def _parse_recompute(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"--recompute must be a positive integer or 'auto', got {text!r}"
        ) from None


@app.command()
@user_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to prune.")],
    sparsity: Annotated[float, typer.Option(help="Fraction of selected weights to zero.")] = 0.9,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "woodfisher",
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
    layers: Annotated[list[str] | None, typer.Option(help="Module name patterns to prune.")] = None,
    skip: Annotated[list[str] | None, typer.Option(help="Module name patterns to skip.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample draw.")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help=DATA_DIR_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="Pruned checkpoint to write (and OUT.json).")] = (
        None
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Prune CHECKPOINT one-shot; print a table and write the pruned model and a JSON report."""
    import copy

    from woodfisher.checkpoint import atomic_save_json, check_writable, save_checkpoint
    from woodfisher.compare import pruning_batches
    from woodfisher.pruning import prune as prune_model
    from woodfisher.train import evaluate as evaluate_model
    from woodfisher.train import sparsity_report

    if out is not None:
        check_writable(out)
        check_writable(out.with_suffix(".json"))
    model, info, splits = _checkpoint_and_data(checkpoint, None, data_dir)
    before = evaluate_model(model, splits.test)
    grads = num_grads or _DEFAULTS["num_grads"]
    batches = pruning_batches(splits.train, grads * samples_per_grad + 1000, seed)
    pruned = copy.deepcopy(model)
    result = prune_model(
        pruned,
        batches,
        sparsity,
        method=method,
        update=update,
        scope=scope,
        num_grads=num_grads,
        samples_per_grad=samples_per_grad,
        block_size=block_size,
        **_damp_options(damp, relative_damp),
        recompute=_parse_recompute(recompute),
        layers=layers or None,
        skip=skip or None,
        seed=seed,
        progress=not quiet,
    )
    after = evaluate_model(pruned, splits.test)
    report = {
        "checkpoint": str(checkpoint),
        "model": info["model"]["name"],
        "dataset": splits.name,
        "before": before,
        "after": after,
        "sparsity": sparsity_report(pruned)["sparsity"],
        "prune": result.to_dict(),
    }
    if out is not None:
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
    table = Table(title=f"{method} ({result.update} update) to {sparsity:.0%}")
    for col in ("layer", "shape", "params", "sparsity"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for layer in result.layers:
        table.add_row(
            layer.name, "×".join(map(str, layer.shape)), str(layer.numel), f"{layer.sparsity:.2%}"
        )
    console.print(table)
    console.print(
        f"accuracy {before['accuracy']:.2%} -> {after['accuracy']:.2%}, "
        f"loss {before['loss']:.4f} -> {after['loss']:.4f}, overall sparsity "
        f"{result.sparsity:.2%}; phases: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.times.items())
    )
    if out is not None:
        console.print(f"wrote {out} and {out.with_suffix('.json')}")


@app.command()
@user_errors
def compare(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to prune.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = (
        "magnitude,diag-fisher,kfac,woodfisher"
    ),
    sparsities: Annotated[str, typer.Option(help="Comma-separated sparsities.")] = (
        "0.5,0.7,0.8,0.9,0.95,0.98"
    ),
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Prune CHECKPOINT with several methods at several sparsities; table, JSON and plot."""
    from woodfisher.checkpoint import atomic_save_json, check_writable
    from woodfisher.compare import compare as run_compare
    from woodfisher.compare import plot_compare

    check_writable(out)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    model, info, splits = _checkpoint_and_data(checkpoint, None, data_dir)
    options = {
        "update": update,
        "num_grads": num_grads,
        "block_size": block_size,
        **_damp_options(damp, relative_damp),
        "recompute": _parse_recompute(recompute),
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
    atomic_save_json(report, out)
    png = plot_compare(
        report, out.with_suffix(".png"), title=f"{info['model']['name']} on {splits.name}, one-shot"
    )
    console = _stdout()
    console.print(compare_table(report))
    console.print(f"wrote {out} and {png}")


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


@app.command()
@user_errors
def gradual(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Trained checkpoint (from `woodfisher train`).")
    ] = None,
    checkpoint_opt: Annotated[
        Path | None, typer.Option("--checkpoint", help="The checkpoint, as an option.")
    ] = None,
    sparsity: Annotated[float, typer.Option(help="Final sparsity of the pruned weights.")] = 0.9,
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Prune CHECKPOINT gradually to SPARSITY while fine-tuning with masks; resumable."""
    from woodfisher.gradual import run_gradual

    if (checkpoint is None) == (checkpoint_opt is None):
        raise ValueError("give the checkpoint once: as the argument or as --checkpoint")
    options = {
        "num_grads": num_grads,
        "block_size": block_size,
        "update": update,
        **_damp_options(damp, relative_damp),
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
        progress=not quiet,
    )
    if json_out:
        typer.echo(json.dumps(res))
        return
    _stdout().print(
        f"{res['method']} gradual to {res['sparsity']:.2%} in {res['epochs']} epochs: test "
        f"accuracy {res['accuracy']:.2%} (dense {res['dense_accuracy']:.2%}) -> {res['checkpoint']}"
        f" (log {res['log']}, plot {res['plot']}, resume {res['resume']})"
    )


def main() -> None:  # pragma: no cover - console entry for `python -m woodfisher.cli`
    """Run the app."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
