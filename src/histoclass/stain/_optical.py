"""Colour-space helpers shared by the normalizers: optical density, luminosity and CIE Lab.

Everything works on flat ``(N, 3)`` float32 arrays of pixels, with 256-entry lookup tables for
the per-channel non-linearities, so a 700x460 image converts in a few milliseconds without
OpenCV or scikit-image (neither is a dependency of histoclass).
"""

from __future__ import annotations

import numpy as np

# Optical density as StainTools computes it: 0 is read as 1 so the log stays finite, and OD is
# floored at 1e-6 so a pure-white pixel is "almost no stain" rather than exactly zero.
_OD_LUT = np.maximum(-np.log(np.maximum(np.arange(256), 1) / 255.0), 1e-6).astype(np.float32)

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
    return _OD_LUT[img.reshape(-1, 3)]


def od_to_rgb(od: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Back to uint8 RGB (truncated like StainTools, so outputs stay comparable)."""
    rgb = 255.0 * np.exp(-od)
    return np.clip(rgb, 0, 255).astype(np.uint8).reshape(shape)


def _f(t: np.ndarray) -> np.ndarray:
    return np.where(t > _EPS, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)


def _f_inv(t: np.ndarray) -> np.ndarray:
    return np.where(t > 6 / 29, t**3, 3 * (6 / 29) ** 2 * (t - 4 / 29))


def luminosity(img: np.ndarray) -> np.ndarray:
    """CIE L* / 100 (0 black, 1 white) of every pixel, as a flat float32 array."""
    lin = _LINEAR_LUT[img.reshape(-1, 3)]
    y = lin @ _XYZ_FROM_RGB[1].astype(np.float32)
    return (116.0 * _f(y) - 16.0) / 100.0


def tissue_mask(img: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """Flat boolean mask of pixels darker than ``threshold`` in luminosity (StainTools' rule)."""
    return luminosity(img) < threshold


def rgb_to_lab(img: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of every pixel, ``(N, 3)`` float32: L in [0, 100], a and b about +-100."""
    xyz = _LINEAR_LUT[img.reshape(-1, 3)] @ _XYZ_FROM_RGB.T.astype(np.float32)
    fx, fy, fz = (_f(xyz[:, i]) for i in range(3))
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=1)


def lab_to_rgb(lab: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab`, rounded and clipped to uint8 with the given shape."""
    fy = (lab[:, 0] + 16.0) / 116.0
    f = np.stack([fy + lab[:, 1] / 500.0, fy, fy - lab[:, 2] / 200.0], axis=1)
    lin = np.clip(_f_inv(f) @ _RGB_FROM_XYZ.T.astype(np.float32), 0.0, 1.0)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.clip(srgb * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(shape)
