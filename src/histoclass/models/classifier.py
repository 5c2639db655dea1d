"""The one interface of a loaded model, and the one path from a decoded image to its inputs.

:class:`Classifier` is what ``predict``, the Python API, the web app and the slide and batch
engines ask of a model. Two classes implement it: the PyTorch
:class:`~histoclass.models.ensemble.Ensemble` (a lone member is an ensemble of one) and the ONNX
Runtime :class:`~histoclass.deploy.runtime.OnnxClassifier`. Everything crossing it is numpy.

:class:`Preparation` is how every consumer turns a decoded ``HxWx3`` uint8 RGB image into model
inputs: for each member, its stain normaliser (if any), then a resize to its input size (or, for
a ``tiles`` member, the native-resolution tiles of :mod:`histoclass.data.field_tiles`: a stack
per image), then (PyTorch) its mean/std normalisation. ONNX graphs normalise inside, so their
preparation stops after the resize. It holds only settings and fitted normalisers, so it pickles
into decoding pools and workers without the networks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from histoclass.data.field_tiles import InputMode, field_tiles
from histoclass.data.transforms import Preprocess
from histoclass.models.resolution import Resolution

# A fitted stain normaliser (histoclass.stain): uint8 HxWx3 RGB in, same shape out.
StainFn = Callable[[np.ndarray], np.ndarray]


class Scores(NamedTuple):
    """A model's outputs for a batch of N images (numpy)."""

    proba: np.ndarray  # [N, C] class probabilities (the ensemble's rule applied)
    pred: np.ndarray  # [N] class index (for ``hard``: the vote, ties broken by soft average)
    members: np.ndarray  # [M, N, C] each member's softmax (M = 1 for a lone member)
    disagreement: np.ndarray  # [N] member disagreement (0 for a lone member)


def concat_scores(parts: Sequence[Scores], classes: int, members: int) -> Scores:
    """Batches joined in order; an empty list gives zero-row arrays of the right shapes."""
    if not parts:
        return Scores(np.zeros((0, classes), np.float32), np.zeros(0, np.int64),
                      np.zeros((members, 0, classes), np.float32), np.zeros(0, np.float32))
    return Scores(np.concatenate([p.proba for p in parts]),
                  np.concatenate([p.pred for p in parts]),
                  np.concatenate([p.members for p in parts], 1),
                  np.concatenate([p.disagreement for p in parts]))


def nonfinite(scores: Scores) -> np.ndarray:
    """``[N]`` bool: rows whose probabilities, any member's or the disagreement are NaN/inf."""
    bad = ~np.isfinite(scores.proba).all(axis=1) | ~np.isfinite(scores.disagreement)
    if scores.members.size:
        bad |= ~np.isfinite(scores.members).all(axis=(0, 2))
    return bad


@dataclass(frozen=True, eq=False)
class Preparation:
    """stain -> resize -> normalise, once per distinct member setting.

    Args:
        steps: ``(preprocess, stain normaliser or None)`` per member, in member order.
        normalize: Return normalised float ``3xHxW`` tensors (PyTorch); ``False`` returns the
            resized ``HxWx3`` uint8 arrays (ONNX graphs normalise inside).
        inputs: Each member's :class:`~histoclass.data.field_tiles.InputMode` (empty, or a
            ``resize`` entry: the resize above). A ``tiles`` member gets a ``Tx3xSxS`` tensor
            (``TxSxSx3`` uint8 unnormalised) of the stain-normalised field's tiles instead.
    """

    steps: tuple[tuple[Preprocess, StainFn | None], ...]
    normalize: bool = True
    inputs: tuple[InputMode, ...] = ()

    def __call__(self, image: np.ndarray | Image.Image) -> list[Any]:
        """One input per member for an RGB image, a PIL image or an ``HxWx3`` uint8 array
        (members with equal settings share one)."""
        pil = image if isinstance(image, Image.Image) else None
        arr = None if pil is not None else np.asarray(image)
        done: dict[tuple[Preprocess, int, InputMode], Any] = {}
        out = []
        for i, (pre, stain) in enumerate(self.steps):
            mode = self.inputs[i] if i < len(self.inputs) else InputMode()
            key = (pre, id(stain), mode)
            if key not in done and mode.tiles:
                arr = np.asarray(pil) if arr is None else arr
                field = arr if stain is None else stain(arr)
                tiles = field_tiles(np.ascontiguousarray(field), mode.size, mode.stride)
                # all tiles at once: normalize broadcasts over the leading tile axis
                done[key] = (pre.normalize(torch.from_numpy(tiles).permute(0, 3, 1, 2))
                             .contiguous() if self.normalize else tiles)
            if key not in done:
                if stain is None:
                    pil = Image.fromarray(arr) if pil is None else pil
                    src = pil
                else:
                    arr = np.asarray(pil) if arr is None else arr
                    src = Image.fromarray(stain(arr))
                resized = pre.resize(src)
                done[key] = pre.normalize(resized) if self.normalize else resized
            out.append(done[key])
        return out


@runtime_checkable
class Classifier(Protocol):
    """A loaded member or ensemble, whatever runs it.

    Attributes:
        classes: Class names in output order.
        task: ``binary`` or ``subtype``.
        method: The ensemble rule (``soft``, ``weighted``, ``hard``, ``stack``, ``concat``), or
            ``single`` for a lone member.
        refer_threshold: Member disagreement above which an image is flagged ``refer``.
    """

    classes: list[str]
    task: str
    method: str
    refer_threshold: float

    @property
    def member_names(self) -> list[str]:
        """Member names, in the order of :attr:`Scores.members`."""

    @property
    def is_ensemble(self) -> bool:
        """Several members combined (``method != "single"``)."""

    @property
    def preparation(self) -> Preparation:
        """What a decoding worker applies to each image before :meth:`predict_prepared`."""

    @property
    def resolution(self) -> Resolution | None:
        """What one input covers on the specimen (microns per pixel of the training images and
        the field), ``None`` when the model does not record it
        (:mod:`histoclass.models.resolution`).

        Raises:
            ValueError: An ensemble whose members disagree.
        """

    def describe(self) -> dict[str, Any]:
        """Preprocessing, stain normaliser and members in plain types (for reports and files)."""

    def predict_prepared(self, items: Sequence[list[Any]], tta: bool = False) -> Scores:
        """Scores for images already passed through :attr:`preparation`.

        Raises:
            ValueError: ``tta`` on a backend without test-time augmentation.
        """

    def predict_images(self, images: Sequence[np.ndarray | Image.Image], tta: bool = False
                       ) -> Scores:
        """Scores for decoded RGB images of any size (``HxWx3`` uint8 arrays or PIL images)."""
