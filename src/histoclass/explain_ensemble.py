"""Ensemble explanations (one map per member, fused like the ensemble) and member loading.

An ensemble is a plain list of members ``(name, model, preprocess, weight[, stain])`` plus, when
known, the ensemble's fused probabilities: what ``histoclass.models.ensemble`` (soft voting or
feature concatenation over frozen members) can hand over without this module knowing its file
format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from histoclass.explain import Explanation, Member, class_index, explain_image, model_input


@dataclass
class EnsembleExplanation:
    """Per-member explanations and the fused map, weighted like the ensemble (weights sum to 1)."""

    members: list[tuple[str, float, Explanation]]
    cam: np.ndarray
    probs: np.ndarray
    target: int
    classes: list[str]

    @property
    def pred(self) -> int:
        """Index of the ensemble's predicted class."""
        return int(np.argmax(self.probs))


def explain_ensemble(members: list[Member] | list[tuple], image: np.ndarray, classes: list[str],
                     *, fused_probs: np.ndarray | None = None, method: str = "gradcam",
                     target: str | int | None = "predicted", layer: str | None = None
                     ) -> EnsembleExplanation:
    """One map per member and their weighted mean, all explaining the same class.

    Args:
        members: ``(name, model, preprocess, weight[, stain])`` per member; weights are
            normalised to sum to 1.
        image: The original ``HxWx3`` uint8 image.
        classes: Class names in output order (shared by all members).
        fused_probs: The ensemble's probabilities; ``None`` uses the weighted mean of the
            members' (a soft-voting ensemble).
        method, target, layer: As in :func:`explain_image`; ``predicted`` means the ensemble's
            predicted class.
    """
    members = [Member(*m) for m in members]
    if not members:
        raise ValueError("an ensemble explanation needs at least one member")
    weights = np.array([float(m.weight) for m in members])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
    weights = weights / weights.sum()
    index = class_index(target, classes)
    if index is None:
        if fused_probs is None:  # the fused prediction is needed before choosing the class
            with torch.inference_mode():
                fused_probs = sum(
                    w * torch.softmax(m.model(model_input(image, m.preprocess, m.stain))[0], 0)
                    .numpy() for w, m in zip(weights, members, strict=True))
        index = int(np.argmax(fused_probs))
    out = []
    for w, m in zip(weights, members, strict=True):
        out.append((m.name, float(w), explain_image(
            m.model, image, m.preprocess, classes, method=method, target=index, layer=layer,
            stain=m.stain)))
    if fused_probs is None:
        fused_probs = sum(w * e.probs for _, w, e in out)
    cam = sum(w * e.cam for _, w, e in out).astype(np.float32)
    return EnsembleExplanation(out, np.clip(cam, 0, 1), np.asarray(fused_probs, dtype=np.float64),
                               index, list(classes))


def load_member(path: str, weight: float = 1.0) -> tuple[Member, dict[str, Any]]:
    """A member checkpoint as a :class:`Member` (with its stain normaliser) and its metadata."""
    from pathlib import Path

    from histoclass.models.checkpoint import load_checkpoint, preprocess_of, stain_of

    model, meta = load_checkpoint(path)
    return Member(Path(path).stem, model, preprocess_of(meta), weight, stain_of(meta, path)), meta



def ensemble_members(ens: Any) -> tuple[list[Member], Any]:
    """Members of a :class:`histoclass.models.ensemble.Ensemble`, weighted like it, and a
    function giving its fused probabilities for one ``HxWx3`` uint8 image.

    Weights: ``weighted`` uses its fitted weights; ``stack`` the positive part of each member's
    logistic-regression coefficient on the malignant probability (its influence on the fused
    score; binary task only, else equal); ``soft``, ``hard`` and ``concat`` weight members
    equally (a vote and the concat head's learned mixing have no per-member weight, so the
    fused map is the members' mean, while the probability shown is the ensemble's own).
    """
    import numpy as np
    import torch
    from PIL import Image

    n = len(ens.members)
    weights = [1.0] * n
    if ens.method == "weighted" and ens.weights:
        weights = [float(w) for w in ens.weights]
    elif ens.method == "stack" and ens.stack:
        coef = np.asarray(ens.stack["coef"], dtype=float)
        if coef.shape == (1, n):  # binary: one coefficient per member's P(malignant)
            weights = [max(float(c), 0.0) for c in coef[0]]
        if sum(weights) <= 0:
            weights = [1.0] * n
    members = [Member(m.name, m.model, m.preprocess, w, m.stain)
               for m, w in zip(ens.members, weights, strict=True)]

    def fuse(image: np.ndarray) -> np.ndarray:
        inputs = [x.unsqueeze(0) for x in ens.prepare(Image.fromarray(image))]
        with torch.no_grad():
            return ens.predict_proba(inputs).proba[0].cpu().numpy()

    return members, fuse
