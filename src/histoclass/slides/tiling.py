"""The tile grid at a model's resolution, and which level a tile is read from.

A tile is what one network input covers (:class:`~histoclass.models.resolution.Resolution`):
``field * model_mpp`` microns, i.e. ``field * model_mpp / slide_mpp`` level-0 pixels, read from
the coarsest level at least as fine as the finest member input needs and resized by the model's
own preparation (exactly as its training images were). Tiles step by ``(1 - overlap)`` of their
size and cover the whole slide (edge tiles run past it onto white glass).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from histoclass.models.classifier import Classifier
from histoclass.models.resolution import Resolution
from histoclass.slides.reader import Slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """Tile geometry in level-0 pixels and the level tiles are read from."""

    tile_w: float
    tile_h: float
    stride_x: float
    stride_y: float
    cols: int
    rows: int
    level: int
    upsampled: bool

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Level-0 ``(x, y, w, h)`` of one cell (integers: what is read and recorded)."""
        return (round(col * self.stride_x), round(row * self.stride_y), round(self.tile_w),
                round(self.tile_h))

    def boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """``[N, 2]`` (row, col) and ``[N, 4]`` level-0 boxes of every cell, row by row."""
        r, c = np.divmod(np.arange(self.rows * self.cols), self.cols)
        boxes = np.stack([np.round(c * self.stride_x), np.round(r * self.stride_y),
                          np.full(r.shape, round(self.tile_w)),
                          np.full(r.shape, round(self.tile_h))], 1).astype(np.int64)
        return np.stack([r, c], 1), boxes

    def to_dict(self) -> dict[str, Any]:
        """Plain types for ``summary.json``."""
        return {"tile_level0": [round(self.tile_w), round(self.tile_h)],
                "stride_level0": [self.stride_x, self.stride_y], "grid": [self.rows, self.cols],
                "level": self.level, "upsampled": self.upsampled}


def input_mpp(res: Resolution, clf: Classifier) -> float:
    """Microns per input pixel of the member that needs the finest read (members may differ in
    input size; each resizes the same tile, and a ``tiles`` member reads it at its training
    resolution, native pixels)."""
    finest = math.inf
    prep = clf.preparation
    for i, (pre, _) in enumerate(prep.steps):
        if i < len(prep.inputs) and prep.inputs[i].tiles:
            finest = min(finest, res.mpp)
            continue
        h, w = pre.input_size
        finest = min(finest, res.microns[0] / w, res.microns[1] / h)
    return finest


def make_grid(slide: Slide, res: Resolution, clf: Classifier, overlap: float = 0.0) -> Grid:
    """The grid of ``res``-sized tiles over ``slide``.

    Raises:
        ValueError: ``overlap`` outside [0, 0.9].
    """
    if not 0.0 <= overlap <= 0.9:
        raise ValueError(f"--overlap {overlap}: choose a fraction in [0, 0.9]")
    tw, th = (um / slide.mpp for um in res.microns)
    sx, sy = tw * (1 - overlap), th * (1 - overlap)
    cols = max(1, math.ceil((slide.width - tw) / sx) + 1) if slide.width > tw else 1
    rows = max(1, math.ceil((slide.height - th) / sy) + 1) if slide.height > th else 1
    need = input_mpp(res, clf)
    level, upsampled = slide.level_for(need)
    if upsampled:
        log.warning("%s: scanned at %.3g um/px but the model looks at %.3g um/px: tiles are "
                    "upsampled %.2fx from level 0 (the model sees less detail than in "
                    "training)", slide.path, slide.mpp, need, slide.mpp / need)
    return Grid(tw, th, sx, sy, cols, rows, level, upsampled)
