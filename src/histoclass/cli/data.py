"""``histoclass split`` and ``histoclass audit``."""

from __future__ import annotations

from pathlib import Path

import typer

from histoclass.cli._common import Protocol, report_skipped, report_written, user_errors


def split(
    data: str = typer.Argument(
        ..., help="Data folder, CSV with path,label[,group], or 'sample' / 'sample:ucsb' / "
        "'sample:breakhis' for the real H&E sample bundled with histoclass."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for manifest.csv (and "
                             "manifest.skipped.csv)."),
    protocol: Protocol = typer.Option(
        "patient", help="patient: patient-disjoint (default); paper: the study's image-level "
        "random split (patients leak); kfold: patient-grouped k folds."
    ),
    seed: int = typer.Option(0, help="Same seed, same manifest, byte for byte."),
    val: float = typer.Option(0.15, help="Validation fraction."),
    test: float = typer.Option(0.15, help="Test fraction (patient, paper)."),
    folds: int = typer.Option(5, help="Number of folds (kfold)."),
    magnification: list[str] = typer.Option(
        None, "--magnification", "-m", help="Keep only this magnification (repeatable)."
    ),
    groups: Path = typer.Option(None, help="CSV path,group for folders of non-BreakHis names."),
    classes: list[str] = typer.Option(
        None, "--classes", help="Keep only these BreakHis subtypes, codes or names (repeatable "
        "or comma-separated), e.g. TA,MC,F,DC."
    ),
    test_patients: list[str] = typer.Option(
        None, "--test-patients", help="Fixed test patients (patient protocol; replaces --test): "
        "patient or BreakHis slide ids, comma-separated or a file with one id a line. Every "
        "slide of a listed patient is held out."
    ),
    workers: int = typer.Option(2, help="Decoding threads."),
) -> None:
    """Scan DATA, check every image, and write a split manifest (files are never moved).

    Folders histoclass wrote (explain outputs) are refused: their images are figures, not data.
    """
    from histoclass.data import make_split, resolve_data, scan, write_manifest
    from histoclass.data.files import check_output
    from histoclass.data.manifest import split_table
    from histoclass.data.splits import LEAK_NOTE, split_columns

    target = Path(out) / "manifest.csv"
    with user_errors():
        check_output(target, inputs=(resolve_data(data),))  # before hours of decoding
        result = scan(resolve_data(data), groups=groups, workers=workers, progress=True)
        from histoclass.data.fixed import parse_ids

        frame = make_split(result.frame, protocol, seed=seed, val=val, test=test, folds=folds,
                           magnifications=magnification or None,
                           classes=parse_ids(classes) or None,
                           test_patients=parse_ids(test_patients) or None)
        path = write_manifest(frame, target)
    skipped_csv = report_skipped(result.skipped, target)
    for group in result.duplicates:
        typer.secho(f"duplicate images: {', '.join(group)}", fg=typer.colors.YELLOW)
    for line in result.grouping_warnings():  # loud: leakage cannot be prevented for these
        typer.secho(f"WARNING: {line}", fg=typer.colors.RED, err=True)
    for col in split_columns(frame):
        title = "" if col == "split" else f"{col.removeprefix('split_')}: "
        typer.echo(f"{title}\n{split_table(frame, col).to_string(index=False)}")
    if protocol == "paper":
        typer.secho(f"WARNING: {LEAK_NOTE}", fg=typer.colors.RED)
    typer.echo(result.summary())
    report_written([path] + ([skipped_csv] if skipped_csv else []))


def audit(
    manifest: Path = typer.Argument(..., help="Manifest CSV to check."),
    allow_ungrouped: bool = typer.Option(
        False, "--allow-ungrouped", help="Exit 0 although some images have no patient id "
        "(each its own group: their leakage cannot be checked)."),
) -> None:
    """Exit 1 naming patients and duplicate images (same bytes or same pixels) that cross
    splits, or images without patient ids (unless --allow-ungrouped); 0 when clean."""
    from histoclass.data import audit as run_audit
    from histoclass.data import read_manifest

    with user_errors():
        report = run_audit(read_manifest(manifest))
    if not report.pixels_checked:
        typer.secho("note: this manifest has no pixel_sha256 column (written before pixel "
                    "hashes): re-saved copies of one image were not checked; re-run histoclass "
                    "split to check them", fg=typer.colors.YELLOW)
    ungrouped = (f"no patient ids for {report.ungrouped} of {report.n_images} images: leakage "
                 "cannot be checked; pass --groups CSV to histoclass split")
    if report.clean and report.ungrouped and not allow_ungrouped:
        typer.secho(f"{ungrouped} (or --allow-ungrouped)", fg=typer.colors.RED)
        raise typer.Exit(1)
    if report.clean:
        typer.echo(
            f"clean: {report.n_images} images, {report.n_patients} patients, no patient or "
            f"duplicate image crosses splits ({', '.join(report.columns)})"
            + (f"; WARNING: {ungrouped}" if report.ungrouped else "")
        )
        return
    for col in report.columns:
        if report.leaking_patients[col]:
            pats = report.leaking_patients[col]
            typer.secho(f"{col}: {len(pats)} patient(s) in several splits: {', '.join(pats)}",
                        fg=typer.colors.RED)
        for key, found in (("sha256", report.leaking_duplicates),
                           ("pixel_sha256", report.leaking_pixel_duplicates)):
            frame = read_manifest(manifest) if found.get(col) else None
            for sha in found.get(col, []):
                rows = frame[frame[key] == sha]
                pairs = zip(rows["path"], rows[col], strict=True)
                where = ", ".join(f"{p} ({s})" for p, s in pairs)
                what = "same bytes" if key == "sha256" else "same pixels"
                typer.secho(f"{col}: duplicate image ({what}) across splits: {where}",
                            fg=typer.colors.RED)
    if report.ungrouped:
        typer.secho(ungrouped, fg=typer.colors.RED)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(split)
    app.command()(audit)
