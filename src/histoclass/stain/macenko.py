"""Macenko et al. (2009) stain normalization, following StainTools' variant.

The two stains are the extreme angles (1st and 99th percentile) of tissue optical densities
projected on the plane of their two principal directions. Concentrations use the same
non-negative Lasso (penalty 0.01) as StainTools, rather than the paper's plain least squares,
so negative (unphysical) stain amounts cannot occur.
"""

from __future__ import annotations

import numpy as np

from histoclass.stain._stains import StainNormalizer, order_and_normalise


class MacenkoNormalizer(StainNormalizer):
    """Macenko normalization.

    Args:
        luminosity_threshold: Pixels with CIE L*/100 below this are tissue.
        min_tissue: Images with a smaller tissue fraction are passed through unchanged.
        angular_percentile: Percentile of the projected angles taken as the pure stains.
        lam: L1 penalty of the per-pixel concentrations (StainTools: 0.01).
    """

    method = "macenko"

    def __init__(
        self, luminosity_threshold: float = 0.8, min_tissue: float = 0.05,
        angular_percentile: float = 99.0, lam: float = 0.01,
    ) -> None:
        super().__init__(luminosity_threshold, min_tissue)
        self.angular_percentile = float(angular_percentile)
        self.lam = float(lam)

    def _estimate(self, od_tissue: np.ndarray) -> np.ndarray:
        """Extreme-angle stain vectors in the principal plane of ``od_tissue``."""
        od = od_tissue.astype(np.float64)
        _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
        plane = vecs[:, [2, 1]]
        plane *= np.where(plane[0] < 0, -1.0, 1.0)  # point both axes into positive red OD
        proj = od @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [100 - self.angular_percentile, self.angular_percentile])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        return order_and_normalise(np.array([v1, v2]))

    def _params(self) -> dict:
        return {**super()._params(), "angular_percentile": self.angular_percentile,
                "lam": self.lam}

    def _from_params(self, d: dict) -> None:
        super()._from_params(d)
        self.angular_percentile = float(d["angular_percentile"])
        self.lam = float(d["lam"])
