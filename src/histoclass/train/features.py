"""Frozen-backbone embeddings of manifest images, with an on-disk cache shared between runs.

A linear probe (:mod:`histoclass.train.linear`) reads every train and validation image once
through the frozen backbone; refitting the head, or probing again with another ``C`` grid,
selection score or class balance, should not pay for that again. The cache stores one float32
``.npy`` per image and setting, named by the sha256 of:

* the image file's bytes (sha256: a renamed or moved copy is a hit, an edited file a miss);
* the backbone: timm name, constructor arguments and the sha256 of its weights (every tensor
  of the state dict except the classifier's, which the embedding never sees);
* the preprocessing (input size, mean/std, interpolation), the stain normaliser's key,
  the input mode (``resize``: the whole field squashed to the input size) and the embedding
  rule (:func:`histoclass.models.presets.embed`), and the precision (float32).

Files are written atomically (temporary file, then ``os.replace``), so concurrent runs sharing
one cache never read half a file; two runs extracting the same image write the same bytes.
The folder is ``--feature-cache DIR``, else ``$HISTOCLASS_FEATURE_CACHE``, else
``~/.cache/histoclass/features``; ``off`` disables it. Features computed on another device
differ from these by float rounding only, so the device is not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoclass.data.files import atomic_write, remove_stale_temps
from histoclass.data.transforms import Preprocess
from histoclass.models.checkpoint import file_sha256
from histoclass.models.classifier import Preparation
from histoclass.models.presets import embed

log = logging.getLogger(__name__)
ENV = "HISTOCLASS_FEATURE_CACHE"
DEFAULT_DIR = "~/.cache/histoclass/features"
INPUT_MODE = {"mode": "resize"}  # the whole field squashed to the input size (data.transforms)
TILE_CHUNK = 256  # tiles per forward pass (as models.tiles.CHUNK)


def cache_root(setting: str | None) -> Path | None:
    """The cache folder for ``--feature-cache`` (``None``: the environment or the default;
    ``off``: no cache)."""
    value = setting if setting else os.environ.get(ENV) or DEFAULT_DIR
    return None if value == "off" else Path(value).expanduser()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the model's state dict (names and bytes, in order), its classifier left out:
    the embedding does not depend on it, and a fresh head is initialised at random."""
    head = model.get_classifier()
    prefix = next((f"{name}." for name, m in model.named_modules() if m is head), None)
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if prefix is not None and name.startswith(prefix):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def setting_key(timm_name: str, model_args: dict[str, Any] | None, weights: str,
                pre: Preprocess, stain_key: str, rule: str,
                input_mode: dict[str, Any] | None = None) -> str:
    """sha256 of everything but the image that decides an embedding (module docstring)."""
    setting = {"timm_name": timm_name, "model_args": model_args or {}, "weights_sha256": weights,
               "preprocess": pre.to_dict(), "stain": stain_key,
               "input_mode": input_mode or INPUT_MODE,
               "embedding": rule, "dtype": "float32"}
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """One ``.npy`` per (image bytes, setting) under ``root`` (``None``: nothing is kept)."""

    def __init__(self, root: Path | None, setting: str) -> None:
        self.root, self.setting = root, setting
        self.write_failed = False
        if root is not None:
            remove_stale_temps(root, recursive=True)  # of killed runs (atomic_write: > 60 s old)

    def file(self, image_sha256: str) -> Path | None:
        """Where the embedding of an image with these bytes lives."""
        if self.root is None:
            return None
        key = hashlib.sha256(f"{self.setting}|{image_sha256}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npy"

    def get(self, image_sha256: str) -> np.ndarray | None:
        """The cached embedding, or ``None`` (absent, or torn by a killed writer)."""
        file = self.file(image_sha256)
        if file is None or not file.is_file():
            return None
        try:
            arr = np.load(file)
        except (OSError, ValueError):
            return None
        return arr if arr.ndim == 1 and arr.dtype == np.float32 else None

    def put(self, image_sha256: str, arr: np.ndarray) -> None:
        """Store an embedding atomically; a full or read-only disk only costs time later."""
        file = self.file(image_sha256)
        if file is None:
            return
        try:
            atomic_write(file, lambda fh: np.save(fh, arr))
        except OSError as exc:
            if not self.write_failed:
                log.warning("feature cache not written (%s); features will be extracted again "
                            "next time", exc)
            self.write_failed = True


@dataclass
class Features:
    """Embeddings of a list of images, in order, and how many came from the cache."""

    x: np.ndarray  # [N, D] float32
    cached: int
    extracted: int


def extract(model: nn.Module, paths: Sequence[str], preparation: Preparation,
            cache: FeatureCache, *, rule: str = "cls", device: torch.device | str = "cpu",
            batch_size: int = 32, workers: int = 2) -> Features:
    """Embeddings of ``paths`` by the frozen ``model`` (eval mode, no augmentation), through
    the prediction path's ``preparation``; cache hits are not decoded at all.

    Raises:
        ValueError: Naming the images that cannot be read (the run stops before fitting).
    """
    from histoclass.predict import prepared_batches

    shas = [file_sha256(p) for p in paths]
    found = [cache.get(s) for s in shas]
    todo = [i for i, f in enumerate(found) if f is None]
    bad: list[tuple[str, str]] = []
    if todo:
        model = model.eval().to(device)
        with torch.inference_mode():
            for rows, items, skipped in prepared_batches([paths[i] for i in todo], preparation,
                                                         batch_size, workers, desc="features"):
                bad += skipped
                if not rows:
                    continue
                emb = _embed_items(model, [item[0] for item in items], rule, device)
                for r, e in zip(rows, emb, strict=True):
                    i = todo[r]
                    found[i] = np.ascontiguousarray(e, dtype=np.float32)
                    cache.put(shas[i], found[i])
    if bad:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:5])
        raise ValueError(f"{len(bad)} of {len(paths)} train/val image(s) cannot be read "
                         f"(changed since the split?): {shown}{'; ...' if len(bad) > 5 else ''}"
                         "; restore them or re-run histoclass split")
    dims = {f.shape[0] for f in found}
    if len(dims) > 1:  # a hash collision or a hand-edited cache; never mix embeddings
        raise ValueError(f"feature cache {cache.root}: embeddings of different sizes {dims} "
                         "for one setting; delete the folder and run again")
    return Features(np.stack(found) if found else np.zeros((0, 0), np.float32),
                    len(paths) - len(todo), len(todo))


def _embed_items(model: nn.Module, items: list[torch.Tensor], rule: str,
                 device: torch.device | str) -> np.ndarray:
    """``[N, D]`` embeddings of N prepared inputs: ``3xHxW`` images (resize), or ``Tx3xSxS``
    tile stacks (``--input tiles``), whose embedding is the mean of the tiles' (so the folded
    linear head's logits are the mean of the tiles' logits, as prediction averages them)."""
    if items[0].ndim == 3:
        return embed(model, torch.stack(items).to(device), rule).float().cpu().numpy()
    counts = [len(t) for t in items]
    x = torch.cat(items)
    parts = [embed(model, x[i:i + TILE_CHUNK].to(device), rule).float().cpu()
             for i in range(0, len(x), TILE_CHUNK)]
    per_tile = torch.cat(parts)
    return torch.stack([t.mean(0) for t in per_tile.split(counts)]).numpy()
