"""The data side of a training run: manifest rows, datasets, loaders, balancing, stain step.

Only the manifest's ``train`` and ``val`` rows are kept; ``test`` rows are dropped here, before
any image is opened, so a run can never look at the test set.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Subset

from histoclass import distributed
from histoclass import train_utils as tu
from histoclass.data import LABELS, SUBTYPES, load_rgb, read_manifest, select

if TYPE_CHECKING:
    from histoclass.data.transforms import Preprocess
    from histoclass.train import TrainConfig

log = logging.getLogger(__name__)

TASKS = {"binary": (LABELS, "label"), "subtype": (SUBTYPES, "subtype")}


def fit_stain(method: str, target: str) -> Any:
    """Fit ``histoclass.stain``'s ``method`` to the target image (lazy: optional module)."""
    try:
        from histoclass import stain
    except ImportError:
        raise ValueError("stain normalization is not available in this installation "
                         "(histoclass.stain is missing); drop --stain") from None
    if method not in stain.METHODS:
        raise ValueError(f"--stain {method!r}: choose one of {', '.join(stain.METHODS)}")
    import numpy as np

    return stain.fit(method, [np.asarray(load_rgb(target))])


class RunData:
    """Rows, class vocabulary and loaders of one run (see :func:`build_data`)."""

    def __init__(self, cfg: TrainConfig, d: distributed.Dist) -> None:
        self.cfg, self.d = cfg, d
        self.classes, self.target = TASKS[cfg.task]
        frame = read_manifest(cfg.manifest)
        if cfg.magnification:
            mag = cfg.magnification.upper()
            mag = mag if mag.endswith("X") else f"{mag}X"
            if "magnification" not in frame.columns:
                raise ValueError(f"--magnification {mag}: {cfg.manifest} has no magnification "
                                 "column (not BreakHis data?)")
            known = sorted(set(frame["magnification"]) - {""})
            frame = frame[frame["magnification"] == mag]
            if frame.empty:
                raise ValueError(f"--magnification {mag}: no such images; the manifest has "
                                 f"{known}")
        self.train_rows = select(frame, "train", cfg.fold)
        self.val_rows = select(frame, "val", cfg.fold)
        del frame  # the test rows go no further
        for name, rows in (("train", self.train_rows), ("val", self.val_rows)):
            if rows.empty:
                raise ValueError(f"{cfg.manifest}: the {name} split is empty"
                                 + (f" for fold {cfg.fold}" if cfg.fold is not None else ""))
        if cfg.task == "subtype":
            for name, rows in (("train", self.train_rows), ("val", self.val_rows)):
                if "subtype" not in rows.columns:
                    raise ValueError(f"--task subtype: {cfg.manifest} has no subtype column")
                empty = rows[rows["subtype"].astype(str).str.strip() == ""]
                if len(empty):
                    raise ValueError(
                        f"--task subtype: {len(empty)} {name} row(s) have no subtype (e.g. "
                        f"{', '.join(empty['path'].head(3))}); use --task binary or a "
                        "BreakHis-named data set")
        self.stain, self.stain_meta, self.stain_key = None, None, ""
        if cfg.stain:
            norm = fit_stain(cfg.stain, cfg.stain_target)
            self.stain, self.stain_meta, self.stain_key = norm, norm.to_dict(), norm.key
        targets = [self.classes.index(v) for v in self.train_rows[self.target]
                   if v in self.classes]
        weights = tu.class_weights(targets, len(self.classes))
        self.loss_weight = weights if cfg.balance == "weights" else None
        self.sample_weights = weights[targets].tolist() if cfg.balance == "sampler" else None
        log.info("train %d images, val %d images; classes %s", len(self.train_rows),
                 len(self.val_rows), list(self.classes))

    def make_datasets(self, pre: Preprocess) -> None:
        """Build datasets and loaders once the model's preprocessing is known."""
        from histoclass.data.dataset import ManifestDataset
        from histoclass.data.transforms import Augment

        cfg, d = self.cfg, self.d
        cache = cfg.cache_dir
        cache = os.path.join(cfg.out, "cache") if cache == "" else cache
        common = {"classes": self.classes, "target": self.target, "cache_dir": cache,
                  "stain": self.stain, "stain_key": self.stain_key}
        aug = Augment(color_jitter=cfg.color_jitter, hed_jitter=cfg.hed_jitter)
        train_ds = ManifestDataset(self.train_rows, pre, train=True, augment=aug, **common)
        val_ds = ManifestDataset(self.val_rows, pre, train=False, **common)
        if d.enabled:  # each process scores its share; metrics see the gathered whole
            val_ds = Subset(val_ds, range(d.rank, len(val_ds), d.world))
        workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
        self.sampler = tu.EpochSampler(len(train_ds), cfg.seed, d.rank, d.world,
                                       self.sample_weights)
        # Reseeded each epoch: worker processes draw their augmentation seeds from it.
        self.generator = torch.Generator()
        pin = d.device.type == "cuda"
        per_rank = cfg.batch_size // d.world
        self.train_loader = DataLoader(train_ds, batch_size=per_rank, sampler=self.sampler,
                                       num_workers=workers, generator=self.generator,
                                       pin_memory=pin, persistent_workers=False)
        self.val_loader = DataLoader(val_ds, batch_size=per_rank, num_workers=workers,
                                     pin_memory=pin)

    def set_epoch(self, epoch: int) -> None:
        """Fix this epoch's order and augmentation seeds."""
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(tu.epoch_seed(self.cfg.seed, epoch, 1000 + self.d.rank))


def build_data(cfg: TrainConfig, d: distributed.Dist) -> RunData:
    """Read and check the manifest for ``cfg`` (datasets follow via ``make_datasets``)."""
    return RunData(cfg, d)
