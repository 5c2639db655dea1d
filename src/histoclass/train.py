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
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from histoclass import distributed
from histoclass import train_utils as tu
from histoclass.train_data import build_data
from histoclass.train_utils import NonFiniteLossError

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "TrainConfig", "train"]

CHOICES = {
    "task": ("binary", "subtype"), "schedule": ("constant", "cosine"),
    "balance": ("none", "weights", "sampler"), "select": tuple(tu.SELECT),
    "amp": ("auto", "off", "bf16", "fp16"),
}
# Settings that must match when a run is resumed (the rest, e.g. epochs or workers, may change).
RESUME_FIXED = ("model", "task", "fold", "magnification", "batch_size", "image_size", "seed",
                "lr", "head_lr", "schedule", "balance", "label_smoothing", "drop_rate")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.yaml`` and in checkpoints.

    ``cache_dir`` ``""`` means ``<out>/cache``, ``None`` no cache. ``freeze_bn`` ``None`` means
    frozen when starting from ImageNet weights, trained from random initialisation (frozen
    random statistics would leave the network unnormalised). ``batch_size`` is the global
    batch, split evenly over processes under ``torchrun``. ``patience`` 0 disables early stopping.
    """

    manifest: str
    out: str
    model: str = "v2-b0"
    task: str = "binary"
    fold: int | None = None
    magnification: str | None = None
    epochs: int = 40
    batch_size: int = 32
    image_size: int | None = None
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    drop_rate: float = 0.3
    pretrained: bool = True
    weights: str | None = None
    freeze_bn: bool | None = None
    warmup_epochs: int = 0
    schedule: str = "constant"
    patience: int = 0
    balance: str = "none"
    label_smoothing: float = 0.0
    select: str = "balanced_accuracy"
    color_jitter: float = 0.0
    hed_jitter: float = 0.0
    stain: str | None = None
    stain_target: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    workers: int | None = None
    cache_dir: str | None = ""
    resume: bool = False

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting and its valid values."""
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: "
                                 f"choose one of {', '.join(valid)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs {self.epochs} / --batch-size {self.batch_size}: "
                             "must be >= 1")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs}: "
                             f"must be in [0, {self.epochs})")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        if bool(self.stain) != bool(self.stain_target):
            raise ValueError("--stain METHOD and --stain-target IMAGE go together")


def train(config: TrainConfig) -> Path:
    """Train one member as ``config`` says; returns the path of ``best.pt``."""
    config.check()
    owner = not torch.distributed.is_initialized()  # train_all keeps one group for all
    d = distributed.setup(config.device)
    try:
        return _run(config, d)
    finally:
        if owner:
            distributed.cleanup(d)


def _run(cfg: TrainConfig, d: distributed.Dist) -> Path:
    from histoclass.models import create_model, member_meta, model_preprocess, resolve_arch
    from histoclass.models.checkpoint import build_model, save_checkpoint

    out = Path(cfg.out)
    if not cfg.resume and (out / "last.pt").exists():
        raise ValueError(f"{out} already holds a run (last.pt); pass --resume to continue it "
                         "or choose another --out")
    if d.world > 1 and cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {d.world} processes")
    torch.manual_seed(cfg.seed)  # same initial head on every process
    timm_name = resolve_arch(cfg.model)
    data = build_data(cfg, d)
    ckpt = _resume_checkpoint(cfg, out) if cfg.resume else None
    if ckpt is None:
        model = create_model(cfg.model, len(data.classes), pretrained=cfg.pretrained,
                             weights=cfg.weights, drop_rate=cfg.drop_rate)
    else:  # weights come from last.pt: no hub download, no weights file needed
        model = build_model(ckpt["meta"])
        model.load_state_dict(ckpt["state_dict"])
    pre = model_preprocess(model, cfg.image_size)
    data.make_datasets(pre)
    freeze_bn = cfg.freeze_bn if cfg.freeze_bn is not None else bool(cfg.weights or cfg.pretrained)
    cl = cfg.channels_last
    model = model.to(d.device, memory_format=torch.channels_last if cl else torch.preserve_format)
    if freeze_bn:
        tu.freeze_batchnorm(model)
    head = {id(p) for p in tu.head_parameters(model)}
    backbone = [p for p in model.parameters() if id(p) not in head and p.requires_grad]
    opt = torch.optim.Adam([{"params": backbone, "lr": cfg.lr, "name": "backbone"},
                            {"params": tu.head_parameters(model), "lr": cfg.head_lr,
                             "name": "head"}], weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    amp = tu.amp_dtype(cfg.amp, d.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    crit = nn.CrossEntropyLoss(weight=data.loss_weight.to(d.device) if data.loss_weight is not None
                               else None, label_smoothing=cfg.label_smoothing)
    net = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device] if d.device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=cfg.warmup_epochs > 0)

    history: list[dict] = []
    best, bad_epochs, start = None, 0, 0
    if ckpt is not None:
        meta, state = ckpt["meta"], ckpt["meta"]["train_state"]
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        tu.set_rng_state(state["rng"])
        history, best, bad_epochs = meta["history"], state["best"], state["bad_epochs"]
        start = state["epoch"]
        log.info("resuming %s at epoch %d of %d", out, start + 1, cfg.epochs)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"timm_name": timm_name, "classes": list(data.classes),
                    "device": str(d.device), "processes": d.world, "freeze_bn": freeze_bn,
                    "amp": str(amp).removeprefix("torch.") if amp else "off",
                    "train_images": len(data.train_rows), "val_images": len(data.val_rows),
                    "preprocess": pre.to_dict()}
        tu.write_config({**asdict(cfg), "resolved": resolved}, out / "config.yaml")

    def meta_of(**extra):  # reads the loop's current history
        return member_meta(cfg.model, timm_name, data.classes, pre, task=cfg.task,
                           drop_rate=cfg.drop_rate, stain=data.stain_meta, config=asdict(cfg),
                           history=history, **extra)

    steps = len(data.train_loader)
    total = steps * cfg.epochs
    from tqdm.auto import tqdm

    for epoch in range(start, cfg.epochs):
        data.set_epoch(epoch)
        torch.manual_seed(tu.epoch_seed(cfg.seed, epoch, d.rank))  # dropout, in-process augment
        warm = epoch < cfg.warmup_epochs
        for p in backbone:
            p.requires_grad_(not warm)
        net.train()
        if freeze_bn:
            tu.freeze_batchnorm(model)
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(data.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not d.main,
                   leave=True, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            f = tu.lr_factor(cfg.schedule, epoch * steps + i, total)
            for g, base in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = base * f
            x = x.to(d.device, non_blocking=True,
                     memory_format=torch.channels_last if cl else torch.preserve_format)
            y = y.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=amp) if amp else nullcontext():
                logits = net(x)
            loss = crit(logits.float(), y)
            value = distributed.mean_across(loss.item(), d)
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"training loss became {value} at epoch {epoch + 1}, batch {i + 1} "
                    f"(lr {cfg.lr:g}, head lr {cfg.head_lr:g}); the run is stopped. Lower --lr/"
                    "--head-lr, or use --amp off if mixed precision overflows")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(y)
            loss_sum += value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        seconds = time.perf_counter() - t0
        val = tu.evaluate(model, data.val_loader, d, amp, cl)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen,
               "train_accuracy": distributed.mean_across(correct / seen, d),
               **{f"val_{k}": v for k, v in val.items()}, "lr": cfg.lr * f,
               "seconds": round(seconds, 3), "images_per_s": round(seen * d.world / seconds, 2)}
        history.append(row)
        improved = tu.better(val, best, cfg.select)
        best = {**val, "epoch": epoch + 1} if improved else best
        bad_epochs = 0 if improved else bad_epochs + 1
        stop = cfg.patience > 0 and bad_epochs >= cfg.patience
        if d.main:
            bar.write(f"epoch {epoch + 1}: " + " ".join(
                f"{k}={v:.4f}" for k, v in row.items() if k.startswith(("train_", "val_")))
                + (" *" if improved else ""))
            if improved:
                save_checkpoint(out / "best.pt", model, meta_of(metrics=best, epoch=epoch + 1))
            state = {"epoch": epoch + 1, "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "rng": tu.rng_state(), "best": best,
                     "bad_epochs": bad_epochs}
            save_checkpoint(out / "last.pt", model,
                            meta_of(metrics=best, epoch=epoch + 1, train_state=state))
            tu.write_history(history, out / "history.csv")
            if stop or epoch + 1 == cfg.epochs or (epoch + 1) % 5 == 0:  # matplotlib is slow
                tu.plot_history(history, out / "curves.png", cfg.select)
        if stop:
            log.info("early stop: no better val %s for %d epochs", cfg.select, cfg.patience)
            break
    if d.main:
        (out / "done").write_text(f"{len(history)} epochs; best {best}\n")
    return out / "best.pt"


def _resume_checkpoint(cfg: TrainConfig, out: Path) -> dict:
    """``last.pt`` of the run in ``out``, checked against ``cfg``'s fixed settings."""
    from histoclass.models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(out / "last.pt")
    saved = ckpt["meta"]["config"]
    changed = [k for k in RESUME_FIXED if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"--resume with other settings than {out / 'last.pt'}: "
                         + ", ".join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}"
                                     for k in changed))
    return ckpt
