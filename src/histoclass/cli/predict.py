"""``histoclass predict`` and ``histoclass ensemble``."""

from __future__ import annotations

from pathlib import Path

import typer

from histoclass.cli._common import (
    EXIT_FAILED,
    Backend,
    Calibrate,
    Engine,
    EnsembleMethod,
    Preset,
    Split,
    calibrate_option,
    calibration_line,
    device_option,
    fail,
    refer_options,
    report_written,
    user_errors,
)

ENSEMBLE_REFER = refer_options("the ensemble")


def predict(
    model: Path = typer.Argument(..., help="Member checkpoint (.pt), ensemble file, .onnx, or "
                                 "a published model (local-dir:DIR, hf-hub:ORG/NAME)."),
    inputs: list[str] = typer.Argument(None, help="Image files or folders (instead of "
                                       "--manifest)."),
    manifest: Path = typer.Option(None, help="Split manifest to predict one split of."),
    split: Split = typer.Option("test", help="Split of --manifest."),
    fold: int = typer.Option(None, help="Fold of a k-fold manifest."),
    out: Path = typer.Option(..., "--out", help="Predictions CSV (<name>.skipped.csv goes "
                             "beside it)."),
    tta: bool = typer.Option(False, "--tta", help="Average the 8 flips/90-degree rotations."),
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    workers: int = typer.Option(2, help="Decoding threads (overlapped with inference); with "
                                "--engine ray, Ray actors (one model each, 2 decoding threads "
                                "each)."),
    device: str = device_option(),
    refer_threshold: float = typer.Option(
        None, help="Flag refer=1 above this member disagreement (default: the ensemble's)."),
    backend: Backend = typer.Option("torch", help="onnx: MODEL is a .onnx file from histoclass "
                                    "export, run with ONNX Runtime (a .onnx MODEL always is)."),
    engine: Engine = typer.Option("local", help="local (this process) or ray: the images cut "
                                  "into one contiguous chunk per actor; either way the CSV rows "
                                  "and the skipped files are in input order."),
    address: str = typer.Option(None, help="Ray cluster to join (auto, ray://HOST:10001); "
                                "default: start a local Ray."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per Ray actor (0: CPU actors)."),
) -> None:
    """Predict images, folders or a manifest split with a checkpoint or an ensemble.

    Rows are in input order on both engines (files as given, folders sorted); skips too.
    """
    from functools import partial

    from histoclass.api import open_classifier
    from histoclass.distributed import (
        RayMissingError,
        WorkerFailedError,
        check_engine,
        image_runner,
    )
    from histoclass.models import CheckpointError
    from histoclass.predict import (
        check_out,
        expand_inputs,
        predict_manifest,
        predict_paths,
        write_predictions,
    )

    with user_errors(CheckpointError, RayMissingError):
        check_engine(engine, workers, fewest=0)  # local: 0 decodes inline
        if (manifest is None) == (not inputs):
            raise ValueError("give either --manifest or image files/folders, not both or neither")
        check_out(out, [model, manifest, *(inputs or [])])  # before any image is decoded
        # on Ray this copy only names the classes and members (the actors score)
        clf = open_classifier(model, backend, device if engine == "local" else "cpu")
        opener = partial(open_classifier, model, backend, device)
        with image_runner(engine, opener, workers, address, gpus_per_worker) as runner:
            kw = {"tta": tta, "batch_size": batch_size, "workers": workers,
                  "refer_threshold": refer_threshold, "progress": True, "runner": runner}
            try:
                if manifest is not None:
                    pred = predict_manifest(clf, manifest, split, fold, **kw)
                else:
                    info, skipped = expand_inputs(inputs)
                    pred = predict_paths(clf, list(info["path"]), info=info, **kw)
                    pred = pred._replace(skipped=skipped + pred.skipped)
            except WorkerFailedError as exc:
                fail(str(exc), EXIT_FAILED)
        csv, skipped_csv = write_predictions(pred, out)
    if pred.skipped:
        typer.secho(f"skipped {len(pred.skipped)} input(s) (listed in {skipped_csv}):",
                    fg=typer.colors.YELLOW)
        for p, reason in pred.skipped:
            typer.echo(f"  {p}: {reason}")
    frame = pred.frame
    written = [p for p in (csv, skipped_csv) if p is not None and Path(p).is_file()]
    failed = int((frame["pred"] == "").sum()) if len(frame) else 0
    if failed:  # non-finite outputs: listed in the CSV's error column, never given a class
        typer.secho(f"error: {failed} image(s) gave a non-finite model output (NaN/inf): no "
                    f"class assigned, see the error column of {csv}", fg=typer.colors.RED,
                    err=True)
    if frame.empty or failed == len(frame):
        report_written(written)
        fail("no input could be predicted", EXIT_FAILED)
    counts = ", ".join(f"{k} {v}" for k, v in frame["pred"].value_counts().sort_index().items()
                       if k != "")
    extra = f"; refer {int(frame['refer'].sum())}" if "refer" in frame else ""
    typer.echo(f"{len(frame) - failed} image(s) predicted ({counts or 'none'}{extra})")
    report_written(written)


def ensemble(
    members: list[Path] = typer.Argument(None, help="Member checkpoints (or use --preset)."),
    method: EnsembleMethod = typer.Option(..., help="soft: mean; weighted: weights fitted on "
                                          "validation; hard: majority vote; stack: logistic "
                                          "regression; concat: the study's feature head."),
    manifest: Path = typer.Option(None, help="Split manifest: fitted methods use its "
                                  "validation split only (never test)."),
    fold: int = typer.Option(None, help="Fold of a k-fold manifest."),
    out: Path = typer.Option(..., "--out", help="Ensemble file to write."),
    preset: Preset | None = typer.Option(None, help="v1 (B0-B4), v2 (B0-B3, S) or all: "
                                         "members <runs>/<name>/best.pt."),
    runs: Path = typer.Option(Path("runs"), help="Folder of training runs (with --preset)."),
    refer_threshold: float = typer.Option(0.25, help="Disagreement above which an image is "
                                          "flagged refer=1 (stored in the file)."),
    seed: int = typer.Option(0, help="Inner fit/stop split of validation and head init."),
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    workers: int = typer.Option(2, help="Decoding threads."),
    device: str = device_option(),
    calibrate: Calibrate = calibrate_option("the ensemble's combined val probabilities, as "
                                            "softmax(log p / T) (stack/concat: the inner stop "
                                            "rows; hard: none)"),
    refer_risk: float = ENSEMBLE_REFER[0],
    refer_delta: float = ENSEMBLE_REFER[1],
) -> None:
    """Combine member checkpoints into an ensemble file, fitted (and calibrated) on
    validation only."""
    from histoclass.data.files import check_output
    from histoclass.models import CheckpointError
    from histoclass.train import fit_ensemble, preset_members

    with user_errors(CheckpointError):
        if preset and members:
            raise ValueError("give member checkpoints or --preset, not both")
        paths = preset_members(preset, runs) if preset else list(members or [])
        check_output(out, inputs=(*paths, manifest))  # before members are loaded and fitted
        ens = fit_ensemble(paths, method, manifest, fold=fold, refer_threshold=refer_threshold,
                           seed=seed, batch_size=batch_size, workers=workers, device=device,
                           calibrate=calibrate, refer_risk=refer_risk, refer_delta=refer_delta)
        path = ens.save(out)
    fit = ens.fit
    detail = ""
    if ens.weights is not None:
        detail = "; weights " + ", ".join(f"{m.name} {w:.3f}"
                                          for m, w in zip(ens.members, ens.weights, strict=True))
    if fit.get("rows"):
        detail += (f"; fitted on {fit['rows']} validation image(s) ({fit['fit_rows']} fit / "
                   f"{fit['stop_rows']} stop, inner split by {fit['inner_split']})")
    typer.echo(f"{method} ensemble of {len(ens.members)} members "
               f"({', '.join(m.name for m in ens.members)}){detail}")
    typer.echo(calibration_line(ens.temperature, ens.calibration, ens.refer_risk))
    report_written([path])


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(predict)
    app.command()(ensemble)
