"""Safe image decoding: every file becomes 8-bit RGB or a clear error naming it."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
)
# BreakHis images are 0.3 MP and a whole tissue-microarray core a few MP; anything far above is
# a whole-slide image or a decompression bomb, which this tool does not tile.
DEFAULT_MAX_PIXELS = 50_000_000
_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"GIF8", "GIF"), (b"RIFF", "WebP"))


class ImageLoadError(ValueError):
    """A file that cannot be decoded into an RGB image; the message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ImageInfo:
    """What a scan needs to know about one readable image file."""

    width: int
    height: int
    mode: str
    sha256: str
    pixel_sha256: str = ""  # of the decoded RGB pixels and their shape: re-saved copies match


def pixel_hash(rgb: Image.Image) -> str:
    """sha256 of an RGB image's decoded pixels and its size: equal for the same picture saved
    as other bytes (another PNG compression level, a lossless format, other metadata)."""
    arr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    return hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()


def _float_scale(arr: np.ndarray) -> float:
    """The full-scale value of a float image: 1 (values in [0, 1]), 255 or 65535."""
    if not np.isfinite(arr).all():
        raise ValueError("float image with NaN or infinite pixels")
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    if lo < 0:
        raise ValueError(f"float image with negative values (min {lo:g}): unknown intensity range")
    for scale in (1.0, 255.0, 65535.0):
        if hi <= scale:
            return scale
    raise ValueError(f"float image with values up to {hi:g}: unknown intensity range")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling high bit depths instead of clipping them."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":  # scientific TIFFs hold 0-1 floats: scaling by 255 would be black
            hi = _float_scale(arr)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, the colour of empty glass in a bright-field scan.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.is_file():
        raise ImageLoadError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(
                    path, f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}"
                )
            img.load()  # decode now: a truncated file fails here, not in a worker later
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise ImageLoadError(path, f"multi-frame image ({frames} frames: an animation "
                                           "or a multi-page file); only single images are read, "
                                           "save the frame you mean as its own file")
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        with open(path, "rb") as fh:
            head = fh.read(12)
        kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
        if kind:
            raise ImageLoadError(path, f"corrupt or truncated image ({kind} header, "
                                       "undecodable data)") from None
        raise ImageLoadError(path, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from None
    return img


def sniff(path: str | Path) -> str | None:
    """The image format a file's first bytes announce (``PNG``, ``JPEG``, ...), or ``None``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return None
    return next((k for magic, k in _MAGIC if head.startswith(magic)), None)


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to 8-bit RGB.

    Grayscale, palette, RGBA (composited on white) and 16-bit images are converted; anything
    that cannot be decoded raises :class:`ImageLoadError` naming the file and the reason.

    Args:
        path: Image file.
        max_pixels: Refuse images with more pixels than this.
    """
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(path, f"cannot convert mode {img.mode!r} to RGB ({exc})") from None


def inspect_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode an image (to prove it is readable) and hash its bytes and its pixels.

    Raises:
        ImageLoadError: The file is missing, empty, not an image, corrupt, truncated or too large.
    """
    path = Path(path)
    img = _open(path, max_pixels)
    mode = img.mode
    try:
        rgb = _to_rgb(img)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(path, f"cannot convert mode {mode!r} to RGB ({exc})") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ImageInfo(img.width, img.height, mode, digest, pixel_hash(rgb))


def to_array(img: Image.Image) -> np.ndarray:
    """A PIL RGB image as a contiguous ``HxWx3`` uint8 array."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def to_rgb_image(item: str | Path | Image.Image | np.ndarray,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any image a caller may hand over (a file path, a PIL image, an ``HxW``/``HxWx3``/
    ``HxWx4`` uint8 array) as an 8-bit RGB PIL image.

    Raises:
        ImageLoadError: A file that cannot be read (the message names it).
        ValueError: An array that is not ``HxW`` or ``HxWx3``/``HxWx4`` uint8.
        TypeError: Anything else.
    """
    if isinstance(item, str | Path):
        return load_rgb(item, max_pixels)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (
                item.ndim == 3 and item.shape[2] not in (3, 4)):
            raise ValueError(f"image array must be HxWx3 (or HxW, HxWx4) uint8, got shape "
                             f"{item.shape} dtype {item.dtype}")
        item = Image.fromarray(np.ascontiguousarray(item))
    if isinstance(item, Image.Image):
        if item.width * item.height > max_pixels:
            raise ValueError(f"image too large: {item.width}x{item.height} pixels > limit "
                             f"{max_pixels}")
        return _to_rgb(item)
    raise TypeError(f"expected an image path, PIL image or uint8 array, got {type(item).__name__}")
