"""The PyTorch engine behind :func:`histoclass.load` for checkpoints and ensemble files.

It wraps :func:`histoclass.models.ensemble.load_model_file` when that module is available (a
member, or an ensemble of any method), and otherwise loads a lone member checkpoint itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from histoclass.models.checkpoint import load_checkpoint, preprocess_of, stain_of


class _Member(NamedTuple):
    name: str
    model: torch.nn.Module
    meta: dict[str, Any]
    preprocess: Any
    stain: Any


class SingleModel:
    """A lone member checkpoint with the subset of the ensemble interface this module uses."""

    method = "single"
    is_ensemble = False
    refer_threshold = 1.0
    weights = None

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        model, meta = load_checkpoint(path, device)
        self.members = [_Member(meta["arch"], model, meta, preprocess_of(meta),
                                stain_of(meta, path))]
        self.classes, self.task = list(meta["classes"]), meta.get("task", "binary")
        self.device = torch.device(device)


def load_any(path: str | Path, device: str = "cpu") -> Any:
    """An ensemble-like object for any model file (ensemble support when it is installed)."""
    try:
        from histoclass.models.ensemble import load_model_file
    except ImportError:
        return SingleModel(path, device)
    return load_model_file(path, device)


def prepare(members: Sequence[Any], img: Image.Image) -> list[torch.Tensor]:
    """One normalised ``3xHxW`` input per member; members with equal settings share the work."""
    done: dict[Any, torch.Tensor] = {}
    out = []
    for m in members:
        key = (m.preprocess, id(m.stain))
        if key not in done:
            src = img if m.stain is None else Image.fromarray(m.stain(np.asarray(img)))
            done[key] = m.preprocess.normalize(m.preprocess.resize(src))
        out.append(done[key])
    return out


class TorchEngine:
    """Predict and explain with PyTorch (see :class:`histoclass.api.Classifier`)."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.ens = load_any(path, device)
        self.classes, self.task = self.ens.classes, self.ens.task
        self.is_ensemble = self.ens.is_ensemble
        self.members = self.ens.members
        self.refer_threshold = self.ens.refer_threshold

    @torch.inference_mode()
    def predict_images(self, images: Sequence[Image.Image]
                       ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Probabilities ``[N, C]``, members' ``[M, N, C]`` and disagreement ``[N]``."""
        per = [prepare(self.members, img) for img in images]
        inputs = [torch.stack([p[m] for p in per]).to(self.ens.device)
                  for m in range(len(self.members))]
        if not self.is_ensemble:
            logits = self.members[0].model(inputs[0])
            return logits.float().softmax(-1).cpu().numpy(), None, None
        out = self.ens.predict_proba(inputs)
        return (out.proba.cpu().numpy(), out.members.cpu().numpy(),
                out.disagreement.cpu().numpy())

    def explain(self, ex: Any, image: np.ndarray, method: str, target: str) -> Any:
        """Grad-CAM via ``histoclass.explain``; ensembles get the weighted fused map."""
        if not self.is_ensemble:
            m = self.members[0]
            return ex.explain_image(m.model, image, m.preprocess, self.classes, method=method,
                                    target=target, stain=m.stain)
        proba, _, _ = self.predict_images([Image.fromarray(image)])
        n = len(self.members)
        weights = self.ens.weights if self.ens.method == "weighted" else [1.0 / n] * n
        members = [(m.name, m.model, m.preprocess, w, m.stain)
                   for m, w in zip(self.members, weights, strict=True)]
        try:  # its home in newer versions; earlier ones kept it in histoclass.explain
            from histoclass.explain_ensemble import explain_ensemble
        except ImportError:
            explain_ensemble = ex.explain_ensemble
        return explain_ensemble(members, image, self.classes, fused_probs=proba[0],
                                method=method, target=target)
