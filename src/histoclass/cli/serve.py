"""``histoclass export`` (ONNX, optional INT8) and ``histoclass serve`` (the web demo)."""

from __future__ import annotations

from pathlib import Path

import typer

from histoclass.cli._common import fail, report_written, user_errors


def export(
    model: Path = typer.Argument(..., help="Member checkpoint or ensemble file (or local-dir:DIR, "
                                 "hf-hub:ORG/NAME)."),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write."),
    int8: bool = typer.Option(False, "--int8", help="Also quantise to INT8 (static QDQ); the "
                              "FP32 model is kept beside it as <stem>.fp32.onnx."),
    calibration: Path = typer.Option(
        None, help="Folder of images to calibrate INT8 on (default: the bundled H&E sample)."),
    check: bool = typer.Option(True, help="Compare ONNX Runtime with PyTorch on the bundled "
                               "sample and print the largest probability difference."),
) -> None:
    """Export MODEL to ONNX with its preprocessing, classes and stain embedded."""
    from histoclass.data.files import check_output
    from histoclass.deploy.export import export_onnx, parity

    with user_errors(RuntimeError):
        check_output(out, inputs=(model,))  # before the export runs
        cal = None
        if calibration is not None:
            from histoclass.data.images import IMAGE_SUFFIXES

            if not calibration.is_dir():
                raise FileNotFoundError(f"calibration folder {calibration} does not exist")
            cal = sorted(p for p in calibration.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not cal:
                raise ValueError(f"calibration folder {calibration} holds no images")
        path = export_onnx(model, out, int8=int8, calibration=cal)
    written = [path] + ([path.with_name(path.stem + ".fp32.onnx")] if int8 else [])
    if check:
        from histoclass.data.manifest import sample_path

        images = sorted(sample_path("breakhis").glob("*.png"))
        diff, agree = parity(model, path, images)
        typer.echo(f"check on {len(images)} sample images: max |p_onnx - p_torch| = {diff:.2e}, "
                   f"same class {agree}/{len(images)}")
    report_written(p for p in written if p.is_file())


def serve(
    model: Path = typer.Argument(..., help="Member checkpoint, ensemble file, .onnx export, "
                                 "local-dir:DIR or hf-hub:ORG/NAME."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: all)."),
    port: int = typer.Option(7860, help="TCP port."),
    max_mb: float = typer.Option(20.0, help="Largest upload per image, in MB."),
    max_pixels: int = typer.Option(25_000_000, help="Largest image, in pixels."),
    max_images: int = typer.Option(16, help="Most images per request."),
    concurrency: int = typer.Option(2, help="Requests processed at once (the rest queue)."),
    explain: bool = typer.Option(True, help="Show Grad-CAM overlays (PyTorch models)."),
    slides: Path = typer.Option(None, help="Folder of whole slides for the Slide tab (the page "
                                "opens only the slides in it)."),
    slides_out: Path = typer.Option(None, help="Where the Slide tab writes results (default: "
                                    "histoclass-slides in the temporary directory)."),
) -> None:
    """Serve the web demo for MODEL (needs gradio: the optional 'demo' extra)."""
    try:
        import gradio  # noqa: F401

        from histoclass.app import Limits
        from histoclass.app import serve as run_app
    except ImportError as exc:
        fail(f"the web demo needs gradio ({exc}); pip install 'histoclass[demo]'")
    from histoclass.models.published import is_model_ref

    with user_errors():
        if not (model.exists() or is_model_ref(model)):
            raise FileNotFoundError(f"model file {model} does not exist")
        if slides is not None and not slides.is_dir():
            raise FileNotFoundError(f"--slides folder {slides} does not exist")
        run_app(model, host, port, limits=Limits(max_mb, max_pixels, max_images),
                concurrency=concurrency, explain=explain, slides=slides, slides_out=slides_out)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(export)
    app.command()(serve)
