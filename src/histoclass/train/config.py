"""The settings of one training run: :class:`TrainConfig`, its valid choices and its checks.

This module is the top of the training package's imports: it imports nothing from
``histoclass.train``, so every other training module can read the config without a cycle.
"""

from __future__ import annotations

import hashlib
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# Direction of each selectable validation score: higher is better except for the loss.
SELECT = {"balanced_accuracy": 1.0, "auc": 1.0, "loss": -1.0}
CHOICES = {
    "task": ("binary", "subtype"), "schedule": ("constant", "cosine"),
    "balance": ("none", "weights", "sampler"), "select": tuple(SELECT),
    "amp": ("auto", "off", "bf16", "fp16"), "input": ("resize", "tiles"),
    "head": ("finetune", "linear"), "calibrate": ("temperature", "none"),
    "probe_select": ("val", "cv"),
}
# Settings added after fingerprints were: left out of a fingerprint at these values, so a run
# saved before them (which had exactly this behaviour) still resumes.
LATER_DEFAULTS: dict[str, Any] = {"input": "resize", "tile_stride": None, "head": "finetune",
                                   "probe_select": "val"}
# Settings that may change when a run is resumed: how long it trains and where it runs. Every
# other setting is part of the result (a new setting is too, unless listed here): --resume
# checks them, with the content of the manifest, the weights file and the stain target, against
# the checkpoint's ``fingerprint`` (:func:`fingerprint`).
# Calibration is fitted after the last epoch and changes no weight, so it may change too.
RESUME_FREE = ("out", "epochs", "patience", "device", "workers", "cache_dir", "resume",
               "feature_cache", "calibrate", "refer_risk", "refer_delta")
# Paths whose file content, not their name, is what matters.
HASHED = ("manifest", "weights", "stain_target")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.yaml`` and in checkpoints.

    ``cache_dir`` ``""`` means ``<out>/cache``, ``None`` no cache. ``freeze_bn`` ``None`` means
    frozen when starting from ImageNet weights, trained from random initialisation (frozen
    random statistics would leave the network unnormalised). ``batch_size`` is the global
    batch, split evenly over processes under ``torchrun``. ``patience`` 0 disables early stopping.
    ``train_mpp`` (microns per pixel of the training images) ``None`` means the BreakHis value of
    the training rows' one magnification, or unknown (see :meth:`RunData.resolution`).
    ``model_args`` are extra timm constructor arguments (``--model-arg``, plain scalars; see
    :func:`histoclass.models.model_args.parse_model_args`), ``None`` for none. ``input``
    ``resize`` squashes each field to the input size (the study); ``tiles`` trains on one random
    native-resolution crop per sample and validates (and predicts) on the average over the
    field's tiles, ``tile_stride`` pixels apart (``None``: the tile size, no overlap; see
    :mod:`histoclass.data.field_tiles`).
    ``head`` ``finetune`` is the study's recipe; ``linear`` a logistic-regression probe on the
    frozen backbone (:mod:`histoclass.train.linear`), whose embeddings are cached in
    ``feature_cache`` (``None``: ``$HISTOCLASS_FEATURE_CACHE`` or
    ``~/.cache/histoclass/features``; ``off``: none).
    """

    manifest: str
    out: str
    model: str = "v2-b0"
    model_args: dict[str, Any] | None = None
    task: str = "binary"
    fold: int | None = None
    magnification: str | None = None
    epochs: int = 40
    batch_size: int = 32
    image_size: int | None = None
    input: str = "resize"
    tile_stride: int | None = None
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
    head: str = "finetune"
    feature_cache: str | None = None
    calibrate: str = "temperature"
    refer_risk: float | None = None
    refer_delta: float = 0.1
    probe_select: str = "val"

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
        if self.tile_stride is not None and (self.input != "tiles" or self.tile_stride < 1):
            raise ValueError(f"--tile-stride {self.tile_stride}: needs --input tiles and a "
                             "stride >= 1 pixel")
        if self.probe_select != "val" and self.head != "linear":
            raise ValueError(f"--probe-select {self.probe_select}: chooses a linear probe's C; "
                             "it needs --head linear")
        if self.refer_risk is not None and not 0 < self.refer_risk < 1:
            raise ValueError(f"--refer-risk {self.refer_risk}: must be in (0, 1)")
        if not 0 < self.refer_delta < 1:
            raise ValueError(f"--refer-delta {self.refer_delta}: must be in (0, 1)")
        if self.train_mpp is not None and not self.train_mpp > 0:
            raise ValueError(f"--train-mpp {self.train_mpp}: microns per pixel must be > 0")
        if self.model_args:
            from histoclass.models.model_args import check_model_args

            check_model_args(self.model_args)
        if bool(self.stain) != bool(self.stain_target):
            raise ValueError("--stain METHOD and --stain-target IMAGE go together")


def file_sha256(path: str | None) -> str | None:
    """Content hash of a settings file (``None`` for no file, ``missing`` if it is gone)."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return "missing"
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """Every result-affecting setting of ``cfg``, files by content hash (``<name>_sha256``):
    stored in checkpoints, compared by ``--resume``."""
    out = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE and k not in HASHED
           and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    out.update({f"{k}_sha256": file_sha256(getattr(cfg, k)) for k in HASHED})
    return out


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key old -> new`` for every setting that differs (a key absent on one side included)."""
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


# -- a small typed schema for configuration files ----------------------------------------------
# Dataclasses and their type hints are the schema (TrainConfig is already one), checked by the
# few lines below: pydantic would be a new required dependency for one check of a YAML file,
# and its messages would not name our blocks and flags.
def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) \
            if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
    if origin is typing.Literal:
        return value in args
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return "null" if hint is type(None) else str(getattr(hint, "__name__", hint))


def check_block(values: Any, schema: dict[str, Any], block: str) -> None:
    """Raise ``ValueError`` naming the block, the key and the valid keys when ``values`` has a
    key ``schema`` (name -> type hint) does not know, or a value of the wrong type."""
    if not isinstance(values, dict):
        raise ValueError(f"{block}: must be a mapping of settings, got {values!r}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ValueError(f"{block}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: "
                         f"{', '.join(sorted(schema))}")
    for key, value in values.items():
        if not _matches(value, schema[key]):
            raise ValueError(f"{block}: {key} = {value!r} ({type(value).__name__}) must be "
                             f"{_type_name(schema[key])}")


def train_schema(exclude: tuple[str, ...] = ("manifest", "out", "task", "fold", "resume")
                 ) -> dict[str, Any]:
    """:class:`TrainConfig`'s fields and types, less those a pipeline sets itself."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig) if f.name not in exclude}
