"""Whole-slide images through OpenSlide: levels, microns per pixel, and reads at a resolution.

OpenSlide (the ``openslide-python`` + ``openslide-bin`` wheels, extra ``slides``) reads SVS,
NDPI, MRXS, SCN, BIF, DICOM and tiled TIFF pyramids. Regions come back as RGBA; transparent
pixels (outside the scanned area) become white glass. OpenSlide releases the GIL while it
decodes, so reader threads overlap with inference. An OpenSlide error leaves the handle unusable,
so the first failed read ends the slide with one line naming it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
# A level counts as fine enough for a target within this relative slack (downsamples such as
# 3.9998 instead of 4 are rounding, not a coarser level).
SLACK = 0.01
# Most level pixels read to build one thumbnail (the tissue mask): a slide without a pyramid
# coarse enough is refused rather than decoded for minutes.
MAX_THUMBNAIL_SOURCE = 2_000_000_000
_CHUNK = 2048  # level pixels per side read at once for a thumbnail: memory stays ~16 MB


class SlideError(ValueError):
    """A slide that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Level:
    """One pyramid level: size in its own pixels and its downsample from level 0."""

    index: int
    width: int
    height: int
    downsample: float


def openslide_module():
    """The ``openslide`` module, or a :class:`SlideError` saying how to install it."""
    try:
        import openslide
    except ImportError as exc:
        raise SlideError(f"reading slides needs OpenSlide ({exc}); "
                         "pip install 'histoclass[slides]'") from None
    return openslide


class Slide:
    """An open slide with its microns per pixel (from the file, else ``mpp``).

    Args:
        path: Slide file.
        mpp: Microns per pixel of level 0 for a slide that does not record it (a slide's own
            value wins; a different ``mpp`` is reported).

    Raises:
        SlideError: Not a slide, unreadable, or no microns per pixel from either source.
    """

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        openslide = openslide_module()
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError(f"{self.path}: no such slide file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            if _is_tiff(self.path):
                raise SlideError(f"{self.path}: a TIFF file OpenSlide cannot open (truncated, "
                                 "corrupt, or not tiled)") from None
            raise SlideError(f"{self.path}: not a slide OpenSlide can read (unsupported format "
                             "or not a slide file)") from None
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"{self.path}: unreadable slide ({exc})") from None
        osr = self._osr
        self.levels = [Level(i, *osr.level_dimensions[i], float(osr.level_downsamples[i]))
                       for i in range(osr.level_count)]
        self.width, self.height = osr.dimensions
        self.vendor = osr.properties.get("openslide.vendor", "")
        self.mpp, self.mpp_source = self._mpp(mpp)

    def _mpp(self, given: float | None) -> tuple[float, str]:
        props = self._osr.properties
        try:
            xy = [float(props[f"openslide.mpp-{a}"]) for a in ("x", "y")]
        except (KeyError, ValueError):
            xy = []
        if xy and all(math.isfinite(v) and v > 0 for v in xy):
            if abs(xy[0] - xy[1]) > SLACK * max(xy):
                log.warning("%s: non-square pixels (%g x %g um); using their mean", self.path,
                            *xy)
            mpp = (xy[0] + xy[1]) / 2
            if given is not None and abs(given - mpp) > SLACK * mpp:
                log.warning("%s records %g um/px; --mpp %g is used only for slides without "
                            "one", self.path, mpp, given)
            return mpp, "slide"
        if given is None:
            raise SlideError(f"{self.path}: the slide records no microns per pixel; pass --mpp "
                             "(level-0 microns per pixel, e.g. 0.25 for a 40x scan)")
        if not given > 0:
            raise SlideError(f"--mpp {given}: microns per pixel must be > 0")
        return float(given), "--mpp"

    def close(self) -> None:
        """Release the OpenSlide handle."""
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of a level."""
        return self.mpp * self.levels[level].downsample

    def level_for(self, mpp: float) -> tuple[int, bool]:
        """The coarsest level at least as fine as ``mpp`` (within :data:`SLACK`), and whether
        even level 0 is coarser (the read is then upsampled)."""
        fine = [lv.index for lv in self.levels if self.level_mpp(lv.index) <= mpp * (1 + SLACK)]
        if not fine:
            return 0, True
        return max(fine, key=lambda i: self.levels[i].downsample), False

    def read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """The level-0 box ``(x, y, w, h)`` as read from ``level``: an ``HxWx3`` uint8 RGB array
        of ``round(w / downsample) x round(h / downsample)`` pixels.

        Raises:
            SlideError: OpenSlide cannot decode the region (a truncated or corrupt file).
        """
        ds = self.levels[level].downsample
        size = (max(1, round(w / ds)), max(1, round(h / ds)))
        try:
            rgba = self._osr.read_region((int(x), int(y)), level, size)
        except Exception as exc:  # OpenSlideError, or libtiff's errors surfacing as OSError
            raise SlideError(f"{self.path}: cannot read level {level} at ({x}, {y}): "
                             f"{exc}") from None
        return _on_white(np.asarray(rgba))

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at about ``mpp`` microns per pixel, read in chunks from the level
        nearest above it (memory stays bounded whatever the slide's size); returns the image and
        its exact microns per pixel (x).

        Raises:
            SlideError: Every level fine enough is larger than :data:`MAX_THUMBNAIL_SOURCE`.
        """
        level, _ = self.level_for(mpp)
        lv = self.levels[level]
        if lv.width * lv.height > MAX_THUMBNAIL_SOURCE:
            raise SlideError(
                f"{self.path}: no pyramid level coarse enough for a thumbnail at {mpp:g} um/px "
                f"(level {level} is {lv.width}x{lv.height}; levels "
                f"{', '.join(f'{v.width}x{v.height}' for v in self.levels)}); convert it to "
                "a pyramidal format, e.g. `vips tiffsave in out.tiff --tile --pyramid`")
        scale = self.level_mpp(level) / mpp  # output pixels per level pixel
        out_w, out_h = max(1, round(lv.width * scale)), max(1, round(lv.height * scale))
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        for ly in range(0, lv.height, _CHUNK):
            for lx in range(0, lv.width, _CHUNK):
                cw, ch = min(_CHUNK, lv.width - lx), min(_CHUNK, lv.height - ly)
                ox0, oy0 = round(lx * scale), round(ly * scale)
                ox1, oy1 = round((lx + cw) * scale), round((ly + ch) * scale)
                if ox1 <= ox0 or oy1 <= oy0:
                    continue
                ds = lv.downsample
                part = self.read(round(lx * ds), round(ly * ds), round(cw * ds), round(ch * ds),
                                 level)
                out[oy0:oy1, ox0:ox1] = np.asarray(
                    Image.fromarray(part).resize((ox1 - ox0, oy1 - oy0), Image.Resampling.BOX))
        return out, self.mpp * self.width / out_w

    def info(self) -> dict:
        """Size, microns per pixel (and where it came from), vendor and levels, plain types."""
        return {"width": self.width, "height": self.height, "mpp": self.mpp,
                "mpp_source": self.mpp_source, "vendor": self.vendor,
                "levels": [{"width": lv.width, "height": lv.height,
                            "downsample": lv.downsample} for lv in self.levels]}


def _is_tiff(path: Path) -> bool:
    """Starts like a TIFF or BigTIFF (SVS, NDPI and most slide formats are TIFFs)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (OpenSlide: not premultiplied) composited over white glass, as uint8 RGB."""
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
