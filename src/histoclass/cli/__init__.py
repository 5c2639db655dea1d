"""The ``histoclass`` command line: thin Typer commands over library functions.

Each command module imports its heavy dependencies inside the command, so ``--help`` is instant.
Every command is a :class:`histoclass.cli._common.Command` (clean usage lines, choices checked
before any work); exit codes are listed in :mod:`histoclass.cli._common`.
"""

from __future__ import annotations

import logging

import typer
from typer.core import TyperCommand

from histoclass.cli import (
    data,
    evaluate,
    explain,
    pipeline,
    predict,
    publish,
    serve,
    slide,
    stain,
    train,
)
from histoclass.cli._common import Command, Group

app = typer.Typer(
    name="histoclass",
    help="Breast-cancer histopathology classification: split, train, ensemble, explain, serve.\n\n"
    "Exit codes: 0 done; 1 a leak was found or a step failed; 2 bad usage or input.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)
for _module in (data, stain, train, predict, explain, evaluate, serve, publish, pipeline, slide):
    _module.register(app)
for _info in app.registered_commands:  # every command, whoever registered it
    if _info.cls in (None, TyperCommand):  # Typer's default
        _info.cls = Command


def _version(value: bool) -> None:
    if value:
        from histoclass._version import __version__

        typer.echo(f"histoclass {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    # Our INFO lines are the progress a user reads; other libraries' (the ONNX exporter's
    # initializer passes, HTTP clients) only at WARNING, unless --verbose.
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("histoclass").setLevel(level)


def main() -> None:
    """Console-script entry point."""
    app()
