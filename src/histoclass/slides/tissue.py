"""Tissue detection on a low-resolution thumbnail, and each tile's tissue fraction.

Method (:data:`METHOD`): stained tissue is coloured and glass is grey-white, so pixels are
split by HSV saturation (averaged over 3x3 thumbnail pixels) at Otsu's threshold, kept within
:data:`GLASS_MARGIN` above the glass's own saturation (the median saturation of the pixels on
Otsu's glass side whose every channel is >= 200) and never below :data:`MIN_SATURATION`. The
margin keeps Otsu from cutting between pale and dark tissue when a slide holds both (the bundled
BreakHis 200X phyllodes field has a median saturation of ~0.08, a carcinoma field ~0.3) while
tinted glass stays glass. Near-black pixels (value < 0.1: pen, dust, folds) are dropped, a
closing then an opening with a 3x3 square join nuclei and remove specks, and connected pieces
and holes smaller than ``min_area_mm2`` are removed and filled.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_SATURATION = 0.03
GLASS_MARGIN = (0.02, 0.04)
GLASS_MIN_VALUE = 200  # every channel at least this bright (of 255) to count as glass
MIN_VALUE = 0.1
DEFAULT_MIN_AREA_MM2 = 0.01  # 100 x 100 um; a BreakHis 40X field is ~0.075 mm^2
METHOD = ("3x3-averaged HSV saturation above Otsu's threshold, kept 0.02-0.04 above the glass's "
          "saturation (>= 0.03), value >= 0.1; 3x3 closing then opening; pieces and holes < "
          "{min_area:g} mm^2 removed/filled; on a thumbnail at {mpp:.3g} um/px")


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64)
    if p.sum() == 0:
        return 1.0
    p /= p.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m = np.cumsum(p * centres)
    total = m[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m) ** 2 / (w0 * (1.0 - w0))
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray, mpp: float, min_area_mm2: float = DEFAULT_MIN_AREA_MM2
                ) -> np.ndarray:
    """Boolean ``HxW`` tissue mask of an RGB thumbnail at ``mpp`` microns per pixel."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Pairwise maximum/minimum: ~10x faster than reducing over a last axis of 3.
    hi8, lo8 = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    hi = hi8.astype(np.float32) / 255.0
    sat = (hi8 - lo8).astype(np.float32) / np.maximum(hi8, 1).astype(np.float32)
    sat = ndimage.uniform_filter(sat, 3)
    lit = hi >= MIN_VALUE
    cut = otsu(sat[lit]) if lit.any() else 1.0
    # Glass is bright in every channel (pale pink tissue is not); too few such pixels means a
    # field full of tissue, measured against clean glass.
    glass = sat[(lo8 >= GLASS_MIN_VALUE) & (sat < cut)]
    g = float(np.median(glass)) if glass.size >= 0.01 * sat.size else 0.0
    cut = max(float(np.clip(cut, g + GLASS_MARGIN[0], g + GLASS_MARGIN[1])), MIN_SATURATION)
    mask = (sat > cut) & lit
    square = np.ones((3, 3), bool)
    mask = ndimage.binary_closing(mask, square, border_value=0)
    mask = ndimage.binary_opening(mask, square)
    min_px = min_area_mm2 * 1e6 / (mpp * mpp)
    mask = _drop_small(mask, min_px)
    return ~_drop_small(~mask, min_px)  # fill holes smaller than the minimum area


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def tile_fractions(mask: np.ndarray, scale: float, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each level-0 box ``(x, y, w, h)`` that the mask marks as tissue.

    Args:
        mask: Tissue mask of the whole slide.
        scale: Mask pixels per level-0 pixel.
        boxes: ``[N, 4]`` level-0 boxes; parts beyond the slide count as glass.
    """
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), np.int64)  # summed-area table: any box sum in O(1)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0, y0 = np.round(boxes[:, 0] * scale), np.round(boxes[:, 1] * scale)
    x1 = np.round((boxes[:, 0] + boxes[:, 2]) * scale)
    y1 = np.round((boxes[:, 1] + boxes[:, 3]) * scale)
    cx0, cx1 = (np.clip(v, 0, w).astype(int) for v in (x0, x1))
    cy0, cy1 = (np.clip(v, 0, h).astype(int) for v in (y0, y1))
    inside = table[cy1, cx1] - table[cy0, cx1] - table[cy1, cx0] + table[cy0, cx0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)  # unclipped: beyond the slide is glass
    return np.clip(inside / area, 0.0, 1.0)
