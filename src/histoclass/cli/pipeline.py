"""``histoclass run`` (a whole study from a YAML config) and ``histoclass demo``."""

from __future__ import annotations

from pathlib import Path

import typer

from histoclass.cli._common import report_tree, user_errors

DEMO_ENSEMBLES = [
    {"name": "soft", "method": "soft"}, {"name": "weighted", "method": "weighted"},
    {"name": "hard", "method": "hard"}, {"name": "stack", "method": "stack"},
    {"name": "concat", "method": "concat"},
]


def _finish(cfg, summary) -> None:
    out = Path(cfg.out)
    typer.echo((out / "summary.md").read_text())
    ensembles = summary[summary["kind"] == "ensemble"]["model"].tolist()
    first = ensembles[0] if ensembles else summary["model"].iloc[0]
    report_tree(out)
    typer.echo(f"summary: {out / 'summary.md'}\nreport:  {out / 'eval' / first / 'report.html'}")


def run(
    config: Path = typer.Argument(..., help="YAML run description (see configs/)."),
    data: str = typer.Option(None, help="Override the config's data folder/CSV."),
    out: str = typer.Option(None, help="Override the config's output folder."),
    force: bool = typer.Option(False, "--force", help="The output folder holds a run with "
                               "other settings: remove its outputs and start afresh."),
) -> None:
    """Split, train members, fit ensembles, predict and evaluate; resumes what is done (only
    a run with the same settings)."""
    from histoclass.pipeline import RunConfig
    from histoclass.pipeline import run as run_pipeline

    with user_errors():
        cfg = RunConfig.from_yaml(config, data=data, out=out)
        summary = run_pipeline(cfg, force=force)
    _finish(cfg, summary)


def demo(
    out: str = typer.Option("runs/demo", help="Output folder."),
    members: str = typer.Option("v1-b0,v2-b0", help="Comma-separated members."),
    epochs: int = typer.Option(3, help="Epochs per member."),
    image_size: int = typer.Option(160, help="Input size (small: a laptop CPU is enough)."),
    pretrained: bool = typer.Option(
        True, "--pretrained/--no-pretrained",
        help="ImageNet weights from the Hugging Face hub (needs internet once)."),
    weights_dir: Path = typer.Option(
        None, help="Offline: folder of <member>.pth ImageNet weights files."),
    force: bool = typer.Option(False, "--force", help="OUT holds a demo run with other "
                               "settings: remove its outputs and start afresh."),
) -> None:
    """Run a small version of the whole pipeline on the real H&E sample shipped with histoclass.

    Patient(group)-disjoint split of 46 images from 10 patients/tissue blocks, two members,
    all five ensemble methods, image- and patient-level evaluation, HTML reports. Minutes on a
    laptop CPU; far too little data for meaningful accuracy: it shows the workflow.
    """
    from histoclass.pipeline import RunConfig
    from histoclass.pipeline import run as run_pipeline

    names = [m.strip() for m in members.split(",") if m.strip()]
    weights = {}
    if weights_dir is not None:
        weights = {m: str(Path(weights_dir) / f"{m}.pth") for m in names}
    cfg = RunConfig(
        data="sample", out=out, name="demo", members=names, weights=weights,
        split={"protocol": "patient", "seed": 0, "val": 0.2, "test": 0.3},
        train={"epochs": epochs, "batch_size": 16, "image_size": image_size,
               "pretrained": pretrained, "workers": 0},
        ensembles=DEMO_ENSEMBLES if len(names) > 1 else [],
        evaluate={"bootstrap": 200},
    )
    with user_errors():
        summary = run_pipeline(cfg, force=force, offline_hint=(
            "offline, run histoclass demo --no-pretrained (train from scratch) or --weights-dir "
            "DIR (DIR/<member>.pth ImageNet weights)"))
    _finish(cfg, summary)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(run)
    app.command()(demo)
