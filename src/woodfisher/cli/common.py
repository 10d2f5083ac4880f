"""What every command shares: the app, error handling, output helpers and option help texts.

Bad input (any ``ValueError``, which all woodfisher errors subclass) ends with a one-line
``Error: ...`` on stderr and exit code 2, with no traceback and no partial output file. New
commands get the same behaviour with :func:`user_errors`::

    @app.command()
    @user_errors
    def prune(checkpoint: Path, sparsity: float = 0.9) -> None:
        ...
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from woodfisher.data import DATASETS
from woodfisher.device import DEVICE_HELP
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
EXIT_ENVIRONMENT = 1


@contextmanager
def user_error_context() -> Iterator[None]:
    """Turn errors a user can act on into ``Error: <one line>`` on stderr.

    A ``ValueError`` (bad input) exits with code 2; an ``OSError`` (a full disk, a file that
    cannot be read or written) with code 1. Neither prints a traceback.

    Yields:
        Nothing; wrap the command body in ``with user_error_context():``.

    Raises:
        typer.Exit: With code 2 for ``ValueError``, 1 for ``OSError``.
    """
    try:
        yield
    except ValueError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except OSError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(EXIT_ENVIRONMENT) from None


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
    table = Table(title="prunable weights")
    for col in ("weight", "kind", "shape", "params", "zeros", "sparsity"):
        table.add_column(col, justify="left" if col in ("weight", "kind", "shape") else "right")
    for row in layers:
        table.add_row(
            row["name"],
            row.get("kind", ""),
            "×".join(map(str, row["shape"])),
            str(row["numel"]),
            str(row["zeros"]),
            f"{row['sparsity']:.2%}",
        )
    return table


def _checkpoint_and_data(
    checkpoint: Path, dataset: str | None, data_dir: Path | None
) -> tuple[Any, dict[str, Any], Any]:
    """Load a checkpoint (or a ``.safetensors`` export) and its dataset, normalised as trained."""
    from woodfisher.checkpoint import load_checkpoint
    from woodfisher.data import load_dataset

    if Path(checkpoint).suffix == ".safetensors":
        from woodfisher.export import load_export

        model, info = load_export(checkpoint)
        info.setdefault("meta", {})
    else:
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


# Options every command family uses, as Annotated types so each is declared once.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
DataDir = Annotated[Path | None, typer.Option(help=DATA_DIR_HELP)]
Seed = Annotated[int, typer.Option(help="Seed of every random choice.")]
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]

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

PATTERN_HELP = (
    "Pruning pattern: unstructured, N:M (e.g. 2:4; implies the sparsity), block:RxC (e.g. "
    "block:4x4) or channels (whole output channels, with bias and BatchNorm entries)."
)
TARGET_HELP = (
    "What --sparsity counts: params (fraction of the selected weights) or flops (fraction of "
    "the model's multiply-accumulates, ranking saliency per MAC)."
)


def _pattern_sparsity(pattern: str, sparsity: float | None, default: float) -> float | None:
    """--sparsity for a pattern: N:M implies it (None), others default to ``default``."""
    from woodfisher.pruning.patterns import parse_pattern

    if sparsity is not None:
        return sparsity
    return None if parse_pattern(pattern).kind == "nm" else default


PARAMS_HELP = (
    "Parameter name patterns to prune instead of the default selection (e.g. '*.weight', "
    "'encoder.*.in_proj_weight'); repeat the option for several. Embeddings only this way."
)


RECOMPUTE_BY_HELP = (
    "How the steps get their curvature: downdate (gradients once, each step removes its "
    "weights from the block inverses; fast), resample (fresh gradients and inverses at every "
    "step, the paper's) or auto (the default: downdate when block-size <= 2 x num-grads). "
    "Downdate is the path that runs over several processes under torchrun."
)
REFRESH_HELP = (
    "Downdate path: re-estimate the Fisher at the current weights before each step that "
    "starts with at most this fraction of the weights (0 never; 1, the default, every step: "
    "the paper's recomputation). Fewer refreshes are faster; check the accuracy."
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

