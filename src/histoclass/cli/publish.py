"""``histoclass publish``: a member or an ensemble as a self-contained folder for the hub."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from histoclass.cli._common import report_written, user_errors

Format = Literal["wsinfer"]


def publish(
    model: str = typer.Argument(..., help="Member checkpoint (best.pt), ensemble file, or a "
                                "published model (local-dir:DIR, hf-hub:ORG/NAME)."),
    out: Path = typer.Option(..., "--out", help="New folder to write (must not hold files)."),
    metrics: Path = typer.Option(None, help="metrics.json of histoclass evaluate (test numbers "
                                 "for the card; default: the checkpoint's validation metrics, "
                                 "labelled as validation)."),
    manifest: Path = typer.Option(None, help="Training manifest, if it moved since training "
                                  "(for the split protocol and its hash)."),
    push: str = typer.Option(None, help="Also upload the folder to this hub repo (ORG/NAME; "
                             "token from hf auth login or HF_TOKEN)."),
    private: bool = typer.Option(False, help="Create the hub repo private (with --push)."),
    fmt: Format = typer.Option(None, "--format", help="Also write WSInfer's config and a "
                               "TorchScript model in wsinfer/."),
    mpp: float = typer.Option(None, help="Microns per pixel of the model's input, for WSInfer "
                              "(default: the training resolution of a tile model)."),
    dataset: str = typer.Option("BreakHis", help="Training data named in the model card."),
    license_id: str = typer.Option("mit", "--license", help="Licence of the weights (hub id)."),
) -> None:
    """Publish MODEL: model.safetensors, timm config.json, histoclass.json and a model card."""
    from histoclass.deploy.publish import PushError, push_folder
    from histoclass.deploy.publish import publish as write
    from histoclass.models import CheckpointError

    with user_errors(CheckpointError, PushError, RuntimeError):
        files = write(model, out, metrics=metrics, manifest=manifest, dataset=dataset,
                      license_id=license_id, fmt=fmt, mpp=mpp, repo_id=push)
        report_written(files)  # before the push: a failed upload keeps the folder
        if push:
            typer.echo(f"pushed to hf-hub:{push}: {push_folder(out, push, private)}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(publish)
