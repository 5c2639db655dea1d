"""Helpers shared by command modules: turning library errors into one clear line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import typer


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Print expected errors as ``error: <message>`` and exit 2, instead of a stack trace."""
    try:
        yield
    except (ValueError, FileNotFoundError, *kinds) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def report_skipped(skipped: Sequence[tuple[str, str]], folder: str | Path) -> None:
    """List skipped files on the console and in ``folder/skipped.csv`` (``path,reason``)."""
    if not skipped:
        return
    import pandas as pd

    from histoclass.data.manifest import write_manifest

    write_manifest(pd.DataFrame(list(skipped), columns=["path", "reason"]),
                   Path(folder) / "skipped.csv")
    typer.secho(f"skipped {len(skipped)} file(s):", fg=typer.colors.YELLOW)
    for path, reason in skipped:
        typer.echo(f"  {path}: {reason}")
