"""One Python entry point for scripts, notebooks, the CLI and the web app: ``histoclass.load``.

``load(path)`` reads a member checkpoint, an ensemble file (when
:mod:`histoclass.models.ensemble` is available) or an exported ``.onnx`` model and returns a
:class:`Classifier`. It applies the model's own preprocessing and stain normaliser, so callers
pass plain images: file paths, PIL images or ``HxWx3`` uint8 arrays.

A :class:`Classifier` is safe to share between threads: calls on it are serialised by a lock
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
from PIL import Image

from histoclass.data.breakhis import SUBTYPE_LABEL
from histoclass.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, _to_rgb, load_rgb

ImageLike = str | Path | Image.Image | np.ndarray


@dataclass
class Prediction:
    """A model's answer for one image.

    Attributes:
        source: The file path, or ``<image i>`` for in-memory images.
        probs: Probability per class (``{}`` when the image could not be read).
        members: Per-member probabilities, by member name (ensembles only).
        disagreement: Member disagreement (ensembles only).
        refer: True when the disagreement is above the model's refer threshold.
        error: Why the image could not be read, else ``None``.
    """

    source: str
    probs: dict[str, float] = field(default_factory=dict)
    members: dict[str, dict[str, float]] = field(default_factory=dict)
    disagreement: float | None = None
    refer: bool = False
    error: str | None = None

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


def to_rgb_image(item: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any accepted image input as an 8-bit RGB PIL image.

    Raises:
        ImageLoadError: A file that cannot be read (the message names it).
        ValueError: An array that is not ``HxW`` or ``HxWx3``/``HxWx4`` uint8.
        TypeError: Anything else.
    """
    if isinstance(item, str | Path):
        return load_rgb(item, max_pixels)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (
                item.ndim == 3 and item.shape[2] not in (3, 4)):
            raise ValueError(f"image array must be HxWx3 (or HxW, HxWx4) uint8, got shape "
                             f"{item.shape} dtype {item.dtype}")
        item = Image.fromarray(np.ascontiguousarray(item))
    if isinstance(item, Image.Image):
        if item.width * item.height > max_pixels:
            raise ValueError(f"image too large: {item.width}x{item.height} pixels > limit "
                             f"{max_pixels}")
        return _to_rgb(item)
    raise TypeError(f"expected an image path, PIL image or uint8 array, got {type(item).__name__}")


def _name(item: ImageLike, i: int) -> str:
    return str(item) if isinstance(item, str | Path) else f"<image {i}>"


class Classifier:
    """A loaded model: ``predict`` images and ``explain`` them (see :func:`load`).

    Attributes:
        classes: Class names in output order.
        task: ``binary`` or ``subtype``.
        is_ensemble: Several members combined.
        member_names: Member names (one for a lone member).
        refer_threshold: Disagreement above which ``refer`` is set.
        backend: ``torch`` or ``onnx``.
    """

    def __init__(self, engine: Any, backend: str, path: str | Path) -> None:
        self.engine, self.backend, self.path = engine, backend, Path(path)
        self.classes: list[str] = list(engine.classes)
        self.task: str = engine.task
        self.is_ensemble: bool = bool(engine.is_ensemble)
        self.member_names: list[str] = [m.name for m in engine.members]
        self.refer_threshold: float = float(engine.refer_threshold)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        kind = f"ensemble of {len(self.member_names)}" if self.is_ensemble else "member"
        return f"Classifier({self.path.name}, {kind}, {self.task}: {self.classes}, {self.backend})"

    def _result(self, source: str, proba: np.ndarray, members: np.ndarray | None,
                dis: float | None) -> Prediction:
        probs = {c: float(p) for c, p in zip(self.classes, proba, strict=True)}
        if not self.is_ensemble:
            return Prediction(source, probs)
        per = {n: {c: float(p) for c, p in zip(self.classes, mp, strict=True)}
               for n, mp in zip(self.member_names, members, strict=True)}
        return Prediction(source, probs, per, float(dis), bool(dis > self.refer_threshold))

    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 16,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
        """Predict one image or a list of them; unreadable files give a result with ``error``.

        Args:
            images: A path, PIL image or ``HxWx3`` uint8 array, or a list of them.
            batch_size: Images per forward pass.
            max_pixels: Refuse images with more pixels than this.
        """
        if isinstance(images, str | Path | Image.Image) or (
                isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            pil, idx = [], []
            results: list[Prediction | None] = []
            for i, item in enumerate(chunk, start):
                try:
                    pil.append(to_rgb_image(item, max_pixels))
                    idx.append(len(results))
                    results.append(None)
                except ImageLoadError as exc:
                    results.append(Prediction(_name(item, i), error=exc.reason))
            if pil:
                with self._lock:
                    proba, members, dis = self.engine.predict_images(pil)
                for k, j in enumerate(idx):
                    results[j] = self._result(
                        _name(chunk[j], start + j), proba[k],
                        None if members is None else members[:, k],
                        None if dis is None else dis[k])
            out += results
        return out

    def predict_frame(self, images: Sequence[ImageLike], **kwargs: Any) -> Any:
        """:meth:`predict` as a DataFrame in the predictions-CSV layout, one row per input.

        Columns: ``path``, ``p_malignant`` (binary) or ``p_<class>``, ``pred``; ensembles add
        ``member.<name>.p_...``, ``disagreement`` and ``refer``; then ``error`` (empty when fine).
        """
        import pandas as pd

        binary = self.classes == ["benign", "malignant"]
        rows = []
        for r in self.predict(images, **kwargs):
            row: dict[str, Any] = {"path": r.source}
            cls = ["malignant"] if binary else self.classes
            row.update({f"p_{c}": r.probs.get(c, np.nan) for c in cls})
            row["pred"] = r.label or ""
            if self.is_ensemble:
                for n in self.member_names:
                    mp = r.members.get(n, {})
                    row.update({f"member.{n}.p_{c}": mp.get(c, np.nan) for c in cls})
                row["disagreement"] = np.nan if r.disagreement is None else r.disagreement
                row["refer"] = int(r.refer)
            row["error"] = r.error or ""
            rows.append(row)
        return pd.DataFrame(rows)

    def explain(self, image: ImageLike, method: str = "gradcam", target: str = "predicted",
                alpha: float = 0.4, max_pixels: int = DEFAULT_MAX_PIXELS) -> Explained:
        """Grad-CAM overlay of one image (fused over members for an ensemble).

        Raises:
            RuntimeError: The model is an ONNX export (no gradients), or
                :mod:`histoclass.explain` is not installed.
            ImageLoadError: The image cannot be read.
        """
        if self.backend != "torch":
            raise RuntimeError(f"{self.path}: Grad-CAM needs the PyTorch checkpoint; an ONNX "
                               "export has no gradients (load the .pt file to explain)")
        try:
            from histoclass import explain as ex
        except ImportError as exc:
            raise RuntimeError(f"Grad-CAM is not available in this histoclass ({exc})") from None
        arr = np.asarray(to_rgb_image(image, max_pixels))
        with self._lock:
            e = self.engine.explain(ex, arr, method=method, target=target)
        if self.is_ensemble:  # the members' votes and disagreement come from predict
            pred = self.predict(arr)[0]
        else:
            pred = self._result(_name(image, 0), e.probs, None, None)
        members = {n: overlay(arr, m.cam, alpha) for n, _, m in getattr(e, "members", [])}
        return Explained(overlay(arr, e.cam, alpha), e.cam, pred, self.classes[e.target], members)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """A jet-coloured map blended over the image (``histoclass.explain_figures`` when present)."""
    try:
        from histoclass.explain_figures import overlay as fig_overlay

        return fig_overlay(image, cam, alpha)
    except ImportError:
        from matplotlib import colormaps

        heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255.0
        out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def load(path: str | Path, device: str = "cpu", threads: int | None = None) -> Classifier:
    """Load a member checkpoint, an ensemble file or an exported ``.onnx`` model.

    Args:
        path: Model file; ``.onnx`` runs on ONNX Runtime, anything else on PyTorch.
        device: PyTorch device.
        threads: ONNX Runtime intra-op threads (default: all cores).
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from histoclass.onnx_backend import OnnxClassifier

        return Classifier(OnnxClassifier(path, threads=threads), "onnx", path)
    from histoclass.torch_engine import TorchEngine

    return Classifier(TorchEngine(path, device), "torch", path)
