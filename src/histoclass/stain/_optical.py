"""Colour-space helpers shared by the normalizers: optical density, luminosity and CIE Lab.

Everything works on flat ``(N, 3)`` float32 arrays of pixels, with 256-entry lookup tables for
the per-channel non-linearities, so a 700x460 image converts in a few milliseconds without
OpenCV or scikit-image (neither is a dependency of histoclass).
"""

from __future__ import annotations

import functools

import numpy as np

# Optical density as StainTools computes it: 0 is read as 1 so the log stays finite, and OD is
# floored at 1e-6 so a pure-white pixel is "almost no stain" rather than exactly zero.
OD_LUT = np.maximum(-np.log(np.maximum(np.arange(256), 1) / 255.0), 1e-6).astype(np.float32)

# sRGB (D65) companding and the linear-RGB -> XYZ matrix, normalised by the D65 white point so
# Lab is computed directly from the rows of this matrix.
_c = np.arange(256) / 255.0
_LINEAR_LUT = np.where(_c <= 0.04045, _c / 12.92, ((_c + 0.055) / 1.055) ** 2.4).astype(np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
) / _WHITE[:, None]
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_EPS = (6 / 29) ** 3


def check_image(img: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``img`` is an ``HxWx3`` uint8 RGB array."""
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", type(img).__name__)
        raise ValueError(f"expected an HxWx3 RGB array, got shape {shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got dtype {img.dtype}")


def rgb_to_od(img: np.ndarray) -> np.ndarray:
    """Optical density ``-log(I/255)`` of every pixel, as an ``(N, 3)`` float32 array."""
    return OD_LUT[img.reshape(-1, 3)]


def _f(t: np.ndarray) -> np.ndarray:
    # cbrt everywhere, then the linear toe for the few very dark values (cheaper than np.where)
    out = np.cbrt(t)
    low = t <= _EPS
    if low.any():
        out[low] = t[low] / (3 * (6 / 29) ** 2) + 4 / 29
    return out


def _f_inv(t: np.ndarray) -> np.ndarray:
    out = t * t * t
    low = t <= 6 / 29
    if low.any():
        out[low] = 3 * (6 / 29) ** 2 * (t[low] - 4 / 29)
    return out


# Luminance Y as a sum of three per-channel lookups; L* is monotonic in Y, so "L*/100 < t" is
# "Y < Y(t)" and the tissue mask needs no cube root.
_Y_LUTS = (_XYZ_FROM_RGB[1][:, None] * _LINEAR_LUT[None, :]).astype(np.float32)


def channel_sum(img: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """``luts[0][R] + luts[1][G] + luts[2][B]`` per pixel, flat float32: any per-channel
    function followed by a weighted sum, at the cost of three table lookups."""
    flat = img.reshape(-1, 3)
    out = luts[0][flat[:, 0]]
    out += luts[1][flat[:, 1]]
    out += luts[2][flat[:, 2]]
    return out


def luminosity(img: np.ndarray) -> np.ndarray:
    """CIE L* / 100 (0 black, 1 white) of every pixel, as a flat float32 array."""
    return (116.0 * _f(channel_sum(img, _Y_LUTS)) - 16.0) / 100.0


def tissue_mask(img: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """Flat boolean mask of pixels darker than ``threshold`` in luminosity (StainTools' rule)."""
    y_max = _f_inv(np.array([(100.0 * threshold + 16.0) / 116.0]))[0]
    return channel_sum(img, _Y_LUTS) < y_max


# X, Y and Z (white-normalised) as per-channel tables, like _Y_LUTS.
_XYZ_LUTS = (_XYZ_FROM_RGB[:, :, None] * _LINEAR_LUT[None, None, :]).astype(np.float32)


def rgb_to_lab(img: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of every pixel, ``(3, N)`` float32 (one contiguous row per channel):
    L in [0, 100], a and b about +-100."""
    fx, fy, fz = (_f(channel_sum(img, _XYZ_LUTS[i])) for i in range(3))
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)])


def lab_to_rgb(lab: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab`, rounded and clipped to uint8 with the given shape."""
    fy = (lab[0] + 16.0) / 116.0
    xyz = [_f_inv(fy + lab[1] / 500.0), _f_inv(fy), _f_inv(fy - lab[2] / 200.0)]
    out = np.empty((lab.shape[1], 3), np.uint8)
    lut = _encode_lut()
    for c, row in enumerate(_RGB_FROM_XYZ.astype(np.float32)):
        # Explicit sums, not a BLAS product: a tall (N, 3) @ (3, 3) product is 30x slower
        # with OpenBLAS threads when the cores are busy (DataLoader workers, process pools).
        lin = row[0] * xyz[0] + row[1] * xyz[1] + row[2] * xyz[2]
        np.clip(lin, 0.0, 1.0, out=lin)
        # sRGB encoding by a 2**20-entry table: exact rounding except within 0.002 of a level
        out[:, c] = lut[(lin * _ENCODE_STEPS + 0.5).astype(np.int32)]
    return out.reshape(shape)


_ENCODE_STEPS = (1 << 20) - 1


@functools.cache
def _encode_lut() -> np.ndarray:
    lin = np.linspace(0.0, 1.0, _ENCODE_STEPS + 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.clip(srgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
