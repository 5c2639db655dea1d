"""A torch ``Dataset`` over manifest rows, with an optional decoded-image cache.

Per item: decode -> optional stain normalisation -> resize to the model's input size (this much
is cacheable) -> random augmentation (training only) -> normalise. Decoding a 700x460 PNG costs
more than a small model's forward pass on CPU, so the cache stores the resized uint8 array once
and later epochs read it back with ``np.load``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from histoclass.data.breakhis import LABELS
from histoclass.data.field_tiles import InputMode, field_tiles
from histoclass.data.files import atomic_write, remove_stale_temps
from histoclass.data.images import load_rgb
from histoclass.data.transforms import Augment, Preprocess

log = logging.getLogger(__name__)
# A stain normaliser or any other whole-image step applied before resizing.
PreFn = Callable[[np.ndarray], np.ndarray]


class DecodedCache:
    """Resized uint8 images on disk, keyed by file identity and preprocessing.

    The key covers path, size, modification time, output size, interpolation and the key of any
    stain step, so a changed file or setting is never served stale.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.root, recursive=True)  # left by killed runs
        self.write_failed = False

    def _file(self, path: str, pre: Preprocess, pre_key: str) -> Path:
        st = os.stat(path)
        ident = (f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{pre.input_size}|"
                 f"{pre.interpolation}|{pre_key}")
        key = hashlib.sha1(ident.encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npy"

    def get_or_make(self, path: str, pre: Preprocess, pre_key: str,
                    make: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for ``path``, computing and storing it on a miss."""
        file = self._file(path, pre, pre_key)
        if file.is_file():
            try:
                return np.load(file)
            except (OSError, ValueError):
                pass  # a torn write from a killed run: recompute below
        arr = make()
        try:  # atomic: concurrent DataLoader workers never see half a file
            atomic_write(file, lambda fh: np.save(fh, arr))
        except OSError as exc:  # the cache only saves time: a full disk must not stop a run
            if not self.write_failed:
                log.warning("decode cache not written (%s); decoding every time instead", exc)
            self.write_failed = True
        return arr


def load_resized(path: str, pre: Preprocess, stain: PreFn | None = None,
                 native: bool = False) -> np.ndarray:
    """Decode, stain-normalise (optional) and resize one image to ``HxWx3`` uint8 (``native``:
    no resize, for native-resolution tiles)."""
    img = load_rgb(path)
    if stain is not None:
        from PIL import Image

        img = Image.fromarray(stain(np.asarray(img)))
    return np.array(img, dtype=np.uint8) if native else pre.resize(img)


class ManifestDataset(Dataset):
    """Images and integer targets from manifest rows.

    Args:
        frame: Manifest rows (already restricted to one split).
        preprocess: The model's preprocessing.
        classes: Class names in output order; the target column's values must be among them.
        target: Manifest column holding the class (``label`` or ``subtype``).
        train: Apply random augmentation.
        augment: Which augmentations.
        cache_dir: Folder for the decoded-image cache; ``None`` decodes every time.
        stain: Optional whole-image step before resizing (stain normalisation).
        stain_key: Identifies ``stain`` in cache keys (e.g. method and fitted target hash).
        tiles: Native-resolution tiles (:class:`~histoclass.data.field_tiles.InputMode`) instead
            of the resize: a training item is one random crop of the tile size (reflect-padded
            where the field is smaller), an evaluation item the ``Tx3xSxS`` stack of the field's
            tiles (:func:`~histoclass.data.field_tiles.field_tiles`).
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        preprocess: Preprocess,
        *,
        classes: Sequence[str] = LABELS,
        target: str = "label",
        train: bool = False,
        augment: Augment | None = None,
        cache_dir: str | Path | None = None,
        stain: PreFn | None = None,
        stain_key: str = "",
        tiles: InputMode | None = None,
    ) -> None:
        if target not in frame.columns:
            raise ValueError(f"target column {target!r} not in manifest {list(frame.columns)}")
        bad = sorted(set(frame[target]) - set(classes))
        if bad:
            example = frame.loc[frame[target].isin(bad), "path"].iloc[0]
            raise ValueError(
                f"{target} value(s) {bad} (e.g. {example}) not in classes {list(classes)}"
            )
        self.paths = list(frame["path"])
        index = {c: i for i, c in enumerate(classes)}
        self.targets = [index[v] for v in frame[target]]
        self.preprocess = preprocess
        self.augment = (augment or Augment()).build() if train else None
        self.cache = DecodedCache(cache_dir) if cache_dir else None
        self.stain, self.stain_key = stain, stain_key
        self.tiles = tiles if tiles is not None and tiles.tiles else None
        self.crop = None
        if self.tiles is not None and train:
            from torchvision.transforms import v2

            self.crop = v2.RandomCrop(self.tiles.size, pad_if_needed=True,
                                      padding_mode="reflect")
        if stain is not None and not stain_key and cache_dir:
            raise ValueError("a stain step with a cache needs a stain_key to key the cache")

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> np.ndarray:
        """The resized, un-augmented ``HxWx3`` uint8 image of row ``i``."""
        path, native = self.paths[i], self.tiles is not None
        if self.cache is None:
            return load_resized(path, self.preprocess, self.stain, native)
        return self.cache.get_or_make(
            path, self.preprocess, self.stain_key + ("|native" if native else ""),
            lambda: load_resized(path, self.preprocess, self.stain, native),
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.tiles is not None and self.crop is None:  # evaluation: every tile
            tiles = field_tiles(self.image(i), self.tiles.size, self.tiles.stride)
            x = self.preprocess.normalize(torch.from_numpy(tiles).permute(0, 3, 1, 2))
            return x.contiguous(), self.targets[i]
        t = torch.from_numpy(self.image(i)).permute(2, 0, 1)
        if self.crop is not None:
            t = self.crop(t)
        if self.augment is not None:
            t = self.augment(t)
        return self.preprocess.normalize(t.contiguous()), self.targets[i]
