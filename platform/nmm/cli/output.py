"""What every command prints to and how it fails: the two consoles, and the exit codes of the
failures commands share (an unreachable store 129, MLflow 130 or 4, a publish conflict 3)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer
from rich.console import Console

from nmm import exitcodes

# Errors and warnings are never hard-wrapped (soft_wrap): a message split at column 120 can no longer be
# grepped or pasted, and where the split falls depends on the length of the paths in it.
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 120)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)

EXIT_BAD_INPUT = exitcodes.BAD_INPUT


@contextlib.contextmanager
def exits() -> Iterator[None]:
    """An unreachable store or tracking server as one line and its retryable exit code, not a traceback."""
    from nmm.lineage import TrackingError
    from nmm.storage import PublishConflict, StorageError

    try:
        yield
    except PublishConflict as exc:  # another writer's outputs are there: retrying will not help
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.CONFLICT) from None
    except StorageError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.STORE_UNAVAILABLE) from None
    except TrackingError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None
