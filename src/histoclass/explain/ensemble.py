"""Explanations of a whole model: one map per member, fused with the one weight rule.

:func:`explain_model` is what the CLI, the Python API and the web app call; :func:`cam_weights`
is the only place that decides how members' maps are weighted into the fused map:

* ``weighted``: the fitted ensemble weights;
* ``stack``: the positive part of each member's logistic-regression coefficient on its
  P(malignant) (its influence on the fused score; binary task only, else equal);
* ``soft``, ``hard``, ``concat``: equal weights (a vote and the concat head's learned mixing have
  no per-member weight, so the fused map is the members' mean, while the probability shown is
  the ensemble's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoclass.explain.cam import Explanation, class_index, explain_image, model_input
from histoclass.explain.tiles_cam import explain_tiles, field_input, field_probs
from histoclass.models.ensemble import Ensemble, Member, normalised_weights
from histoclass.models.tiles import head_of, input_of


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


def cam_weights(ens: Ensemble) -> list[float]:
    """How much each member's map counts in the fused map (see the module docstring)."""
    n = len(ens.members)
    if ens.method == "weighted" and ens.weights:
        return [float(w) for w in ens.weights]
    if ens.method == "stack" and ens.stack:
        coef = np.asarray(ens.stack["coef"], dtype=float)
        if coef.shape == (1, n):  # binary: one coefficient per member's P(malignant)
            weights = [max(float(c), 0.0) for c in coef[0]]
            if sum(weights) > 0:
                return weights
    return [1.0] * n


def explain_member(m: Member, image: np.ndarray, classes: list[str], *,
                   method: str = "gradcam", target: str | int | None = "predicted",
                   layer: str | None = None) -> Explanation:
    """One member's map through its own input mode: resized, or stitched from its tiles
    (:func:`histoclass.explain.tiles_cam.explain_tiles`)."""
    mode = input_of(m.meta)
    if mode.tiles:
        e = explain_tiles(m.model, image, m.preprocess, classes, mode, method=method,
                          target=target, layer=layer, stain=m.stain, head=head_of(m.meta))
    else:
        e = explain_image(m.model, image, m.preprocess, classes, method=method, target=target,
                          layer=layer, stain=m.stain)
    e.probs = _tempered(m, e.probs)  # the probabilities predict shows (argmax unchanged)
    return e


def _tempered(m: Member, probs: np.ndarray) -> np.ndarray:
    """``softmax(z / T)`` from ``probs = softmax(z)`` with the member's temperature."""
    from histoclass.calibration import uncalibrated

    t = float(m.meta.get("temperature", 1.0))
    return probs if t == 1.0 else uncalibrated(np.asarray(probs)[None], 1.0 / t)[0]


def _member_probs(m: Member, image: np.ndarray) -> np.ndarray:
    """One member's class probabilities for one image, through its own input mode."""
    import torch

    mode = input_of(m.meta)
    if mode.tiles:
        return _tempered(m, field_probs(m.model, field_input(image, m.preprocess, mode,
                                                             m.stain), head_of(m.meta)))
    return _tempered(m, torch.softmax(m.model(model_input(image, m.preprocess, m.stain))[0],
                                      0).numpy())


def explain_ensemble(members: Sequence[Member], image: np.ndarray, classes: list[str], *,
                     weights: Sequence[float] | None = None,
                     fused_probs: np.ndarray | None = None, method: str = "gradcam",
                     target: str | int | None = "predicted", layer: str | None = None
                     ) -> EnsembleExplanation:
    """One map per member and their weighted mean, all explaining the same class.

    Args:
        members: The members (their own preprocessing and stain normaliser are applied).
        image: The original ``HxWx3`` uint8 image.
        classes: Class names in output order (shared by all members).
        weights: One per member, normalised to sum to 1 (default: equal).
        fused_probs: The ensemble's probabilities; ``None`` uses the weighted mean of the
            members' (a soft-voting ensemble).
        method, target, layer: As in :func:`~histoclass.explain.cam.explain_image`;
            ``predicted`` means the ensemble's predicted class.
    """
    if not members:
        raise ValueError("an ensemble explanation needs at least one member")
    w = normalised_weights([1.0] * len(members) if weights is None else weights, len(members))
    index = class_index(target, classes)
    if index is None:
        if fused_probs is None:  # the fused prediction is needed before choosing the class
            import torch

            with torch.inference_mode():
                fused_probs = sum(wi * _member_probs(m, image)
                                  for wi, m in zip(w, members, strict=True))
        index = int(np.argmax(fused_probs))
    out = [(m.name, float(wi), explain_member(m, image, classes, method=method, target=index,
                                              layer=layer))
           for wi, m in zip(w, members, strict=True)]
    if fused_probs is None:
        fused_probs = sum(wi * e.probs for _, wi, e in out)
    cam = sum(wi * e.cam for _, wi, e in out).astype(np.float32)
    return EnsembleExplanation(out, np.clip(cam, 0, 1), np.asarray(fused_probs, dtype=np.float64),
                               index, list(classes))


def explain_model(ens: Ensemble, image: np.ndarray, *, method: str = "gradcam",
                  target: str | int | None = "predicted", layer: str | None = None
                  ) -> Explanation | EnsembleExplanation:
    """Explain a loaded model on one original ``HxWx3`` uint8 image: a lone member's map, or
    each member's and the fused map (:func:`cam_weights`) with the ensemble's own
    probabilities."""
    if not ens.is_ensemble:
        m = ens.members[0]
        return explain_member(m, image, ens.classes, method=method, target=target, layer=layer)
    fused = ens.predict_images([image]).proba[0]
    return explain_ensemble(ens.members, image, ens.classes, weights=cam_weights(ens),
                            fused_probs=fused, method=method, target=target, layer=layer)
