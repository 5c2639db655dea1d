"""Pieces of the training loop kept out of ``train.py``: sampling, metrics, records, plots."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from histoclass import distributed

METRIC_COLUMNS = ("accuracy", "balanced_accuracy", "loss", "auc")
# Higher is better for every selectable score except the loss.
SELECT = {"balanced_accuracy": 1.0, "auc": 1.0, "loss": -1.0}


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite: the run cannot recover by itself."""


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed for one (run seed, epoch, process): resuming at an epoch replays it exactly."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class EpochSampler(Sampler[int]):
    """Shuffled (or class-balanced) indices, fixed by seed and epoch, sharded over processes.

    Every process draws the same permutation from ``(seed, epoch)`` and takes every
    ``world``-th index, padded so all processes run the same number of batches (DDP needs that).

    Args:
        n: Dataset length.
        seed: Run seed.
        rank: This process's rank.
        world: Number of processes.
        weights: Per-item sampling weights (balanced sampling, with replacement); ``None``
            for a plain permutation.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1,
                 weights: Sequence[float] | None = None) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            idx = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            idx = torch.randperm(self.n, generator=g)
        idx = idx.tolist()
        idx += idx[: len(self) * self.world - self.n]
        return iter(idx[self.rank::self.world])


def class_weights(targets: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (C * count)``, 0 for classes absent from training."""
    counts = torch.bincount(torch.as_tensor(targets), minlength=n_classes).double()
    w = torch.where(counts > 0, len(targets) / (n_classes * counts.clamp_min(1)), 0.0)
    return w.float()


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


def metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy, cross-entropy and AUC (one-vs-rest macro for >2 classes).

    AUC is NaN when a class is missing from ``targets`` (undefined, not zero).
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    logits, targets = logits.float(), targets.long()
    if len(targets) == 0:
        return dict.fromkeys(METRIC_COLUMNS, float("nan"))
    probs = logits.softmax(1).numpy()
    y, pred = targets.numpy(), probs.argmax(1)
    n_classes = probs.shape[1]
    with warnings.catch_warnings():  # a class never predicted is not worth a warning here
        warnings.simplefilter("ignore")
        bal = float(balanced_accuracy_score(y, pred))
        auc = float("nan")
        if len(np.unique(y)) == n_classes:
            auc = float(roc_auc_score(y, probs[:, 1]) if n_classes == 2 else
                        roc_auc_score(y, probs, multi_class="ovr", labels=list(range(n_classes))))
    return {
        "accuracy": float((pred == y).mean()), "balanced_accuracy": bal,
        "loss": float(nn.functional.cross_entropy(logits, targets)), "auc": auc,
    }


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (``auto``: bf16 on CUDA where supported, else fp16)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None  # CPU autocast is slower than fp32 on most CPUs
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def evaluate(model: nn.Module, loader: DataLoader, d: distributed.Dist,
             amp: torch.dtype | None = None, channels_last: bool = False) -> dict[str, float]:
    """:func:`metrics` of ``model`` over ``loader``, gathered from every process."""
    model.eval()
    logits, targets = [], []
    fmt = torch.channels_last if channels_last else torch.preserve_format
    with torch.no_grad():
        for x, y in loader:
            x = x.to(d.device, non_blocking=True, memory_format=fmt)
            with torch.autocast(d.device.type, dtype=amp) if amp else nullcontext():
                logits.append(model(x).float().cpu())
            targets.append(y)
    parts = distributed.gather((torch.cat(logits) if logits else torch.empty(0, 0),
                                torch.cat(targets) if targets else torch.empty(0)), d)
    parts = [p for p in parts if len(p[1])]
    return metrics(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def better(new: dict[str, float], best: dict[str, float] | None, select: str) -> bool:
    """True when ``new`` validation metrics beat ``best`` by ``select`` (ties: lower loss)."""
    if best is None:
        return True
    sign = SELECT[select]
    a, b = sign * new[select], sign * best[select]
    if math.isnan(a):
        return False
    if math.isnan(b) or a > b:
        return True
    return a == b and select != "loss" and new["loss"] < best["loss"]


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors (loadable with ``weights_only=True``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_config(config: dict[str, Any], path: Path) -> None:
    """The resolved settings as YAML (``workers`` ``None`` shown as the number used)."""
    import os

    import yaml

    config = {**config}
    if config.get("workers") is None:
        config["workers"] = min(4, os.cpu_count() or 1)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    """One CSV row per epoch."""
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def plot_history(rows: list[dict[str, Any]], path: Path, select: str) -> None:
    """Learning curves: losses on the left, validation scores on the right."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (servers, workers)
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], label="train")
    a.plot(ep, [r["val_loss"] for r in rows], label="validation")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a.legend()
    for key in ("train_accuracy", "val_accuracy", "val_balanced_accuracy", "val_auc"):
        b.plot(ep, [r[key] for r in rows], label=key)
    b.set(xlabel="epoch", ylim=(0, 1.02), title=f"scores (selection: val {select})")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
