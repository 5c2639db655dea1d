"""Vahadane et al. (2016) structure-preserving stain normalization, without SPAMS.

The stain matrix is a sparse non-negative dictionary of two unit-norm stains learned from tissue
optical densities: ``min_{S, C >= 0, |s_k| <= 1} 0.5 ||X - C S||^2 + lam * |C|_1``, the problem
StainTools hands to ``spams.trainDL`` (``K=2, lambda1=0.1, mode=2, posAlpha, posD, modeD=0``).

SPAMS' online solver runs for a fixed *one second* per call from a random start (its default
``iter=-1``), which is most of StainTools' time per image. Here the same objective is solved by
batch alternating minimisation: exact closed-form codes (see ``_stains.concentrations``) and one
block-coordinate pass over the two atoms (Mairal et al. 2009's dictionary update), on a
deterministic random subsample of tissue pixels, started from Ruifrok & Johnston's H and E
vectors and stopped when the atoms stop moving. Deterministic, and a few milliseconds.
"""

from __future__ import annotations

import numpy as np

from histoclass.stain._stains import StainNormalizer, concentrations, order_and_normalise

# Ruifrok & Johnston (2001) haematoxylin and eosin OD vectors (the H and E rows of
# ``histoclass.data.transforms.RGB_FROM_HED``, which imports torch, so they are repeated here).
RUIFROK_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
RUIFROK_HE = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)


def learn_stains(
    od: np.ndarray, lam: float = 0.1, max_iter: int = 200, tol: float = 1e-5,
    init: np.ndarray = RUIFROK_HE,
) -> np.ndarray:
    """Two non-negative unit-norm stains that sparsely code ``od`` (``(N, 3)``); ``(2, 3)``.

    Args:
        od: Tissue optical densities.
        lam: L1 penalty on the codes (StainTools' ``regularizer`` 0.1).
        max_iter: Upper bound on alternating steps.
        tol: Stop when no atom entry moves more than this.
        init: Starting stains, one per row.
    """
    stains = np.array(init, dtype=np.float64)
    od = np.asarray(od, dtype=np.float32)
    od_t = od.T.astype(np.float64)  # (3, N), converted once, not per iteration
    for _ in range(max_iter):
        codes = concentrations(od, stains, lam).T.astype(np.float64)  # (2, N)
        gram = codes @ codes.T  # (2, 2)
        cross = od_t @ codes.T  # (3, 2)
        before = stains.copy()
        for k in range(2):
            if gram[k, k] < 1e-12:  # an unused atom keeps its place rather than dividing by 0
                continue
            atom = stains[k] + (cross[:, k] - stains.T @ gram[:, k]) / gram[k, k]
            atom = np.maximum(atom, 0.0)
            stains[k] = atom / max(float(np.linalg.norm(atom)), 1.0)
        if np.abs(stains - before).max() < tol:
            break
    return order_and_normalise(stains)


class VahadaneNormalizer(StainNormalizer):
    """Vahadane normalization with StainTools' parameters, SPAMS-free and deterministic.

    Args:
        luminosity_threshold: Pixels with CIE L*/100 below this are tissue.
        min_tissue: Images with a smaller tissue fraction are passed through unchanged.
        sample_pixels: Tissue pixels (drawn with a fixed seed) the stain matrix is learned from.
        dictionary_lam: L1 penalty of the dictionary learning (StainTools: 0.1).
        lam: L1 penalty of the per-pixel concentrations (StainTools: 0.01).
    """

    method = "vahadane"

    def __init__(
        self, luminosity_threshold: float = 0.8, min_tissue: float = 0.05,
        sample_pixels: int = 10_000, dictionary_lam: float = 0.1, lam: float = 0.01,
    ) -> None:
        super().__init__(luminosity_threshold, min_tissue)
        self.sample_pixels = int(sample_pixels)
        self.dictionary_lam = float(dictionary_lam)
        self.lam = float(lam)

    def _estimate(self, od_tissue: np.ndarray) -> np.ndarray:
        return learn_stains(od_tissue, self.dictionary_lam)

    def _params(self) -> dict:
        return {
            **super()._params(), "sample_pixels": self.sample_pixels,
            "dictionary_lam": self.dictionary_lam, "lam": self.lam,
        }

    def _from_params(self, d: dict) -> None:
        super()._from_params(d)
        self.sample_pixels = int(d["sample_pixels"])
        self.dictionary_lam = float(d["dictionary_lam"])
        self.lam = float(d["lam"])
