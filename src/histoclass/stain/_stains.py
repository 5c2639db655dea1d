"""What Macenko and Vahadane share: a 2x3 stain matrix, per-pixel concentrations, and the
transform that swaps the source image's stains for the target's.

Concentrations solve, for every pixel's optical density ``x`` and stain matrix ``S`` (rows H, E),
``min_c 0.5 ||x - S^T c||^2 + lam * sum(c)  s.t. c >= 0`` -- SPAMS' non-negative Lasso
(``mode=2, pos=True``) as StainTools calls it, with ``lam = 0`` giving non-negative least
squares. With two unknowns the exact solution is closed form: the unconstrained solution if it
is non-negative, else the better of the two one-stain solutions (the problem is strictly convex,
so the optimum lies on the boundary when the free optimum is infeasible). That replaces one
iterative Lasso per pixel by a few vectorised array operations.
"""

from __future__ import annotations

import numpy as np

from histoclass.stain._base import Normalizer, as_floats
from histoclass.stain._optical import OD_LUT, channel_sum, rgb_to_od

PERCENTILE = 99.0  # concentration percentile matched between source and target (StainTools)
# H and E vectors closer than this (2.6 degrees) are one colour and separation is garbage.
# Vahadane's vectors on real BreakHis images reach a cosine of 0.993, so leave a margin.
_MAX_COSINE = 0.999
_MIN_CONCENTRATION = 1e-3  # below this a stain's 99th-percentile amount is "not there"


def _solve(b0: np.ndarray, b1: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Exact solution from ``b_k = s_k . x - lam`` and the stains' Gram matrix; ``(2, N)``."""
    g00, g01, g11 = (np.float32(v) for v in (gram[0, 0], gram[0, 1], gram[1, 1]))
    det = g00 * g11 - g01 * g01
    c0 = (g11 * b0 - g01 * b1) / det
    c1 = (g00 * b1 - g01 * b0) / det
    bad = (c0 < 0) | (c1 < 0)
    if bad.any():
        # One-stain fallbacks: 0.5*g*c^2 - b*c is smallest at c = b+/g, with value -b+^2/(2g).
        p0, p1 = np.maximum(b0[bad], 0), np.maximum(b1[bad], 0)
        only0 = p0 * p0 * g11 >= p1 * p1 * g00
        c0[bad] = np.where(only0, p0 / g00, 0)
        c1[bad] = np.where(only0, 0, p1 / g11)
    return np.stack([c0, c1])


def concentrations(od: np.ndarray, stains: np.ndarray, lam: float) -> np.ndarray:
    """Non-negative (optionally L1-penalised) stain concentrations, ``(N, 2)`` float32.

    Args:
        od: ``(N, 3)`` optical densities.
        stains: ``(2, 3)`` stain matrix, one stain per row.
        lam: L1 penalty (0 for non-negative least squares).
    """
    b = od.astype(np.float32) @ stains.T.astype(np.float32) - np.float32(lam)
    return _solve(b[:, 0].copy(), b[:, 1].copy(), stains @ stains.T).T


def image_concentrations(img: np.ndarray, stains: np.ndarray, lam: float) -> np.ndarray:
    """:func:`concentrations` of every pixel of a uint8 image, ``(2, N)``; the projections
    ``s_k . OD(pixel)`` come from per-channel tables, so no OD image is ever built."""
    luts = (stains[:, :, None] * OD_LUT[None, None, :]).astype(np.float32)
    b0 = channel_sum(img, luts[0]) - np.float32(lam)
    b1 = channel_sum(img, luts[1]) - np.float32(lam)
    return _solve(b0, b1, stains @ stains.T)


def stains_to_rgb(conc: np.ndarray, stains: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 image of ``(2, N)`` concentrations of ``stains``, truncated like StainTools."""
    od = np.multiply.outer(conc[0], stains[0].astype(np.float32))
    od += np.multiply.outer(conc[1], stains[1].astype(np.float32))
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= 255.0
    return np.clip(od, 0, 255, out=od).astype(np.uint8).reshape(shape)


def order_and_normalise(stains: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, haematoxylin (the larger red OD) first, as StainTools does."""
    stains = stains / np.maximum(np.linalg.norm(stains, axis=1, keepdims=True), 1e-12)
    return stains if stains[0, 0] >= stains[1, 0] else stains[[1, 0]]


def absent(max_concentrations: np.ndarray) -> str | None:
    """Why the 99th-percentile stain concentrations show a stain missing (a greyscale image,
    a single stain), or ``None``: one rule for targets and sources."""
    if np.any(np.asarray(max_concentrations) <= _MIN_CONCENTRATION):
        return ("a stain is absent (99th-percentile concentrations "
                f"{np.round(max_concentrations, 4).tolist()})")
    return None


def degenerate(stains: np.ndarray) -> str | None:
    """Why a stain matrix cannot separate two stains, or ``None`` when it can."""
    if not np.all(np.isfinite(stains)):
        return "stain matrix is not finite"
    cos = float(stains[0] @ stains[1])
    if cos > _MAX_COSINE:
        return f"haematoxylin and eosin vectors coincide (cosine {cos:.4f})"
    return None


class StainNormalizer(Normalizer):
    """Shared fit/transform for stain-separation methods; subclasses estimate the matrix."""

    lam: float = 0.0  # L1 penalty on concentrations
    sample_pixels: int = 0  # learn the stain matrix from this many tissue pixels (0: all)

    def __init__(self, luminosity_threshold: float = 0.8, min_tissue: float = 0.05) -> None:
        super().__init__(luminosity_threshold, min_tissue)
        self.stain_matrix = np.zeros((2, 3))
        self.max_concentrations = np.zeros(2)

    def _estimate(self, od_tissue: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _sample(self, n: int) -> np.ndarray | None:
        """Indices of the tissue pixels to learn from (fixed seed), or ``None`` for all."""
        if not self.sample_pixels or n <= self.sample_pixels:
            return None
        return np.random.default_rng(0).integers(0, n, self.sample_pixels)

    def stain_matrix_of(self, od_tissue: np.ndarray) -> np.ndarray:
        """``(2, 3)`` unit-row stain matrix (H first) from ``(N, 3)`` tissue optical densities."""
        pick = self._sample(len(od_tissue))
        return self._estimate(od_tissue if pick is None else od_tissue[pick])

    def _fit(self, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
        tissue = np.concatenate([rgb_to_od(img)[m] for img, m in zip(images, masks, strict=True)])
        stains = self.stain_matrix_of(tissue)
        reason = degenerate(stains)
        if reason:
            raise ValueError(f"cannot fit {self.method} to the target image(s): {reason}")
        conc = np.concatenate([image_concentrations(img, stains, self.lam) for img in images], 1)
        max_c = np.percentile(conc, PERCENTILE, axis=1).astype(np.float64)
        reason = absent(max_c)
        if reason:  # normalising toward it would turn every image into one stain
            raise ValueError(f"cannot fit {self.method} to the target image(s): {reason}; "
                             "choose an H&E target showing both stains")
        self.stain_matrix = stains
        self.max_concentrations = max_c

    def _transform(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, str | None]:
        # Only the sampled tissue pixels are converted to OD: same pixels as stain_matrix_of.
        tissue = np.flatnonzero(mask)
        pick = self._sample(len(tissue))
        stains = self._estimate(rgb_to_od(img.reshape(-1, 3)[
            tissue if pick is None else tissue[pick]]))
        reason = degenerate(stains)
        if reason:
            return img, reason
        conc = image_concentrations(img, stains, self.lam)
        max_c = np.percentile(conc, PERCENTILE, axis=1)
        reason = absent(max_c)
        if reason:
            return img, reason
        conc *= (self.max_concentrations / max_c).astype(np.float32)[:, None]
        return stains_to_rgb(conc, self.stain_matrix, img.shape), None

    def _params(self) -> dict:
        return {
            "stain_matrix": as_floats(self.stain_matrix),
            "max_concentrations": as_floats(self.max_concentrations),
        }

    def _from_params(self, d: dict) -> None:
        self.stain_matrix = np.array(d["stain_matrix"], dtype=np.float64).reshape(2, 3)
        self.max_concentrations = np.array(d["max_concentrations"], dtype=np.float64).reshape(2)
