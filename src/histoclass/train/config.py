"""The settings of one training run: :class:`TrainConfig`, its valid choices and its checks.

This module is the top of the training package's imports: it imports nothing from
``histoclass.train``, so every other training module can read the config without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

# Direction of each selectable validation score: higher is better except for the loss.
SELECT = {"balanced_accuracy": 1.0, "auc": 1.0, "loss": -1.0}
CHOICES = {
    "task": ("binary", "subtype"), "schedule": ("constant", "cosine"),
    "balance": ("none", "weights", "sampler"), "select": tuple(SELECT),
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
    ``train_mpp`` (microns per pixel of the training images) ``None`` means the BreakHis value of
    the training rows' one magnification, or unknown (see :meth:`RunData.resolution`).
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
    train_mpp: float | None = None
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
        if self.train_mpp is not None and not self.train_mpp > 0:
            raise ValueError(f"--train-mpp {self.train_mpp}: microns per pixel must be > 0")
        if bool(self.stain) != bool(self.stain_target):
            raise ValueError("--stain METHOD and --stain-target IMAGE go together")
