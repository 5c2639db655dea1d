"""The data side of a training run: manifest rows, datasets, loaders, balancing, stain step.

Only the manifest's ``train`` and ``val`` rows are kept; ``test`` rows are dropped here, before
any image is opened, so a run can never look at the test set. Each epoch's order and
augmentation seeds come from (seed, epoch), so a resumed run replays the epochs it continues.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, Subset

from histoclass.data import LABELS, SUBTYPES, load_rgb, read_manifest, select
from histoclass.train.config import TrainConfig
from histoclass.train.distributed import Dist

if TYPE_CHECKING:
    from histoclass.data.field_tiles import InputMode
    from histoclass.data.transforms import Preprocess

log = logging.getLogger(__name__)

TASKS = {"binary": (LABELS, "label"), "subtype": (SUBTYPES, "subtype")}


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


def fit_stain(method: str, target: str) -> Any:
    """Fit ``histoclass.stain``'s ``method`` to the target image.

    Raises:
        ValueError: ``method`` is not one of ``histoclass.stain.METHODS``.
    """
    from histoclass import stain  # only runs with --stain pay for its import

    if method not in stain.METHODS:
        raise ValueError(f"--stain {method!r}: choose one of {', '.join(stain.METHODS)}")
    return stain.fit(method, [np.asarray(load_rgb(target))])


def check_readable(datasets: Sequence[Any], workers: int = 2) -> None:
    """Decode every image of ``datasets`` once, before the first epoch.

    An image that became unreadable after ``histoclass split`` would otherwise stop training
    mid-epoch with a DataLoader traceback. With the decode cache this costs nothing extra: it
    fills the cache the first epoch would fill (without one, it is one more decoding pass).

    Raises:
        ValueError: Naming the unreadable files and why: the run stops before it starts.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[Any, int]) -> tuple[str, str] | None:
        ds, i = job
        try:
            ds.image(i)
        except Exception as exc:  # whatever the decoder or the stain step raises
            return ds.paths[i], getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        return None

    jobs = [(ds, i) for ds in datasets for i in range(len(ds))]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        bad = [r for r in pool.map(one, jobs) if r is not None]
    if bad:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:5])
        raise ValueError(f"{len(bad)} of {len(jobs)} train/val image(s) cannot be read (changed "
                         f"since the split?): {shown}{'; ...' if len(bad) > 5 else ''}; restore "
                         "them or re-run histoclass split")


class RunData:
    """Rows, class vocabulary and loaders of one run (see :func:`build_data`)."""

    def __init__(self, cfg: TrainConfig, d: Dist) -> None:
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
        weights = class_weights(targets, len(self.classes))
        self.loss_weight = weights if cfg.balance == "weights" else None
        self.sample_weights = weights[targets].tolist() if cfg.balance == "sampler" else None
        log.info("train %d images, val %d images; classes %s", len(self.train_rows),
                 len(self.val_rows), list(self.classes))

    @functools.cached_property
    def resolution(self) -> dict[str, Any]:
        """``train_mpp`` and ``train_field`` for the checkpoint: what one input covers.

        The images are squashed whole to the input size, so the field is their (median) size.
        ``train_mpp`` is ``--train-mpp``, else the BreakHis value of the training rows' single
        magnification (:data:`histoclass.data.breakhis.MPP`), else unknown (``None``): a model
        trained on several magnifications has no one resolution for slides.
        """
        from histoclass.data.breakhis import MPP

        rows, mpp = self.train_rows, self.cfg.train_mpp
        mags = sorted(set(rows["magnification"]) - {""}) if "magnification" in rows else []
        if mpp is None and len(mags) == 1 and mags[0] in MPP:
            mpp = MPP[mags[0]]
            log.info("training resolution %g um/px (BreakHis %s)", mpp, mags[0])
        elif mpp is None:
            log.warning("training resolution unknown (magnifications %s): pass --train-mpp so "
                        "that `histoclass slide` can read slides at this model's resolution",
                        mags or "not recorded")
        if {"width", "height"} <= set(rows.columns) and (rows["width"] != "").all():
            field = [int(np.median(rows[c].astype(int))) for c in ("width", "height")]
        else:
            field = list(load_rgb(rows["path"].iloc[0]).size)
        return {"train_mpp": mpp, "train_field": field}

    def make_datasets(self, pre: Preprocess) -> None:
        """Build datasets and loaders once the model's preprocessing is known."""
        from histoclass.data.dataset import ManifestDataset
        from histoclass.data.transforms import Augment

        cfg, d = self.cfg, self.d
        self.input_mode = input_mode(cfg, pre)
        cache = cfg.cache_dir
        cache = os.path.join(cfg.out, "cache") if cache == "" else cache
        common = {"classes": self.classes, "target": self.target, "cache_dir": cache,
                  "stain": self.stain, "stain_key": self.stain_key, "tiles": self.input_mode}
        aug = Augment(color_jitter=cfg.color_jitter, hed_jitter=cfg.hed_jitter)
        train_ds = ManifestDataset(self.train_rows, pre, train=True, augment=aug, **common)
        val_ds = ManifestDataset(self.val_rows, pre, train=False, **common)
        workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
        check_readable([train_ds, val_ds], workers)  # before any epoch, not mid-epoch
        if d.enabled:  # each process scores its share; metrics see the gathered whole
            val_ds = Subset(val_ds, range(d.rank, len(val_ds), d.world))
        self.sampler = EpochSampler(len(train_ds), cfg.seed, d.rank, d.world,
                                    self.sample_weights)
        # Reseeded each epoch: worker processes draw their augmentation seeds from it.
        self.generator = torch.Generator()
        pin = d.device.type == "cuda"
        per_rank = cfg.batch_size // d.world
        self.train_loader = DataLoader(train_ds, batch_size=per_rank, sampler=self.sampler,
                                       num_workers=workers, generator=self.generator,
                                       pin_memory=pin, persistent_workers=False)
        self.val_loader = DataLoader(val_ds, batch_size=per_rank, num_workers=workers,
                                     pin_memory=pin, collate_fn=tile_batch
                                     if self.input_mode.tiles else None)

    def set_epoch(self, epoch: int) -> None:
        """Fix this epoch's order and augmentation seeds."""
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.cfg.seed, epoch, 1000 + self.d.rank))


def tile_batch(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[Any, torch.Tensor]:
    """Evaluation items of a tiles dataset (``Tx3xSxS``, label) -> ``(Tiles, targets)``."""
    from histoclass.models.tiles import collate_tiles

    return collate_tiles([x for x, _ in batch]), torch.tensor([y for _, y in batch])


def build_data(cfg: TrainConfig, d: Dist) -> RunData:
    """Read and check the manifest for ``cfg`` (datasets follow via ``make_datasets``)."""
    return RunData(cfg, d)


def input_mode(cfg: TrainConfig, pre: Preprocess) -> InputMode:
    """The member's :class:`~histoclass.data.field_tiles.InputMode` for ``cfg.input``: tiles
    are the model's (square) input size, ``cfg.tile_stride`` apart.

    Raises:
        ValueError: A non-square input or a stride larger than the tile.
    """
    from histoclass.data.field_tiles import InputMode

    if cfg.input != "tiles":
        return InputMode()
    h, w = pre.input_size
    if h != w:
        raise ValueError(f"--input tiles: {cfg.model} takes {h}x{w} inputs; tiles are "
                         "square (pass --image-size)")
    mode = InputMode("tiles", h, cfg.tile_stride or h)
    if mode.stride > h:
        raise ValueError(f"--tile-stride {cfg.tile_stride}: must be in [1, {h}] (the "
                         "tile size; a larger stride leaves gaps)")
    return mode
