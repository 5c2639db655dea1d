"""The resolution a model expects: what one network input covers on the specimen.

A member checkpoint records ``train_mpp`` (microns per pixel of its training images) and
``train_field`` (``[width, height]`` in training-image pixels that one network input covers:
the whole image when images are squashed to the input size, as the study did; the tile size
when a model is trained on tiles). A slide tile at the model's resolution is therefore
``field * mpp`` microns wide and high, and the model's own preparation resizes it exactly as it
resized its training images. :attr:`Classifier.resolution` is the one reader of these fields.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Two members' resolutions closer than this (relative) are the same resolution.
TOLERANCE = 0.01


@dataclass(frozen=True)
class Resolution:
    """Microns per pixel of the training images and the field (pixels) one input covers."""

    mpp: float
    field: tuple[int, int]  # (width, height) in training-image pixels

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"microns per pixel must be a positive number, got {self.mpp!r}")
        if len(self.field) != 2 or min(self.field) < 1:
            raise ValueError(f"field must be [width, height] >= 1 pixel, got {self.field!r}")

    @property
    def microns(self) -> tuple[float, float]:
        """Width and height of one input's field on the specimen, in microns."""
        return self.field[0] * self.mpp, self.field[1] * self.mpp

    def to_dict(self) -> dict[str, Any]:
        """Plain types (JSON, checkpoint metadata)."""
        return {"mpp": float(self.mpp), "field": [int(v) for v in self.field]}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Resolution | None:
        """Inverse of :meth:`to_dict`; ``None`` stays ``None``."""
        if not d or d.get("mpp") is None:
            return None
        return cls(float(d["mpp"]), (int(d["field"][0]), int(d["field"][1])))

    def same_as(self, other: Resolution) -> bool:
        """Equal within :data:`TOLERANCE` in microns per pixel and in field (microns)."""
        close = [abs(a - b) <= TOLERANCE * max(abs(a), abs(b))
                 for a, b in zip((self.mpp, *self.microns), (other.mpp, *other.microns),
                                 strict=True)]
        return all(close)

    def __str__(self) -> str:
        w, h = self.microns
        return (f"{self.mpp:g} um/px, field {self.field[0]}x{self.field[1]} px "
                f"({w:.0f}x{h:.0f} um)")


def of_meta(meta: dict[str, Any]) -> Resolution | None:
    """A member checkpoint's resolution (``train_mpp``, ``train_field``), or ``None``.

    A checkpoint with ``train_mpp`` but no ``train_field`` covers its input size.
    """
    mpp = meta.get("train_mpp")
    if mpp is None:
        return None
    field = meta.get("train_field")
    if not field:
        h, w = meta["preprocess"]["input_size"]
        field = [w, h]
    return Resolution(float(mpp), (int(field[0]), int(field[1])))


def agreed(named: Sequence[tuple[str, Resolution | None]], where: str = "model"
           ) -> Resolution | None:
    """The one resolution shared by all members, ``None`` when none records one.

    Raises:
        ValueError: Some members record one and others do not, or two members differ (an
            ensemble's members must look at the same tissue).
    """
    known = [(n, r) for n, r in named if r is not None]
    if not known:
        return None
    missing = [n for n, r in named if r is None]
    if missing:
        raise ValueError(f"{where}: member(s) {', '.join(missing)} record no training "
                         f"resolution while {known[0][0]} does ({known[0][1]}); pass the "
                         "model's microns per pixel explicitly (--model-mpp)")
    first_name, first = known[0]
    for name, r in known[1:]:
        if not first.same_as(r):
            raise ValueError(f"{where}: members disagree on resolution: {first_name} {first} "
                             f"vs {name} {r}; an ensemble for slides needs members trained "
                             "at one resolution")
    return first
