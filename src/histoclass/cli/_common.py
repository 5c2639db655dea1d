"""Helpers shared by command modules: turning library errors into one clear line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import typer


def error_line(exc: BaseException) -> str:
    """The one line a user reads for an expected error; an ``OSError`` (read-only folder,
    full disk, a folder where a file should be) names its path."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename and str(exc.filename) not in exc.strerror else None
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc)


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Print expected errors as ``error: <message>`` and exit 2, instead of a stack trace."""
    try:
        yield
    except (ValueError, OSError, *kinds) as exc:
        typer.secho(f"error: {error_line(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def report_skipped(skipped: Sequence[tuple[str, str]], output: str | Path) -> Path | None:
    """List skipped files on the console and in ``<output stem>.skipped.csv`` (``path,reason``)
    beside the file ``output`` they were left out of; returns that path (``None``: nothing
    skipped)."""
    if not skipped:
        return None
    import pandas as pd

    from histoclass.data.manifest import skip_list_path, write_manifest

    path = write_manifest(pd.DataFrame(list(skipped), columns=["path", "reason"]),
                          skip_list_path(output))
    typer.secho(f"skipped {len(skipped)} file(s) (listed in {path}):", fg=typer.colors.YELLOW)
    for item, reason in skipped:
        typer.echo(f"  {item}: {reason}")
    return path
