"""Reinhard et al. (2001) colour transfer: match per-channel mean and spread in CIE Lab.

Statistics are taken over all pixels, as in StainTools and torchstain, so a target with much
white background pulls the mean toward white; pick targets that are mostly tissue.
"""

from __future__ import annotations

import numpy as np

from histoclass.stain._base import Normalizer, as_floats
from histoclass.stain._optical import lab_to_rgb, rgb_to_lab

_MIN_STD = 1e-3  # a flat channel cannot be rescaled meaningfully


class ReinhardNormalizer(Normalizer):
    """Reinhard normalization (Lab mean and standard deviation per channel).

    Args:
        luminosity_threshold: Pixels with CIE L*/100 below this are tissue (used only to pass
            nearly blank images through unchanged).
        min_tissue: Images with a smaller tissue fraction are passed through unchanged.
    """

    method = "reinhard"

    def __init__(self, luminosity_threshold: float = 0.8, min_tissue: float = 0.05) -> None:
        super().__init__(luminosity_threshold, min_tissue)
        self.means = np.zeros(3)
        self.stds = np.ones(3)

    def _fit(self, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
        lab = np.concatenate([rgb_to_lab(img) for img in images], axis=1).astype(np.float64)
        self.means, self.stds = lab.mean(axis=1), lab.std(axis=1)
        if np.any(self.stds < _MIN_STD):
            raise ValueError(f"cannot fit reinhard: target Lab spread {self.stds} is flat")

    def _transform(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, str | None]:
        lab = rgb_to_lab(img)
        means, stds = lab.mean(axis=1, dtype=np.float64), lab.std(axis=1, dtype=np.float64)
        if np.any(stds < _MIN_STD):
            return img, f"flat colour (Lab spread {stds.round(4)})"
        scale = (self.stds / stds).astype(np.float32)[:, None]
        shift = (self.means - means * self.stds / stds).astype(np.float32)[:, None]
        lab *= scale
        lab += shift
        return lab_to_rgb(lab, img.shape), None

    def _params(self) -> dict:
        return {"means": as_floats(self.means), "stds": as_floats(self.stds)}

    def _from_params(self, d: dict) -> None:
        self.means = np.array(d["means"], dtype=np.float64).reshape(3)
        self.stds = np.array(d["stds"], dtype=np.float64).reshape(3)
