"""``histoclass models``, ``histoclass train`` and ``histoclass train-all``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import typer

from histoclass.cli._common import (
    EXIT_FAILED,
    Amp,
    Balance,
    Calibrate,
    InputMode,
    Schedule,
    Select,
    StainMethod,
    Task,
    calibrate_option,
    device_option,
    refer_options,
    report_written,
    user_errors,
)

# The study's 10 members, in its order.
ALL_MEMBERS = "v1-b0,v1-b1,v1-b2,v1-b3,v1-b4,v2-b0,v2-b1,v2-b2,v2-b3,v2-s"
Head = Literal["finetune", "linear"]
ProbeSelect = Literal["val", "cv"]
MEMBER_REFER = refer_options("the member")
RUN_FILES = ("best.pt", "last.pt", "history.csv", "curves.png", "config.yaml", "done")


def models() -> None:
    """List the ensemble members (timm name, parameters, native input size, pretrained tag)
    and the named pathology foundation models (`--model uni` ...): hub id, architecture,
    embedding, licence and access. Any timm name, hf-hub:ORG/NAME or local-dir:PATH works too."""
    from histoclass.models.members import member_table
    from histoclass.models.presets import preset_table

    _table(member_table(), ("name", "timm", "params_M", "input_size", "pretrained"))
    typer.echo("")
    _table(preset_table(), ("name", "hub", "timm", "embedding", "licence", "access", "loader"))


def _table(rows: list[dict], cols: tuple[str, ...]) -> None:
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    typer.echo("  ".join(c.ljust(width[c]) for c in cols).rstrip())
    for r in rows:
        typer.echo("  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip())


def _errors():
    from histoclass.models import CheckpointError, WeightsError

    return user_errors(WeightsError, CheckpointError)


def train(
    manifest: Path = typer.Argument(..., help="Split manifest CSV (histoclass split)."),
    out: Path = typer.Option(..., "--out", help="Run folder: best.pt, last.pt, history.csv, "
                             "curves.png, config.yaml."),
    model: str = typer.Option("v2-b0", help="Member or preset (histoclass models), any timm "
                              "name, hf-hub:ORG/NAME or local-dir:PATH."),
    model_arg: list[str] = typer.Option(
        None, "--model-arg", help="Extra timm constructor argument KEY=VALUE (repeatable; "
        "values are JSON scalars, e.g. init_values=1e-5, dynamic_img_size=true, "
        "mlp_layer=SwiGLUPacked); stored in the checkpoint."),
    task: Task = typer.Option("binary", help="binary: benign/malignant; subtype: 8 classes."),
    fold: int = typer.Option(None, help="Fold of a kfold manifest (split_fold<K>)."),
    magnification: str = typer.Option(None, help="Train on one magnification only, e.g. 40X."),
    epochs: int = typer.Option(40, help="Epochs (the study: 40)."),
    batch_size: int = typer.Option(32, help="Global batch (split over torchrun processes)."),
    image_size: int = typer.Option(None, help="Input size; default: the model's own."),
    input_: InputMode = typer.Option(
        "resize", "--input", help="resize: squash each field to the input size (the study); "
        "tiles: native-resolution tiles of the input size (train on a random crop, predict "
        "the mean over the field's tiles)."),
    tile_stride: int = typer.Option(None, help="Pixels between tiles with --input tiles "
                                    "(default: the tile size, no overlap)."),
    lr: float = typer.Option(1e-4, help="Backbone learning rate (Adam)."),
    head_lr: float = typer.Option(1e-3, help="Head learning rate (Adam)."),
    weight_decay: float = typer.Option(0.0, help="Adam weight decay."),
    dropout: float = typer.Option(0.3, help="Dropout before the head."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                    help="ImageNet weights from the hub (timm's normal path)."),
    weights: Path = typer.Option(None, help="Local ImageNet weights file (offline)."),
    freeze_bn: bool = typer.Option(
        None, "--freeze-bn/--train-bn",
        help="Batch norm frozen (default with ImageNet weights) or trained (default from "
        "scratch)."),
    warmup_epochs: int = typer.Option(0, help="First epochs train the head only."),
    schedule: Schedule = typer.Option("constant", help="Learning rate: constant, or cosine "
                                      "(per step, to 0)."),
    patience: int = typer.Option(0, help="Stop after this many epochs without a better "
                                 "validation score (0: never)."),
    balance: Balance = typer.Option("none", help="weights: class-weighted loss; sampler: "
                                    "class-balanced sampling (BreakHis is ~69% malignant)."),
    label_smoothing: float = typer.Option(0.0, help="Cross-entropy label smoothing."),
    select: Select = typer.Option(
        "balanced_accuracy", help="Validation score that picks best.pt (balanced accuracy is "
        "robust to class imbalance)."),
    color_jitter: float = typer.Option(0.0, help="Colour jitter strength (augmentation)."),
    hed_jitter: float = typer.Option(0.0, help="HED stain jitter sigma (augmentation)."),
    stain: StainMethod | None = typer.Option(None, help="Stain normalisation (default: none)."),
    stain_target: Path = typer.Option(None, help="Target image for --stain."),
    train_mpp: float = typer.Option(
        None, help="Microns per pixel of the training images, stored in the checkpoint for "
        "`histoclass slide` (default: BreakHis's value when training on one magnification)."),
    seed: int = typer.Option(0, help="Seed for initialisation, order and augmentation."),
    device: str = device_option(),
    amp: Amp = typer.Option("auto", help="Mixed precision: auto is bf16/fp16 on GPU, off on "
                            "CPU."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
    workers: int = typer.Option(None, help="DataLoader workers per process; default "
                                "min(4, CPUs)."),
    cache_dir: str = typer.Option("", help="Decoded-image cache; default <out>/cache, 'off' for "
                                  "none."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>/last.pt (every "
                                "result-affecting setting and the manifest's content must "
                                "match; --epochs, --patience, --device, --workers may change)."),
    head: Head = typer.Option(
        "finetune", help="finetune: the study's recipe; linear: frozen backbone, logistic "
        "regression on its cached embeddings (C: --probe-select), folded into the classifier."),
    probe_select: ProbeSelect = typer.Option(
        "val", help="--head linear: choose C on the val split (val), or by patient-disjoint "
        "inner CV over train + val and refit on both (cv: for a val split of a few images)."),
    feature_cache: str = typer.Option(
        None, help="--head linear: embeddings cache folder; default $HISTOCLASS_FEATURE_CACHE "
        "or ~/.cache/histoclass/features, 'off' for none."),
    calibrate: Calibrate = calibrate_option("the val split's logits of best.pt (--probe-select "
                                            "cv: the out-of-fold logits)"),
    refer_risk: float = MEMBER_REFER[0],
    refer_delta: float = MEMBER_REFER[1],
) -> None:
    """Fine-tune one member on MANIFEST's train split, selecting on its val split
    (--head linear: fit a linear probe on the frozen backbone instead).

    The test split is never read. Under torchrun the same command trains with
    DistributedDataParallel.
    """
    from histoclass.models.model_args import parse_model_args
    from histoclass.train import TrainConfig
    from histoclass.train import train as run

    with _errors():
        args = parse_model_args(model_arg or [])
    cfg = TrainConfig(
        manifest=str(manifest), out=str(out), model=model, model_args=args or None, task=task,
        fold=fold,
        magnification=magnification, epochs=epochs, batch_size=batch_size,
        image_size=image_size, input=input_, tile_stride=tile_stride, lr=lr, head_lr=head_lr,
        weight_decay=weight_decay,
        drop_rate=dropout, pretrained=pretrained, weights=str(weights) if weights else None,
        freeze_bn=freeze_bn, warmup_epochs=warmup_epochs, schedule=schedule, patience=patience,
        balance=balance, label_smoothing=label_smoothing, select=select,
        color_jitter=color_jitter, hed_jitter=hed_jitter, stain=stain,
        stain_target=str(stain_target) if stain_target else None, train_mpp=train_mpp,
        seed=seed, device=device,
        amp=amp, channels_last=channels_last, workers=workers,
        cache_dir=None if cache_dir == "off" else cache_dir, resume=resume,
        head=head, feature_cache=feature_cache, probe_select=probe_select,
        calibrate=calibrate, refer_risk=refer_risk, refer_delta=refer_delta,
    )
    with _errors():
        best = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        report_written(_run_files(best.parent))


def _run_files(run: Path) -> list[Path]:
    """What a training run wrote (``train`` docstring), as far as it exists."""
    return [run / n for n in RUN_FILES if (run / n).is_file()]


def train_all(
    manifest: Path = typer.Argument(..., help="Split manifest CSV."),
    out: Path = typer.Option(..., "--out", help="Root folder: one run folder per member."),
    models_: str = typer.Option(ALL_MEMBERS, "--models", show_default=False,
                                help="Comma-separated members (default: the study's ten, "
                                f"{ALL_MEMBERS.replace(',', ', ')})."),
    task: Task = typer.Option("binary", help="binary: benign/malignant; subtype: 8 classes."),
    fold: int = typer.Option(None, help="Fold of a kfold manifest."),
    magnification: str = typer.Option(None, help="One magnification only, e.g. 40X."),
    epochs: int = typer.Option(40, help="Epochs per member."),
    batch_size: int = typer.Option(32, help="Global batch."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                    help="ImageNet weights from the hub."),
    weights_dir: Path = typer.Option(None, help="Folder of local weights <member>.<ext>."),
    balance: Balance = typer.Option("none", help="Class balancing (see train)."),
    schedule: Schedule = typer.Option("constant", help="Learning-rate schedule."),
    select: Select = typer.Option("balanced_accuracy", help="Validation score for best.pt."),
    seed: int = typer.Option(0, help="Seed."),
    device: str = device_option(),
    workers: int = typer.Option(None, help="DataLoader workers per process."),
    cache_dir: str = typer.Option("", help="Shared cache; default <out>/cache, 'off' for none."),
) -> None:
    """Train several members in turn into OUT/<name>/, skipping finished runs."""
    from histoclass.train import TrainConfig
    from histoclass.train import train_all as run_all

    names = [m.strip() for m in models_.split(",") if m.strip()]
    base = TrainConfig(
        manifest=str(manifest), out=str(out), task=task, fold=fold, magnification=magnification,
        epochs=epochs, batch_size=batch_size, pretrained=pretrained, balance=balance,
        schedule=schedule, select=select, seed=seed, device=device, workers=workers,
        cache_dir=None if cache_dir == "off" else cache_dir,
    )
    with _errors():
        base.check()
        status = run_all(base, names, weights_dir=weights_dir)
    for name, what in status.items():
        typer.echo(f"{name}: {what}")
    report_written([f for name, what in status.items() if what == "trained"
                    for f in _run_files(Path(out) / name)])
    if any(s.startswith("failed") for s in status.values()):
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(models)
    app.command()(train)
    app.command("train-all")(train_all)
