"""The one interface every normalizer shares: fit, transform, plain-data round trip, fingerprint.

A normalizer is a plain object holding only numbers (numpy arrays and floats), so it pickles into
DataLoader workers and process pools, and :meth:`Normalizer.to_dict` / :func:`from_dict` turn it
into JSON-able data (it is stored in checkpoints loaded with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import ClassVar

import numpy as np

from histoclass.stain._optical import check_image, tissue_mask

log = logging.getLogger("histoclass.stain")

FORMAT = 1  # bump when to_dict's layout changes incompatibly
# Fewer tissue pixels than this (a 1x1 image, a thumbnail) cannot give colour statistics: every
# method passes such an image through unchanged, and refuses it as a target.
MIN_TISSUE_PIXELS = 64


class Normalizer:
    """Base class: maps an H&E image's colours onto those of the fitted target image(s).

    Subclasses implement ``_fit``, ``_transform``, ``_params`` and ``_from_params``. The base
    class checks inputs and passes through, unchanged and with a warning naming the image,
    anything with too little tissue to estimate colour statistics from.

    Args:
        luminosity_threshold: Pixels with CIE L*/100 below this are tissue (StainTools' 0.8).
        min_tissue: Images with a smaller tissue fraction are passed through unchanged.
    """

    method: ClassVar[str] = ""

    def __init__(self, luminosity_threshold: float = 0.8, min_tissue: float = 0.05) -> None:
        self.luminosity_threshold = float(luminosity_threshold)
        self.min_tissue = float(min_tissue)
        self.fitted = False

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, targets: list[np.ndarray] | np.ndarray) -> Normalizer:
        """Fit to one target image or pool several; returns ``self``.

        Raises:
            ValueError: No target, a target is not HxWx3 uint8, or has too little tissue.
        """
        images = [targets] if isinstance(targets, np.ndarray) else list(targets)
        if not images:
            raise ValueError("fit needs at least one target image, got none")
        masks = []
        for i, img in enumerate(images):
            check_image(img)
            mask = tissue_mask(img, self.luminosity_threshold)
            if mask.mean() < self.min_tissue:
                raise ValueError(
                    f"target image {i} has {mask.mean():.1%} tissue, below min_tissue "
                    f"{self.min_tissue:.1%}: choose a target with more tissue"
                )
            if mask.sum() < MIN_TISSUE_PIXELS:
                raise ValueError(f"target image {i} has {int(mask.sum())} tissue pixel(s), "
                                 f"fewer than {MIN_TISSUE_PIXELS}: choose a larger target")
            masks.append(mask)
        self._fit(images, masks)
        self.fitted = True
        return self

    # -- transforming --------------------------------------------------------------------------
    def apply(self, img: np.ndarray, name: str = "") -> tuple[np.ndarray, str | None]:
        """Normalize ``img``; returns ``(output, reason)`` where ``reason`` is why it was passed
        through unchanged, or ``None`` when it was normalized.

        Raises:
            ValueError: Not fitted, or ``img`` is not an HxWx3 uint8 array.
        """
        if not self.fitted:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit() or from_dict()")
        check_image(img)
        mask = tissue_mask(img, self.luminosity_threshold)
        reason = None
        if mask.mean() < self.min_tissue:
            reason = f"only {mask.mean():.1%} tissue (< min_tissue {self.min_tissue:.1%})"
        elif mask.sum() < MIN_TISSUE_PIXELS:  # one rule for every method (1x1 images included)
            reason = (f"only {int(mask.sum())} tissue pixel(s) (< {MIN_TISSUE_PIXELS}): too few "
                      "to estimate colours")
        else:
            out, reason = self._transform(img, mask)
        if reason is not None:
            log.warning("stain %s: %s passed through unchanged: %s",
                        self.method, name or "image", reason)
            return img.copy(), reason
        return out, None

    def transform(self, img: np.ndarray, name: str = "") -> np.ndarray:
        """Normalize an ``HxWx3`` uint8 RGB image to the target's colours (same shape, uint8).

        Args:
            img: Source image.
            name: Named in the warning when the image is passed through unchanged.
        """
        return self.apply(img, name)[0]

    __call__ = transform

    # -- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fitted target as plain JSON-able data (str, int, float, lists)."""
        if not self.fitted:
            raise ValueError(f"{type(self).__name__} is not fitted: nothing to save")
        return {
            "method": self.method, "format": FORMAT,
            "luminosity_threshold": self.luminosity_threshold, "min_tissue": self.min_tissue,
            **self._params(),
        }

    @property
    def key(self) -> str:
        """Stable short fingerprint of the method and fitted parameters, e.g. for cache keys."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return f"{self.method}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key if self.fitted else 'unfitted'})"

    # -- for subclasses ------------------------------------------------------------------------
    def _fit(self, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
        raise NotImplementedError

    def _transform(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, str | None]:
        raise NotImplementedError

    def _params(self) -> dict:
        raise NotImplementedError

    def _from_params(self, d: dict) -> None:
        raise NotImplementedError


def as_floats(a: np.ndarray) -> list:
    """A numpy array as nested lists of Python floats (``repr`` round-trips them exactly)."""
    return np.asarray(a, dtype=np.float64).tolist()
