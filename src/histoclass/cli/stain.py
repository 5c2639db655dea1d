"""``histoclass stain``: write a stain-normalized copy of a data set, once."""

from __future__ import annotations

from pathlib import Path

import typer

from histoclass.cli._common import StainMethod, report_skipped, report_written, user_errors


def stain(
    data: str = typer.Argument(
        ..., help="Data folder, CSV/manifest with path,label, or 'sample' / 'sample:ucsb' / "
        "'sample:breakhis'."
    ),
    method: StainMethod = typer.Option("vahadane", help="Stain normalisation method."),
    target: list[Path] = typer.Option(
        ..., "--target", help="Target image to fit (repeat to pool several), or a fitted "
        "stain_target.json."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the copies, manifest.csv, "
                             "stain_target.json (and manifest.skipped.csv)."),
    workers: int = typer.Option(2, help="Processes normalizing images."),
) -> None:
    """Normalize every image of DATA toward the target's stain colours into OUT.

    Copies keep their relative paths; OUT/manifest.csv points at them (a manifest input keeps
    all its columns). Unreadable images are reported by name and skipped; images with too little
    tissue are copied unchanged, with a warning naming them.
    """

    from histoclass import stain as st
    from histoclass.data import ImageLoadError, ScanError, load_rgb
    from histoclass.data.files import check_output
    from histoclass.data.images import to_array
    from histoclass.stain.batch import normalize_dataset

    with user_errors(ImageLoadError, ScanError):
        check_output(out, "folder")  # before any image is normalised
        if len(target) == 1 and target[0].suffix.lower() == ".json":
            normalizer = st.load(target[0])
            if normalizer.method != method.lower():
                raise ValueError(f"{target[0]} holds a {normalizer.method} target, not {method}")
        else:
            images = [to_array(load_rgb(t)) for t in target]
            try:
                normalizer = st.fit(method, images)
            except ValueError as exc:  # "target image <i>" means little to a user: name files
                names = ", ".join(map(str, target))
                raise ValueError(f"{exc} (targets, from 0: {names})") from None
        result = normalize_dataset(data, normalizer, out, workers=workers, progress=True)
        skipped_csv = report_skipped(result.skipped, result.manifest)
    if result.unchanged:
        typer.secho(f"passed through unchanged: {len(result.unchanged)} file(s):",
                    fg=typer.colors.YELLOW)
        for p, reason in result.unchanged:
            typer.echo(f"  {p}: {reason}")
    typer.echo(f"{normalizer.key}: {result.summary()}")
    report_written([result.manifest, result.target] + ([skipped_csv] if skipped_csv else []),
                   f"and {len(result.frame)} normalised cop(ies) under {out}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(stain)
