"""Native-resolution tiles of a field of view (``--input tiles``), and their inverse for maps.

The study squashes a whole field (700x460 for BreakHis) to the model input (224x224), which
changes the pixel scale and the aspect ratio. A ``tiles`` member instead sees the field at its
native resolution: training crops one random ``size`` x ``size`` window per sample, and
prediction covers the field with a grid of windows (:func:`tile_boxes`) whose outputs are
averaged. The grid needs no padding: the last window in each axis is shifted inward to end at
the border (so it overlaps its neighbour); only a field smaller than ``size`` in an axis is
reflect-padded to ``size``.

numpy only: the batching and reduction of tile outputs are in :mod:`histoclass.models.tiles`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("resize", "tiles")
EDGE = "shift-inward, reflect-pad if smaller"
# A field tiled at stride 1 would give one window per pixel: beyond this many windows per image
# an input is refused rather than exhausting memory.
MAX_TILES = 4096


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]  # padded up to ``size`` (equal: exactly one window)
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)  # shifted inward to end at the border
    return starts


def tile_boxes(width: int, height: int, size: int, stride: int | None = None
               ) -> list[tuple[int, int]]:
    """Top-left corners ``(x, y)`` of the ``size`` x ``size`` windows covering a field,
    row by row (``y`` outer, ``x`` inner).

    Windows start every ``stride`` pixels (default ``size``: no overlap); the last one in each
    axis ends at the border. An axis shorter than ``size`` has the one start 0 (the field is
    reflect-padded to ``size`` there, see :func:`field_tiles`).

    Example: a 700x460 field at 224 gives xs ``[0, 224, 448, 476]``, ys ``[0, 224, 236]``.

    Raises:
        ValueError: A non-positive size, or a stride outside ``[1, size]`` (a larger stride
            would leave gaps between windows).
    """
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"tile size {size!r}: must be an integer >= 1")
    stride = size if stride is None else stride
    if not (isinstance(stride, int) and 1 <= stride <= size):
        raise ValueError(f"tile stride {stride!r}: must be an integer in [1, {size}] (the tile "
                         "size; a larger stride would leave gaps)")
    if width < 1 or height < 1:
        raise ValueError(f"field {width}x{height}: must be at least 1x1 pixels")
    xs, ys = _starts(width, size, stride), _starts(height, size, stride)
    if len(xs) * len(ys) > MAX_TILES:
        raise ValueError(f"field {width}x{height} at tile {size}, stride {stride} gives "
                         f"{len(xs) * len(ys)} tiles (more than {MAX_TILES}); use a larger "
                         "stride")
    return [(x, y) for y in ys for x in xs]


def pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    """``HxWx3`` reflect-padded (bottom/right) so both sides are at least ``size``."""
    h, w = arr.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if not ph and not pw:
        return arr
    # numpy reflects repeatedly when the pad exceeds the side; a 1-pixel side can only repeat.
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode=mode)


def field_tiles(arr: np.ndarray, size: int, stride: int | None = None) -> np.ndarray:
    """The windows of :func:`tile_boxes` cut from an ``HxWx3`` uint8 field: ``TxSxSx3``."""
    h, w = arr.shape[:2]
    boxes = tile_boxes(w, h, size, stride)
    padded = pad_to(np.asarray(arr), size)
    return np.stack([padded[y:y + size, x:x + size] for x, y in boxes])


def stitch(maps: np.ndarray, width: int, height: int, size: int, stride: int | None = None
           ) -> np.ndarray:
    """Per-tile maps ``TxSxS`` (in :func:`tile_boxes` order) -> one ``height x width`` map,
    averaged where windows overlap (padding cut off)."""
    boxes = tile_boxes(width, height, size, stride)
    if len(maps) != len(boxes):
        raise ValueError(f"{len(maps)} tile maps for {len(boxes)} tiles of a {width}x{height} "
                         "field")
    total = np.zeros((max(height, size), max(width, size)), np.float64)
    count = np.zeros_like(total)
    for (x, y), m in zip(boxes, maps, strict=True):
        total[y:y + size, x:x + size] += m
        count[y:y + size, x:x + size] += 1
    return (total / count)[:height, :width].astype(np.float32)


@dataclass(frozen=True)
class InputMode:
    """How a member's input is cut from a field: ``resize`` (the study's squash) or ``tiles``.

    Stored as checkpoint ``meta["input"]`` = ``{"mode", "size", "stride", "edge"}``; a file
    without it is ``resize``.
    """

    mode: str = "resize"
    size: int | None = None
    stride: int | None = None

    @property
    def tiles(self) -> bool:
        """Native-resolution tiles rather than a resize."""
        return self.mode == "tiles"

    def to_dict(self) -> dict[str, Any]:
        """Plain types for checkpoints and ONNX metadata."""
        return {"mode": self.mode, "size": self.size, "stride": self.stride, "edge": EDGE}

    @classmethod
    def from_dict(cls, d: Any) -> InputMode:
        """Inverse of :meth:`to_dict`, checked (``None``: an older file, ``resize``).

        Raises:
            ValueError: An unknown mode, or a tiles mode without a valid size and stride.
        """
        if d is None:
            return cls()
        if not isinstance(d, dict) or d.get("mode") not in MODES:
            got = d.get("mode") if isinstance(d, dict) else d
            raise ValueError(f"input mode {got!r}: choose one of {', '.join(MODES)}")
        if d["mode"] == "resize":
            return cls()
        size, stride = d.get("size"), d.get("stride")
        size_ok = isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= 4096
        if not size_ok:
            raise ValueError(f"input size {size!r}: tiles need an integer side in [8, 4096]")
        stride = size if stride is None else stride
        if not (isinstance(stride, int) and not isinstance(stride, bool)
                and 1 <= stride <= size):
            raise ValueError(f"input stride {stride!r}: must be an integer in [1, {size}]")
        return cls("tiles", size, stride)
