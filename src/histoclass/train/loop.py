"""Fine-tune one ensemble member: the study's recipe as a plain loop, ``train(config) -> Path``.

Recipe (Kalati et al. 2025): ImageNet backbone, global pooling, dropout 0.3 and a new linear
head; Adam with lr 1e-4 for the backbone and 1e-3 for the head; batch-norm layers frozen; 40
epochs; the checkpoint with the best validation score is kept. The score defaults to validation
*balanced* accuracy because BreakHis is ~69% malignant: plain accuracy rewards a model that
leans malignant, and the loss prefers confident models over correct ones.

The run reads only the manifest's ``train`` and ``val`` rows; ``test`` rows are dropped before
any image is opened. Each epoch's shuffling and augmentation are seeded from (seed, epoch), so
``resume`` from ``last.pt`` reproduces an uninterrupted run. Under ``torchrun`` the same call
trains with DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoclass import models
from histoclass.data.files import check_output, remove_stale_temps
from histoclass.data.transforms import Preprocess
from histoclass.models.checkpoint import build_model, read_checkpoint, save_checkpoint
from histoclass.models.sources import Backbone, resolve_backbone
from histoclass.train import distributed, records
from histoclass.train.calibrate import calibrate_best
from histoclass.train.config import TrainConfig, fingerprint, fingerprint_changes
from histoclass.train.data import RunData, build_data, epoch_seed
from histoclass.train.distributed import Dist
from histoclass.train.epoch import (
    amp_dtype,
    better,
    evaluate,
    freeze_batchnorm,
    head_parameters,
    train_one_epoch,
)

log = logging.getLogger(__name__)


def train(config: TrainConfig) -> Path:
    """Train one member as ``config`` says; returns the path of ``best.pt``.

    Writes ``best.pt`` (best validation ``config.select``), ``last.pt`` (with the optimiser,
    scaler and RNG state that ``resume`` continues from), ``history.csv``, ``curves.png``,
    ``config.yaml`` and, once finished, ``done`` into ``config.out``.

    Raises:
        ValueError: A bad setting, ``out`` already holding a run without ``resume``, or a
            resumed run whose fixed settings changed.
        NonFiniteLossError: The training loss became NaN or infinite.
    """
    cfg = config
    cfg.check()
    if cfg.head == "linear":  # a frozen backbone and a fitted probe: no epochs at all
        from histoclass.train.linear import train_linear

        return train_linear(cfg)
    owner = not torch.distributed.is_initialized()  # train_all keeps one group for all
    d = distributed.setup(cfg.device)
    try:
        run = _prepare(cfg, d)
        for epoch in range(run.start, cfg.epochs):
            run.data.set_epoch(epoch)
            torch.manual_seed(epoch_seed(cfg.seed, epoch, d.rank))  # dropout, in-process augment
            fit = train_one_epoch(run.net, run.criterion, run.optimizer, run.data.train_loader,
                                  d, epoch, cfg, scaler=run.scaler, amp=run.amp,
                                  freeze_bn=run.freeze_bn)
            val = evaluate(run.model, run.data.val_loader, d, run.amp, cfg.channels_last)
            row = {"epoch": epoch + 1, "train_loss": fit["loss"],
                   "train_accuracy": fit["accuracy"], **{f"val_{k}": v for k, v in val.items()},
                   "lr": fit["lr"], "seconds": fit["seconds"],
                   "images_per_s": fit["images_per_s"]}
            run.history.append(row)
            improved = better(val, run.best, cfg.select)
            run.best = {**val, "epoch": epoch + 1} if improved else run.best
            run.bad_epochs = 0 if improved else run.bad_epochs + 1
            stop = cfg.patience > 0 and run.bad_epochs >= cfg.patience
            if d.main:
                _write_epoch(run, cfg, row, improved, plot=stop or epoch + 1 == cfg.epochs)
            if stop:
                log.info("early stop: no better val %s for %d epochs", cfg.select, cfg.patience)
                break
        calibrate_best(run.out / "best.pt", run.model, run.data, cfg, d, run.amp)
        if d.main:
            (run.out / "done").write_text(f"{len(run.history)} epochs; best {run.best}\n")
        return run.out / "best.pt"
    finally:
        if owner:
            distributed.cleanup(d)


@dataclass
class _Run:
    """The state of one run the driver carries from epoch to epoch."""

    out: Path
    data: RunData
    model: nn.Module  # the bare model: evaluated, saved
    net: nn.Module  # what trains: ``model``, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp: torch.dtype | None
    freeze_bn: bool
    timm_name: str
    pre: Preprocess
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    bad_epochs: int = 0
    start: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what --resume must match
    backbone: Backbone | None = None


def _prepare(cfg: TrainConfig, d: Dist) -> _Run:
    """Data, model, optimiser and loss for ``cfg``, resumed from ``last.pt`` if asked.

    The order of the steps is part of the recipe: the global seed is set before the new head
    is initialised, so every process (and every rerun) starts from the same weights.
    """
    out = Path(cfg.out)
    if not cfg.resume and (out / "last.pt").exists():
        raise ValueError(f"{out} already holds a run (last.pt); pass --resume to continue it "
                         "or choose another --out")
    if d.main:  # before any image is read: a read-only or full folder fails now, in one line
        check_output(out, "folder")
        remove_stale_temps(out, older_than=0)  # .best.pt.*.tmp of a killed run
    if d.world > 1 and cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {d.world} processes")
    torch.manual_seed(cfg.seed)  # same initial head on every process
    data = build_data(cfg, d)
    prints = fingerprint(cfg)
    ckpt = _resume_checkpoint(cfg, out, prints) if cfg.resume else None
    if ckpt is None:  # a hub source's config.json is read here, once
        backbone = resolve_backbone(cfg.model, cfg.model_args,
                                    offline=bool(cfg.weights) or not cfg.pretrained)
    else:
        m = ckpt["meta"]
        backbone = Backbone(cfg.model, m["timm_name"], m.get("model_args") or {},
                            m.get("source"), m.get("embedding"))
    timm_name = backbone.timm_name
    if ckpt is None:
        model = models.create_model(backbone, len(data.classes), pretrained=cfg.pretrained,
                                    weights=cfg.weights, drop_rate=cfg.drop_rate)
    else:  # weights come from last.pt: no hub download, no weights file needed
        model = build_model(ckpt["meta"])
        model.load_state_dict(ckpt["state_dict"])
    pre = models.model_preprocess(model, cfg.image_size)
    data.make_datasets(pre)
    freeze_bn = cfg.freeze_bn if cfg.freeze_bn is not None else bool(cfg.weights or cfg.pretrained)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = model.to(d.device, memory_format=fmt)
    if freeze_bn:
        freeze_batchnorm(model)
    head = {id(p) for p in head_parameters(model)}
    body = [p for p in model.parameters() if id(p) not in head and p.requires_grad]
    opt = torch.optim.Adam([{"params": body, "lr": cfg.lr, "name": "backbone"},
                            {"params": head_parameters(model), "lr": cfg.head_lr,
                             "name": "head"}], weight_decay=cfg.weight_decay)
    amp = amp_dtype(cfg.amp, d.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    crit = nn.CrossEntropyLoss(weight=data.loss_weight.to(d.device) if data.loss_weight is not None
                               else None, label_smoothing=cfg.label_smoothing)
    net = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device] if d.device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=cfg.warmup_epochs > 0)
    run = _Run(out, data, model, net, opt, scaler, crit, amp, freeze_bn, timm_name, pre,
               fingerprint=prints, backbone=backbone)
    if ckpt is not None:
        meta, state = ckpt["meta"], ckpt["meta"]["train_state"]
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        records.set_rng_state(state["rng"])
        run.history, run.best, run.bad_epochs = meta["history"], state["best"], state["bad_epochs"]
        run.start = state["epoch"]
        log.info("resuming %s at epoch %d of %d", out, run.start + 1, cfg.epochs)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"timm_name": timm_name, "classes": list(data.classes),
                    "device": str(d.device), "processes": d.world, "freeze_bn": freeze_bn,
                    "amp": str(amp).removeprefix("torch.") if amp else "off",
                    "train_images": len(data.train_rows), "val_images": len(data.val_rows),
                    "preprocess": pre.to_dict()}
        records.write_config({**asdict(cfg), "resolved": resolved}, out / "config.yaml")
    return run


def _resume_checkpoint(cfg: TrainConfig, out: Path, now: dict[str, Any]) -> dict:
    """``last.pt`` of the run in ``out``, checked against every result-affecting setting of
    ``cfg`` and the content of its files (:func:`~histoclass.train.config.fingerprint`)."""
    ckpt = read_checkpoint(out / "last.pt")
    saved = ckpt["meta"].get("fingerprint")
    if saved is None:  # written before fingerprints: compare the settings it recorded
        config = ckpt["meta"]["config"]
        saved = {k: config.get(k) for k in now if not k.endswith("_sha256")}
        now = {k: now[k] for k in saved}
        log.warning("%s predates setting fingerprints: file contents (manifest, weights, "
                    "stain target) cannot be checked", out / "last.pt")
    changed = fingerprint_changes(saved, now)
    if changed:
        raise ValueError(f"--resume with other settings than {out / 'last.pt'}: "
                         + ", ".join(changed) + "; resume with the same settings, or train "
                         "into another --out")
    return ckpt


def _write_epoch(run: _Run, cfg: TrainConfig, row: dict[str, Any], improved: bool,
                 plot: bool) -> None:
    """Rank 0's records of an epoch: summary line, ``best.pt`` if improved, ``last.pt``,
    ``history.csv``, and ``curves.png`` when ``plot`` or every 5th epoch (matplotlib is slow)."""
    from tqdm.auto import tqdm

    epoch = row["epoch"]
    tqdm.write(records.epoch_line(row, improved))  # below the finished progress bar

    def meta_of(**extra: Any) -> dict[str, Any]:
        return models.member_meta(cfg.model, run.timm_name, run.data.classes, run.pre,
                                  task=cfg.task, drop_rate=cfg.drop_rate,
                                  stain=run.data.stain_meta, config=asdict(cfg),
                                  fingerprint=run.fingerprint, history=run.history,
                                  **run.backbone.meta(),
                                  input=run.data.input_mode.to_dict(),
                                  **run.data.resolution, **extra)

    if improved:
        save_checkpoint(run.out / "best.pt", run.model, meta_of(metrics=run.best, epoch=epoch))
    state = {"epoch": epoch, "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict(), "rng": records.rng_state(), "best": run.best,
             "bad_epochs": run.bad_epochs}
    save_checkpoint(run.out / "last.pt", run.model,
                    meta_of(metrics=run.best, epoch=epoch, train_state=state))
    records.write_history(run.history, run.out / "history.csv")
    if plot or epoch % 5 == 0:
        records.plot_history(run.history, run.out / "curves.png", cfg.select,
                             (run.best or {}).get("epoch"))
