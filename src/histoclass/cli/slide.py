"""``histoclass slide``: whole slides to heat maps, QuPath GeoJSON and a verdict per slide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from histoclass.cli._common import Backend, Engine, user_errors


def slide_options(**kwargs: Any) -> Any:
    """The :class:`~histoclass.slides.SlideOptions` of ``histoclass slide`` and ``slides``,
    checked.

    Raises:
        ValueError: A batch size or top-k below 1, or a tissue fraction outside [0, 1].
    """
    from histoclass.slides import SlideOptions

    opts = SlideOptions(**kwargs)
    if opts.batch_size < 1 or opts.top_k < 1 or not 0 <= opts.min_tissue <= 1:
        raise ValueError(f"--batch-size {opts.batch_size} and --top-k {opts.top_k} must be >= 1, "
                         f"--min-tissue {opts.min_tissue} in [0, 1]")
    return opts


def slide(
    model: Path = typer.Argument(..., help="Member checkpoint, ensemble file or .onnx export."),
    slides: list[str] = typer.Argument(..., help="Slide files (SVS, NDPI, MRXS, tiled TIFF, "
                                       "DICOM, ...) or folders of them."),
    out: Path = typer.Option(..., "--out", help="Output folder: one <slide stem>/ folder per "
                             "slide, slides.csv, skipped.csv."),
    mpp: float = typer.Option(None, help="Level-0 microns per pixel for slides that do not "
                              "record it (a slide's own value is used when present)."),
    model_mpp: float = typer.Option(
        None, help="Microns per pixel of the model's training images, for models that do not "
        "record it (BreakHis: 0.4924 40X, 0.197 100X, 0.0985 200X, 0.0492 400X)."),
    min_tissue: float = typer.Option(0.5, help="Score tiles with at least this tissue "
                                     "fraction; the rest are skipped and counted."),
    overlap: float = typer.Option(0.0, help="Fraction by which neighbouring tiles overlap."),
    batch_size: int = typer.Option(16, help="Tiles per forward pass (memory is bounded by it)."),
    workers: int = typer.Option(2, help="Reader threads (overlapped with inference)."),
    threshold: float = typer.Option(0.5, help="p(malignant) for a malignant tile, region and "
                                    "slide verdict."),
    top_k: int = typer.Option(5, help="The verdict is the mean p(malignant) of the K most "
                              "malignant tiles."),
    explain_top: int = typer.Option(0, help="Write the K most malignant tiles and their "
                                    "Grad-CAM figures to <slide>/top/ (CAMs need .pt)."),
    refer_threshold: float = typer.Option(
        None, help="Flag refer=1 above this member disagreement (default: the ensemble's)."),
    restart: bool = typer.Option(False, "--restart", help="Score again instead of resuming "
                                 "from an earlier run's tiles.csv."),
    backend: str = typer.Option("torch", help="torch | onnx (MODEL is then a .onnx export)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1... (torch backend)."),
) -> None:
    """Score whole slides tile by tile at the model's resolution (resumable)."""
    from histoclass.api import open_classifier
    from histoclass.models import CheckpointError
    from histoclass.slides import predict_slides

    with user_errors(CheckpointError):
        opts = slide_options(mpp=mpp, model_mpp=model_mpp, min_tissue=min_tissue,
                             overlap=overlap, batch_size=batch_size, workers=workers,
                             threshold=threshold, top_k=top_k, explain_top=explain_top,
                             refer_threshold=refer_threshold, restart=restart, progress=True)
        clf = open_classifier(model, backend, device)
        summaries, skipped = predict_slides(clf, slides, out, opts)
    for s in summaries:
        folder = out / Path(s["slide"]).stem
        top = s["top_k_mean_p_malignant"]
        typer.echo(f"{s['slide']}: {s['verdict']} (top-{s['top_k']} mean p(malignant) "
                   f"{'n/a' if top is None else f'{top:.3f}'}, {s['tiles_scored']} tissue tiles, "
                   f"{s['tissue']['area_mm2']:.2f} mm^2{', REFER' if s['refer'] else ''}); "
                   f"wrote {folder}/ (tiles.csv, heatmap.png, heatmap.npy, slide.geojson, "
                   "summary.json, mask.png, thumbnail.png)")
    if skipped:
        typer.secho(f"skipped {len(skipped)} slide(s) (listed in {out / 'skipped.csv'}):",
                    fg=typer.colors.YELLOW)
        for p, reason in skipped:
            typer.echo(f"  {p}: {reason}")
    typer.echo(f"wrote {out / 'slides.csv'}")
    if not summaries:
        typer.secho("error: no slide could be scored", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def slides(
    model: Path = typer.Argument(..., help="Member checkpoint, ensemble file or .onnx export."),
    slides_in: Path = typer.Argument(..., metavar="SLIDES", help="A folder of slides, or a CSV "
                                     "with a path column (optional patient_id, mpp)."),
    out: Path = typer.Option(..., "--out", help="Output folder: <slide stem>/ per slide (as "
                             "histoclass slide writes) and the run manifest slides.csv."),
    engine: Engine = typer.Option("local", help="local (a process pool here) or ray."),
    address: str = typer.Option(None, help="Ray cluster to join (auto, ray://HOST:10001); "
                                "default: start a local Ray."),
    workers: int = typer.Option(1, help="Worker processes or Ray actors (one model each)."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per Ray actor (0: CPU actors)."),
    mpp: float = typer.Option(None, help="Level-0 microns per pixel for slides that do not "
                              "record it."),
    model_mpp: float = typer.Option(None, help="Microns per pixel of the model's training "
                                    "images, for models that do not record it."),
    min_tissue: float = typer.Option(0.5, help="Score tiles with at least this tissue "
                                     "fraction; the rest are skipped and counted."),
    overlap: float = typer.Option(0.0, help="Fraction by which neighbouring tiles overlap."),
    batch_size: int = typer.Option(16, help="Tiles per forward pass."),
    readers: int = typer.Option(1, help="Reader threads per worker (overlapped with "
                                "inference)."),
    threshold: float = typer.Option(0.5, help="p(malignant) for a malignant tile, region and "
                                    "slide verdict."),
    top_k: int = typer.Option(5, help="The verdict is the mean p(malignant) of the K most "
                              "malignant tiles."),
    explain_top: int = typer.Option(0, help="Write the K most malignant tiles and their "
                                    "Grad-CAM figures to <slide>/top/ (CAMs need .pt)."),
    refer_threshold: float = typer.Option(
        None, help="Flag refer=1 above this member disagreement (default: the ensemble's)."),
    restart: bool = typer.Option(False, "--restart", help="Score every slide again, from its "
                                 "first tile, instead of skipping or resuming earlier work."),
    backend: Backend = typer.Option("torch", help="torch | onnx (MODEL is then a .onnx export)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1... (torch backend)."),
) -> None:
    """Score many slides on a local process pool or Ray; a rerun skips the finished ones."""
    from functools import partial

    from histoclass.api import open_classifier
    from histoclass.distributed import RayMissingError, check_engine
    from histoclass.models import CheckpointError
    from histoclass.slides.engine import run_slides

    with user_errors(CheckpointError, RayMissingError):
        check_engine(engine, workers)
        opts = slide_options(mpp=mpp, model_mpp=model_mpp, min_tissue=min_tissue,
                             overlap=overlap, batch_size=batch_size, workers=readers,
                             threshold=threshold, top_k=top_k, explain_top=explain_top,
                             refer_threshold=refer_threshold, restart=restart)
        open_classifier(model, backend, "cpu")  # a bad model is one error, before any worker
        table = run_slides(partial(open_classifier, model, backend, device), slides_in, out,
                           engine, workers, address, gpus_per_worker, opts,
                           on_row=lambda r: typer.echo(f"{r['path']}: {r['status']} "
                                                       f"{r.get('reason') or ''}".rstrip()))
    counts = table["status"].value_counts().to_dict()
    typer.echo(f"wrote {out / 'slides.csv'} ({', '.join(f'{n} {k}' for k, n in counts.items())})")
    if not counts.get("done") and not counts.get("skipped"):
        typer.secho("error: no slide could be scored", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(slide)
    app.command()(slides)
