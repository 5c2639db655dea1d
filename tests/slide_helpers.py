"""Synthetic whole slides for tests and benchmarks: real H&E images on white glass, written as
pyramidal tiled TIFFs (zlib, resolution tags) that OpenSlide reads with their microns per pixel.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from histoclass.data.manifest import sample_path


def sample_images(n: int | None = None) -> list[np.ndarray]:
    """The bundled real H&E images (BreakHis 700x460, then UCSB 896x768) as RGB arrays."""
    files = sorted(sample_path("breakhis").glob("*.png")) + sorted(
        sample_path("ucsb").rglob("*.jpg"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files[:n]]


def canvas(width: int, height: int, placed: Sequence[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """White ``height x width`` RGB glass with each image pasted at its ``(x, y)``."""
    out = np.full((height, width, 3), 255, np.uint8)
    for x, y, img in placed:
        h, w = img.shape[:2]
        out[y:y + h, x:x + w] = img[:max(0, height - y), :max(0, width - x)]
    return out


def write_slide(path: Path, image: np.ndarray, mpp: float | None = 0.5, levels: int = 3,
                tile: int = 256) -> Path:
    """A pyramidal tiled TIFF of ``image`` (level ``i`` downsampled ``2**i`` by area averaging),
    with resolution tags giving ``mpp`` at level 0 (``None``: no resolution tags)."""
    import tifffile

    lvl = image
    with tifffile.TiffWriter(path) as tw:
        for i in range(levels):
            kw = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2 ** i)  # pixels per centimetre
                kw = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(lvl, tile=(tile, tile), compression="zlib", photometric="rgb",
                     subfiletype=0 if i == 0 else 1, **kw)
            h, w = lvl.shape[0] // 2, lvl.shape[1] // 2
            if min(h, w) < 1:
                break
            lvl = np.asarray(Image.fromarray(lvl).resize((w, h), Image.Resampling.BOX))
    return path


def write_sparse_slide(path: Path, width: int, height: int,
                       blocks: dict[tuple[int, int], np.ndarray], mpp: float = 0.5,
                       levels: int = 6, tile: int = 512) -> Path:
    """An enormous tiled TIFF without ever holding it: every tile is white glass except the
    level-0 tiles in ``blocks`` (``(tile col, tile row) -> tile x tile x 3`` image); coarser
    levels are white but for the blocks' area averages. Tiles are encoded once and repeated."""
    import tifffile

    white = zlib.compress(np.full((tile, tile, 3), 255, np.uint8).tobytes(), 6)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        w, h, cur = width, height, dict(blocks)
        for i in range(levels):
            cols, rows = -(-w // tile), -(-h // tile)
            enc = {k: zlib.compress(np.ascontiguousarray(v).tobytes(), 6) for k, v in cur.items()}

            def tiles(cols=cols, rows=rows, enc=enc) -> Iterator[bytes]:
                for r in range(rows):
                    for c in range(cols):
                        yield enc.get((c, r), white)

            res = 1e4 / (mpp * 2 ** i)
            tw.write(tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", photometric="rgb", subfiletype=0 if i == 0 else 1,
                     resolution=(res, res), resolutionunit="CENTIMETER")
            nxt: dict[tuple[int, int], np.ndarray] = {}
            for (c, r), img in cur.items():  # each block shrinks into a quarter of a tile
                key = (c // 2, r // 2)
                base = nxt.setdefault(key, np.full((tile, tile, 3), 255, np.uint8))
                half = np.asarray(Image.fromarray(img).resize((tile // 2, tile // 2),
                                                              Image.Resampling.BOX))
                oy, ox = (r % 2) * tile // 2, (c % 2) * tile // 2
                base[oy:oy + tile // 2, ox:ox + tile // 2] = half
            w, h, cur = max(1, w // 2), max(1, h // 2), nxt
    return path


def tiny_member(path: Path, train_mpp: float | None = 0.5, field: Sequence[int] | None = (64, 64),
                size: int = 64, seed: int = 0) -> Path:
    """A timm ``test_efficientnet`` member checkpoint recording its training resolution."""
    import torch

    from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint

    torch.manual_seed(seed)
    model = create_model("test_efficientnet", 2, pretrained=False)
    extra = {} if train_mpp is None else {"train_mpp": train_mpp, "train_field": list(field)}
    meta = member_meta("test_efficientnet", "test_efficientnet", ["benign", "malignant"],
                       model_preprocess(model, size), **extra)
    return save_checkpoint(path, model, meta)
