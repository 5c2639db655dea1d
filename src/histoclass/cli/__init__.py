"""The ``histoclass`` command line: thin Typer commands over library functions.

Each command module imports its heavy dependencies inside the command, so ``--help`` is instant.
"""

from __future__ import annotations

import logging

import typer

from histoclass.cli import data, evaluate, explain, pipeline, predict, serve, slide, stain, train

app = typer.Typer(
    name="histoclass",
    help="Breast-cancer histopathology classification: split, train, ensemble, explain, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _module in (data, stain, train, predict, explain, evaluate, serve, pipeline, slide):
    _module.register(app)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    # Our INFO lines are the progress a user reads; other libraries' (the ONNX exporter's
    # initializer passes, HTTP clients) only at WARNING, unless --verbose.
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("histoclass").setLevel(level)


def main() -> None:
    """Console-script entry point."""
    app()
