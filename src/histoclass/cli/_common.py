"""Helpers shared by command modules: turning library errors into one clear line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Print expected errors as ``error: <message>`` and exit 2, instead of a stack trace."""
    try:
        yield
    except (ValueError, FileNotFoundError, *kinds) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
