"""One Python entry point for scripts, notebooks, the CLI and the web app: ``histoclass.load``.

``load(path)`` reads a member checkpoint, an ensemble file or an exported ``.onnx`` model and
returns a :class:`Model`. It applies the model's own preprocessing and stain normaliser, so
callers pass plain images: file paths, PIL images or ``HxWx3`` uint8 arrays.

A :class:`Model` is safe to share between threads: calls on it are serialised by a lock
(Grad-CAM hooks must never be attached from two threads at once, and two cores gain nothing from
two concurrent forward passes).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from histoclass.calibration import referral
from histoclass.data.breakhis import SUBTYPE_LABEL
from histoclass.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, to_rgb_image
from histoclass.models import Classifier, Ensemble, Scores, load_model_file, resolve_device
from histoclass.models.classifier import concat_scores
from histoclass.predict import NONFINITE, nonfinite, score_frame

ImageLike = str | Path | Image.Image | np.ndarray
BACKENDS = ("torch", "onnx")


@dataclass
class Prediction:
    """A model's answer for one image.

    Attributes:
        source: The file path, or ``<image i>`` for in-memory images.
        probs: Probability per class (``{}`` when the image could not be read).
        members: Per-member probabilities, by member name (ensembles only).
        disagreement: Member disagreement (ensembles only).
        refer: True when the top probability is below the model's ``--refer-risk``
            threshold or the members' disagreement is above its refer threshold.
        refer_reason: Why ``refer`` is set (``low confidence 0.62 < 0.80``, ``members
            disagree``, or both), empty when it is not.
        error: Why the image could not be read, or why it has no answer (a non-finite model
            output), else ``None``.
    """

    source: str
    probs: dict[str, float] = field(default_factory=dict)
    members: dict[str, dict[str, float]] = field(default_factory=dict)
    disagreement: float | None = None
    refer: bool = False
    error: str | None = None
    refer_reason: str = ""

    @property
    def ok(self) -> bool:
        """The image was read and predicted."""
        return self.error is None

    @property
    def label(self) -> str | None:
        """The predicted class (a subtype for subtype models)."""
        return max(self.probs, key=self.probs.get) if self.probs else None

    @property
    def prob(self) -> float | None:
        """Probability of the predicted class."""
        return self.probs[self.label] if self.probs else None

    @property
    def p_malignant(self) -> float | None:
        """``p(malignant)``; for subtype models the sum over the malignant subtypes."""
        if not self.probs:
            return None
        if "malignant" in self.probs:
            return self.probs["malignant"]
        return sum(p for c, p in self.probs.items() if SUBTYPE_LABEL.get(c) == "malignant")

    @property
    def verdict(self) -> str | None:
        """``benign`` or ``malignant`` whatever the task."""
        p = self.p_malignant
        return None if p is None else ("malignant" if p >= 0.5 else "benign")


@dataclass
class Explained:
    """A Grad-CAM explanation: the overlay at the image's size, the map and the prediction."""

    overlay: np.ndarray
    cam: np.ndarray
    prediction: Prediction
    target: str
    member_overlays: dict[str, np.ndarray] = field(default_factory=dict)


def _name(item: ImageLike, i: int) -> str:
    return str(item) if isinstance(item, str | Path) else f"<image {i}>"


class Model:
    """A loaded model: ``predict`` images and ``explain`` them (see :func:`load`).

    Attributes:
        classifier: What runs it (:class:`~histoclass.models.classifier.Classifier`: the PyTorch
            ensemble or the ONNX Runtime session).
        classes: Class names in output order.
        task: ``binary`` or ``subtype``.
        is_ensemble: Several members combined.
        member_names: Member names (one for a lone member).
        refer_threshold: Disagreement above which ``refer`` is set.
        backend: ``torch`` or ``onnx``.
    """

    def __init__(self, classifier: Classifier, path: str | Path) -> None:
        self.classifier, self.path = classifier, Path(path)
        self.backend = "torch" if isinstance(classifier, Ensemble) else "onnx"
        self.classes: list[str] = list(classifier.classes)
        self.task: str = classifier.task
        self.is_ensemble: bool = classifier.is_ensemble
        self.member_names: list[str] = classifier.member_names
        self.refer_threshold: float = float(classifier.refer_threshold)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        kind = f"ensemble of {len(self.member_names)}" if self.is_ensemble else "member"
        return f"Model({self.path.name}, {kind}, {self.task}: {self.classes}, {self.backend})"

    def describe(self) -> dict[str, Any]:
        """Preprocessing, stain normaliser and members, in plain types."""
        return self.classifier.describe()

    def _result(self, source: str, scores: Scores, k: int) -> Prediction:
        probs = {c: float(p) for c, p in zip(self.classes, scores.proba[k], strict=True)}
        low = getattr(self.classifier, "confidence_threshold", None)
        if not self.is_ensemble:
            refer, why = referral([max(probs.values())], low)
            return Prediction(source, probs, refer=bool(refer[0]), refer_reason=str(why[0]))
        per = {n: {c: float(p) for c, p in zip(self.classes, mp, strict=True)}
               for n, mp in zip(self.member_names, scores.members[:, k], strict=True)}
        dis = float(scores.disagreement[k])
        refer, why = referral([max(probs.values())], low, np.array([dis > self.refer_threshold]))
        return Prediction(source, probs, per, dis, bool(refer[0]), refer_reason=str(why[0]))

    def _score(self, images: ImageLike | Sequence[ImageLike], batch_size: int, max_pixels: int
               ) -> tuple[list[str], list[str | None], Scores]:
        """Names, read errors (``None`` when read) and the scores of the readable inputs."""
        if isinstance(images, str | Path | Image.Image) or (
                isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        images = list(images)
        sources, errors, parts = [], [], []
        for start in range(0, len(images), batch_size):
            decoded = []
            for i, item in enumerate(images[start:start + batch_size], start):
                sources.append(_name(item, i))
                try:
                    decoded.append(to_rgb_image(item, max_pixels))
                    errors.append(None)
                except ImageLoadError as exc:
                    errors.append(exc.reason)
            if decoded:
                with self._lock:
                    parts.append(self.classifier.predict_images(decoded))
        return sources, errors, concat_scores(parts, len(self.classes), len(self.member_names))

    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 16,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
        """Predict one image or a list of them; unreadable files give a result with ``error``.

        Args:
            images: A path, PIL image or ``HxWx3`` uint8 array, or a list of them.
            batch_size: Images per forward pass.
            max_pixels: Refuse images with more pixels than this.
        """
        sources, errors, scores = self._score(images, batch_size, max_pixels)
        bad = nonfinite(scores)  # a NaN/inf output is an error, never a class or a verdict
        out, k = [], 0
        for source, error in zip(sources, errors, strict=True):
            if error is not None:
                out.append(Prediction(source, error=error))
                continue
            out.append(Prediction(source, error=NONFINITE) if bad[k]
                       else self._result(source, scores, k))
            k += 1
        return out

    def predict_frame(self, images: Sequence[ImageLike], batch_size: int = 16,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> pd.DataFrame:
        """:meth:`predict` as a DataFrame in the predictions-CSV layout, one row per input.

        Columns: ``path``, then :func:`histoclass.predict.score_frame`'s (``p_malignant`` or
        ``p_<class>``, ``pred``; ensembles add ``member.<name>.p_...``, ``disagreement`` and
        ``refer``), then ``error`` (empty when fine; its row's scores are empty).
        """
        sources, errors, scores = self._score(images, batch_size, max_pixels)
        scored = score_frame(self.classifier, scores, self.refer_threshold)
        scored.index = [i for i, e in enumerate(errors) if e is None]
        frame = scored.reindex(range(len(sources)))
        frame.insert(0, "path", sources)
        frame["pred"] = frame["pred"].fillna("")
        if "refer" in frame:
            frame["refer"] = frame["refer"].fillna(0).astype(int)
        output_errors = frame.pop("error") if "error" in frame else [None] * len(sources)
        # one rule with score_frame: an unreadable file or a non-finite output is an error row
        frame["error"] = [e or (o if isinstance(o, str) else "") for e, o in
                          zip(errors, output_errors, strict=True)]
        return frame

    def predict_slide(self, slide: str | Path, out: str | Path = "slide-results",
                      on_progress: Any = None, **options: Any) -> dict[str, Any]:
        """Score a whole slide into ``out/<slide stem>/`` (heat map, ``tiles.csv``, GeoJSON,
        ``summary.json``: :func:`histoclass.slides.predict_slide`) and return its summary.

        Args:
            slide: Slide file (needs the ``slides`` extra).
            out: Parent folder of the slide's result folder.
            on_progress: Called with ``(tiles done, tissue tiles)`` after every batch.
            options: :class:`histoclass.slides.SlideOptions` fields (``mpp``, ``model_mpp``,
                ``min_tissue``, ``overlap``, ``batch_size``, ``explain_top``, ...).
        """
        from histoclass.slides import SlideOptions, predict_slide

        return predict_slide(self.classifier, slide, out, SlideOptions(**options),
                             on_progress=on_progress, lock=self._lock)

    def explain(self, image: ImageLike, method: str = "gradcam", target: str = "predicted",
                alpha: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Explained:
        """Grad-CAM overlay of one image (fused over members for an ensemble, weighted by
        :func:`histoclass.explain.cam_weights`); ``alpha`` is the overlay's opacity where the
        map is 1 (default :data:`histoclass.explain.figures.ALPHA`).

        Raises:
            RuntimeError: The model is an ONNX export (no gradients).
            ImageLoadError: The image cannot be read.
        """
        from histoclass.explain import EnsembleExplanation, explain_model, overlay
        from histoclass.explain.figures import ALPHA

        alpha = ALPHA if alpha is None else alpha
        if not isinstance(self.classifier, Ensemble):
            raise RuntimeError(f"{self.path}: Grad-CAM needs the PyTorch checkpoint; an ONNX "
                               "export has no gradients (load the .pt file to explain)")
        arr = np.asarray(to_rgb_image(image, max_pixels))
        with self._lock:
            e = explain_model(self.classifier, arr, method=method, target=target)
        if isinstance(e, EnsembleExplanation):  # the members' votes and disagreement
            pred = self.predict(arr)[0]
            members = {n: overlay(arr, m.cam, alpha) for n, _, m in e.members}
        else:
            probs = np.asarray(e.probs, dtype=float)
            pred = (Prediction(_name(image, 0), dict(zip(self.classes, probs.tolist(),
                                                         strict=True)))
                    if np.isfinite(probs).all() else Prediction(_name(image, 0), error=NONFINITE))
            members = {}
        return Explained(overlay(arr, e.cam, alpha), e.cam, pred, self.classes[e.target], members)


def open_classifier(path: str | Path, backend: str = "torch", device: str = "cpu",
                    threads: int | None = None) -> Classifier:
    """The runner of a model file: ONNX Runtime for an ``.onnx`` file (or ``backend="onnx"``),
    else the PyTorch member or ensemble (:func:`histoclass.models.load_model_file`).

    Args:
        path: Model file, or a published model (``local-dir:DIR``, ``hf-hub:ORG/NAME``).
        backend: ``torch`` or ``onnx``.
        device: PyTorch device (``auto``, ``cpu``, ``cuda``, ...).
        threads: ONNX Runtime intra-op threads (default: all cores).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    if backend == "onnx" or Path(path).suffix.lower() == ".onnx":
        from histoclass.deploy.runtime import OnnxClassifier

        return OnnxClassifier(Path(path), threads=threads)
    # A file, or a published folder's name (local-dir:DIR, hf-hub:ORG/NAME): the loader resolves.
    return load_model_file(path, resolve_device(device))


def load(path: str | Path, device: str = "cpu", threads: int | None = None) -> Model:
    """Load a member checkpoint, an ensemble file, an exported ``.onnx`` model or a published
    folder (``local-dir:DIR``, ``hf-hub:ORG/NAME``; see ``histoclass publish``).

    Args:
        path: Model file or name; ``.onnx`` runs on ONNX Runtime, anything else on PyTorch.
        device: PyTorch device.
        threads: ONNX Runtime intra-op threads (default: all cores).
    """
    return Model(open_classifier(path, device=device, threads=threads), path)
