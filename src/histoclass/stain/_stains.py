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
from histoclass.stain._optical import od_to_rgb, rgb_to_od

PERCENTILE = 99.0  # concentration percentile matched between source and target (StainTools)
_MAX_COSINE = 0.995  # H and E vectors closer than this are one colour: separation is garbage


def concentrations(od: np.ndarray, stains: np.ndarray, lam: float) -> np.ndarray:
    """Non-negative (optionally L1-penalised) stain concentrations, ``(N, 2)`` float32.

    Args:
        od: ``(N, 3)`` optical densities.
        stains: ``(2, 3)`` stain matrix, one stain per row.
        lam: L1 penalty (0 for non-negative least squares).
    """
    s = stains.astype(np.float64)
    g = s @ s.T
    det = g[0, 0] * g[1, 1] - g[0, 1] ** 2
    b = od @ s.T.astype(np.float32) - np.float32(lam)
    b0, b1 = b[:, 0], b[:, 1]
    c0 = (g[1, 1] * b0 - g[0, 1] * b1) / det
    c1 = (g[0, 0] * b1 - g[0, 1] * b0) / det
    free = (c0 >= 0) & (c1 >= 0)
    # One-stain fallbacks: objective 0.5*g*c^2 - b*c at its clipped minimum is -b+^2 / (2g).
    p0, p1 = np.maximum(b0, 0), np.maximum(b1, 0)
    only0 = p0 * p0 / g[0, 0] >= p1 * p1 / g[1, 1]
    out = np.empty_like(b)
    out[:, 0] = np.where(free, c0, np.where(only0, p0 / g[0, 0], 0))
    out[:, 1] = np.where(free, c1, np.where(only0, 0, p1 / g[1, 1]))
    return out


def order_and_normalise(stains: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, haematoxylin (the larger red OD) first, as StainTools does."""
    stains = stains / np.maximum(np.linalg.norm(stains, axis=1, keepdims=True), 1e-12)
    return stains if stains[0, 0] >= stains[1, 0] else stains[[1, 0]]


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

    def __init__(self, luminosity_threshold: float = 0.8, min_tissue: float = 0.05) -> None:
        super().__init__(luminosity_threshold, min_tissue)
        self.stain_matrix = np.zeros((2, 3))
        self.max_concentrations = np.zeros(2)

    def stain_matrix_of(self, od_tissue: np.ndarray) -> np.ndarray:
        """``(2, 3)`` unit-row stain matrix (H first) from tissue optical densities."""
        raise NotImplementedError

    def _fit(self, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
        ods = [rgb_to_od(img) for img in images]
        tissue = np.concatenate([od[m] for od, m in zip(ods, masks, strict=True)])
        stains = self.stain_matrix_of(tissue)
        reason = degenerate(stains)
        if reason:
            raise ValueError(f"cannot fit {self.method} to the target image(s): {reason}")
        conc = np.concatenate([concentrations(od, stains, self.lam) for od in ods])
        self.stain_matrix = stains
        self.max_concentrations = np.percentile(conc, PERCENTILE, axis=0).astype(np.float64)

    def _transform(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, str | None]:
        od = rgb_to_od(img)
        stains = self.stain_matrix_of(od[mask])
        reason = degenerate(stains)
        if reason:
            return img, reason
        conc = concentrations(od, stains, self.lam)
        max_c = np.percentile(conc, PERCENTILE, axis=0)
        if np.any(max_c <= 1e-3):
            return img, f"a stain is absent (99th-percentile concentrations {max_c.round(4)})"
        conc *= (self.max_concentrations / max_c).astype(np.float32)
        return od_to_rgb(conc @ self.stain_matrix.astype(np.float32), img.shape), None

    def _params(self) -> dict:
        return {
            "stain_matrix": as_floats(self.stain_matrix),
            "max_concentrations": as_floats(self.max_concentrations),
        }

    def _from_params(self, d: dict) -> None:
        self.stain_matrix = np.array(d["stain_matrix"], dtype=np.float64).reshape(2, 3)
        self.max_concentrations = np.array(d["max_concentrations"], dtype=np.float64).reshape(2)
