"""``histoclass evaluate``: predictions CSV(s) -> metrics.json and a self-contained report.html."""

from __future__ import annotations

from pathlib import Path

import typer

from histoclass.cli._common import EvalSplit, report_written, user_errors


def evaluate(
    preds: list[Path] = typer.Argument(
        ..., help="Predictions CSV(s) from 'histoclass predict'; several are the folds of a "
        "k-fold run (per-fold metrics in folds.json, mean on top)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json and report.html."),
    threshold: float = typer.Option(0.5, help="Call malignant when P(malignant) >= this."),
    bootstrap: int = typer.Option(
        1000, help="Patient bootstrap replicates for the 95% CIs (0: no CIs)."
    ),
    seed: int = typer.Option(0, help="Bootstrap seed: same seed, same CIs."),
    split: EvalSplit = typer.Option("test", help="Rows to evaluate."),
    refer_threshold: float = typer.Option(
        None, help="Ensembles: refer images whose disagreement exceeds this (default: the "
        "CSV's refer column, when present)."
    ),
    fold_column: str = typer.Option(
        None, help="With one CSV: split it into folds by this column (e.g. fold)."
    ),
    gallery: int = typer.Option(24, help="Misclassified images shown in the report."),
    groups: Path = typer.Option(
        None, help="CSV path,group giving each image's patient (predictions of files whose "
        "names carry no patient id have none: patient-level metrics are then n/a)."),
) -> None:
    """Image- and patient-level metrics with patient-bootstrap 95% CIs, and an HTML report."""
    from histoclass.data.files import check_output
    from histoclass.data.splits import LEAK_NOTE
    from histoclass.evaluate import evaluate_files, write_outputs
    from histoclass.metrics import METRICS, PATIENT_METRICS
    from histoclass.report import fmt, write_report

    with user_errors():
        check_output(out, "folder")
        ev = evaluate_files(preds, threshold=threshold, bootstrap=bootstrap, seed=seed,
                            split=split, fold_column=fold_column,
                            refer_threshold=refer_threshold, groups=groups)
        written = write_outputs(ev, out)
        written.append(write_report(ev, Path(out) / "report.html", gallery))
    if ev.meta["leaks_patients"]:
        typer.secho(f"WARNING: {LEAK_NOTE}", fg=typer.colors.RED)
    patients = ev.meta["patient_note"] or f"{ev.meta['patients']} patients"
    typer.echo(f"{ev.meta['images']} images, {patients}, {ev.task.kind} task"
               + (f", {len(ev.folds['folds'])} folds (mean)" if ev.folds else "")
               + f"; source: {ev.meta['source']}")
    if ev.meta["errors"]:
        typer.secho(f"WARNING: {ev.meta['errors']} row(s) have no prediction (non-finite model "
                    "output): not scored", fg=typer.colors.RED)
    typer.echo(f"CIs: {ev.meta['ci_note'] or 'patient bootstrap'} ({ev.meta['ci_rule']})")
    for key in METRICS:
        ci = ev.metrics["ci95"].get(key)
        span = f"  [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""
        value = fmt(ev.metrics[key])
        if key in PATIENT_METRICS and ev.meta["patient_note"]:
            value = ev.meta["patient_note"]
        typer.echo(f"  {key:<25}{value}{span}")
    report_written(written)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(evaluate)
