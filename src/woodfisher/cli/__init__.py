"""The ``woodfisher`` command line: thin typer wrappers around the library.

Results go to stdout, progress and status to stderr. One module per command family; each
registers its commands on the shared :data:`app` when imported here. Errors and shared options
live in :mod:`woodfisher.cli.common`.
"""

# Import order is the order of `woodfisher --help`.
from woodfisher.cli import training, pruning, study, qubo, structured, lowrank, frequency  # noqa: F401, I001
from woodfisher.cli import storage  # noqa: F401, I001  (registers the command)
from woodfisher.cli import scale  # noqa: F401, I001  (registers the command)
from woodfisher.cli import longtail  # noqa: F401, I001  (registers the command)
from woodfisher.cli.common import app, user_error_context, user_errors

__all__ = ["app", "main", "user_error_context", "user_errors"]


def main() -> None:  # pragma: no cover - console entry for `python -m woodfisher.cli`
    """Run the app."""
    app()
