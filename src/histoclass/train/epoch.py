"""One epoch of the recipe: :func:`train_one_epoch` and :func:`evaluate`, and their parts.

Plain functions in the style of torchvision's classification references: the driver
(:func:`histoclass.train.loop.train`) builds the model, optimiser and loaders once and calls
these every epoch. Undefined validation metrics (AUC with a class missing, or everything on an
empty set) are ``None``, as in :mod:`histoclass.metrics`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from histoclass.train import distributed
from histoclass.train.config import SELECT, TrainConfig
from histoclass.train.distributed import Dist

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("accuracy", "balanced_accuracy", "loss", "auc")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite: the run cannot recover by itself."""


def freeze_batchnorm(model: nn.Module) -> int:
    """Put BN layers in eval mode and stop their parameters' gradients; returns how many.

    Call after every ``model.train()``: fine-tuning on a few thousand images with small batches
    would otherwise overwrite ImageNet running statistics with noisy ones (the study's recipe).
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            n += 1
    return n


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the new classifier head."""
    return list(model.get_classifier().parameters())


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Learning-rate multiplier at ``step`` of ``total`` (cosine decays to 0; constant is 1)."""
    if schedule == "cosine" and total > 0:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return 1.0


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (``auto``: bf16 on CUDA where supported, else fp16)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None  # CPU autocast is slower than fp32 on most CPUs
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
    """Accuracy, balanced accuracy, cross-entropy and AUC (one-vs-rest macro for >2 classes).

    AUC is ``None`` when a class is missing from ``targets`` (undefined, not zero); every
    metric is ``None`` for empty input.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from histoclass import metrics as hm

    logits, targets = logits.float(), targets.long()
    if len(targets) == 0:
        return dict.fromkeys(METRIC_COLUMNS)
    probs = logits.softmax(1).numpy()
    y, pred = targets.numpy(), probs.argmax(1)
    n_classes = probs.shape[1]
    with warnings.catch_warnings():  # a class never predicted is not worth a warning here
        warnings.simplefilter("ignore")
        bal = float(balanced_accuracy_score(y, pred))
        if n_classes == 2:
            auc = hm.auc(y == 1, probs[:, 1], name="auc")
        elif len(np.unique(y)) == n_classes:
            auc = float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(n_classes))))
        else:
            log.warning("auc is undefined (a class is missing); reporting null")
            auc = None
    return {
        "accuracy": float((pred == y).mean()), "balanced_accuracy": bal,
        "loss": float(nn.functional.cross_entropy(logits, targets)), "auc": auc,
    }


def _undefined(value: float | None) -> bool:
    """True for a metric that cannot rank a checkpoint: ``None`` (undefined) or NaN."""
    return value is None or math.isnan(value)


def better(new: dict[str, float | None], best: dict[str, float | None] | None,
           select: str) -> bool:
    """True when ``new`` validation metrics beat ``best`` by ``select`` (ties: lower loss).

    An undefined (``None``) score never wins, and any defined score beats an undefined best.
    """
    if best is None:
        return True
    if _undefined(new[select]):
        return False
    if _undefined(best[select]):
        return True
    sign = SELECT[select]
    a, b = sign * new[select], sign * best[select]
    if a > b:
        return True
    return a == b and select != "loss" and new["loss"] < best["loss"]


def train_one_epoch(net: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: DataLoader, d: Dist, epoch: int, cfg: TrainConfig, *,
                    scaler: torch.amp.GradScaler, amp: torch.dtype | None,
                    freeze_bn: bool) -> dict[str, float]:
    """One pass over ``loader``: per-step learning rate, autocast forward, scaled backward.

    During the first ``cfg.warmup_epochs`` epochs only the head trains (the optimiser's
    ``backbone`` group is frozen). The learning rate of each group (``backbone``: ``cfg.lr``,
    ``head``: ``cfg.head_lr``) is set before every step from ``cfg.schedule``.

    Args:
        net: The model as trained (wrapped in DistributedDataParallel when distributed).
        criterion: The loss.
        optimizer: Adam with the ``backbone`` and ``head`` parameter groups.
        loader: This process's training batches (its sampler already set to ``epoch``).
        d: This process's place in the run.
        epoch: 0-based epoch number.
        cfg: The run's settings.
        scaler: Loss scaler (enabled for fp16 autocast only).
        amp: Autocast dtype, ``None`` for fp32.
        freeze_bn: Keep batch-norm layers in eval mode (see :func:`freeze_batchnorm`).

    Returns:
        ``loss`` (mean over images), ``accuracy`` (mean over processes), ``lr`` (the backbone's
        at the last step), ``seconds`` and ``images_per_s`` (all processes).

    Raises:
        NonFiniteLossError: The loss became NaN or infinite.
    """
    from tqdm.auto import tqdm

    warm = epoch < cfg.warmup_epochs
    base_lr = {"backbone": cfg.lr, "head": cfg.head_lr}
    for g in optimizer.param_groups:
        if g["name"] == "backbone":
            for p in g["params"]:
                p.requires_grad_(not warm)
    net.train()
    if freeze_bn:
        freeze_batchnorm(net)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    steps = len(loader)
    total = steps * cfg.epochs
    t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
    # disable=None: a bar on a terminal, none in a log file (SLURM); other ranks never draw.
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=None if d.main else True, leave=True, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        f = lr_factor(cfg.schedule, epoch * steps + i, total)
        for g in optimizer.param_groups:
            g["lr"] = base_lr[g["name"]] * f
        x = x.to(d.device, non_blocking=True, memory_format=fmt)
        y = y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=amp) if amp else nullcontext():
            logits = net(x)
        loss = criterion(logits.float(), y)
        value = distributed.mean_across(loss.item(), d)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {epoch + 1}, batch {i + 1} "
                f"(lr {cfg.lr:g}, head lr {cfg.head_lr:g}); the run is stopped. Lower --lr/"
                "--head-lr, or use --amp off if mixed precision overflows")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        seen += len(y)
        loss_sum += value * len(y)
        correct += int((logits.argmax(1) == y).sum())
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    seconds = time.perf_counter() - t0
    return {"loss": loss_sum / seen, "accuracy": distributed.mean_across(correct / seen, d),
            "lr": cfg.lr * f, "seconds": round(seconds, 3),
            "images_per_s": round(seen * d.world / seconds, 2)}


def evaluate(model: nn.Module, loader: DataLoader, d: Dist, amp: torch.dtype | None = None,
             channels_last: bool = False, head: str = "finetune") -> dict[str, float | None]:
    """:func:`metrics` of ``model`` over ``loader``, gathered from every process."""
    return metrics(*collect_logits(model, loader, d, amp, channels_last, head))


def collect_logits(model: nn.Module, loader: DataLoader, d: Dist,
                   amp: torch.dtype | None = None, channels_last: bool = False,
                   head: str = "finetune") -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` of ``model`` over ``loader``, gathered from every process. A batch
    of :class:`~histoclass.models.tiles.Tiles` is scored per field, as predict does
    (:func:`~histoclass.models.tiles.member_logits` with ``head``)."""
    from histoclass.models.tiles import Tiles, member_logits

    model.eval()
    logits, targets = [], []
    fmt = torch.channels_last if channels_last else torch.preserve_format
    with torch.no_grad():
        for x, y in loader:
            x = x.to(d.device, non_blocking=True, memory_format=fmt)
            with torch.autocast(d.device.type, dtype=amp) if amp else nullcontext():
                z = member_logits(model, x, head=head)[1] if isinstance(x, Tiles) else model(x)
                logits.append(z.float().cpu())
            targets.append(y)
    parts = distributed.gather((torch.cat(logits) if logits else torch.empty(0, 0),
                                torch.cat(targets) if targets else torch.empty(0)), d)
    parts = [p for p in parts if len(p[1])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
