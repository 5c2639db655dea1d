"""Class activation maps for one member or an ensemble, at the original image's resolution.

All CAM methods come from the ``grad-cam`` package (``pytorch_grad_cam``) behind one small
function, :func:`compute_cam`. What this module adds:

- the target layer is found automatically: for timm EfficientNetV1/V2 (and Lite) it is ``bn2``,
  the ``BatchNormAct2d`` after ``conv_head`` whose output (BN + SiLU) is exactly what global
  pooling and the classifier see. ``conv_head`` alone would be the pre-BN, pre-activation map,
  whose negative parts the activation discards before the head ever sees them.
- frozen backbones work and nothing leaks: during a call every parameter is set to
  ``requires_grad=False`` and a prepended forward hook turns the target layer's output into a
  fresh leaf that requires grad. Gradients then flow only from the logits back to that layer
  (the backbone below builds no graph, which also makes a CAM cost about one forward pass),
  and all hooks, flags and graph references are released in ``finally``.
- the target is the class's log-odds, ``logit_c - logsumexp(other logits)``: monotone in the
  displayed probability (a plain logit can highlight evidence shared by both classes).
- the map is computed at the model's input size and resized to the original image, which the
  preprocessing squashes (no crop), so the map lines up pixel for pixel. A ``tiles`` member's
  map is stitched from its native-resolution tiles instead (:mod:`histoclass.explain.tiles_cam`).

A model instance must not be explained from two threads at once (hooks are per module).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from histoclass.data.transforms import Preprocess
from histoclass.explain.tokens import (
    default_token_layer,
    is_token_model,
    token_candidates,
    token_reshape,
)
from histoclass.models.classifier import Preparation, StainFn

log = logging.getLogger(__name__)

METHODS: dict[str, str] = {
    "gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
    "eigencam": "EigenCAM", "layercam": "LayerCAM",
}
_LAYER_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SiLU, nn.ReLU, nn.GELU)


@dataclass
class Explanation:
    """One model's map for one image.

    Attributes:
        cam: ``HxW`` float32 in [0, 1] at the original image's size.
        probs: Class probabilities (softmax of the logits).
        target: Index of the explained class.
        classes: Class names in output order.
        method: CAM method name.
        layer: Name of the target layer.
    """

    cam: np.ndarray
    probs: np.ndarray
    target: int
    classes: list[str]
    method: str
    layer: str

    @property
    def pred(self) -> int:
        """Index of the predicted class."""
        return int(np.argmax(self.probs))


class LogOddsTarget:
    """CAM target: ``logit_c - logsumexp(others)``; ``index=None`` explains the argmax."""

    def __init__(self, index: int | None = None) -> None:
        self.index = index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            self.index = int(logits.detach().argmax())
        others = torch.cat([logits[: self.index], logits[self.index + 1:]])
        return logits[self.index] - torch.logsumexp(others, dim=0)


def candidate_layers(model: nn.Module, n: int = 10) -> list[str]:
    """Sensible CAM target layers: the last ``n`` conv/norm/activation modules, or for a
    transformer the ``norm1`` of its last ``n`` blocks."""
    if is_token_model(model):
        return token_candidates(model, n)
    names = [name for name, m in model.named_modules() if name and isinstance(m, _LAYER_TYPES)]
    return names[-n:]


def find_target_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The CAM target layer: ``name`` if given, else ``bn2`` (timm EfficientNet),
    ``blocks[-1].norm1`` (timm ViT, see :mod:`histoclass.explain.tokens`) or the last
    conv/norm/activation module.

    Raises:
        ValueError: ``name`` is not a module of ``model``; the message lists candidates.
    """
    modules = dict(model.named_modules())
    if name is None:
        timm_efficientnet = "bn2" in modules and "conv_head" in modules
        name = ("bn2" if timm_efficientnet else default_token_layer(model)
                or (candidate_layers(model, 1) or [""])[0])
    if not name or name not in modules:
        raise ValueError(
            f"layer {name!r} not found in {type(model).__name__}; candidate layers: "
            f"{', '.join(candidate_layers(model))}"
        )
    return name, modules[name]


def _leaf(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
    # A fresh leaf: backward stops here, whatever the parameters' requires_grad flags are.
    return output.detach().requires_grad_(True)


def compute_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module, method: str = "gradcam",
                target: int | None = None) -> tuple[np.ndarray, torch.Tensor, int]:
    """Run one ``grad-cam`` method on a ``1x3xHxW`` input and release everything it attached.

    Returns:
        The map at the input size (``HxW`` float32 in [0, 1]), the logits (1-D) and the index of
        the explained class (``target``, or the argmax when ``None``).
    """
    grey, _, logits, index = _run_cam(model, x, layer, method, target)
    if not np.any(grey[0] > 0):  # a blank overlay would read as "no evidence anywhere"
        log.warning("%s: the %s map is empty at this layer (no positive weights for class %d);"
                    " try another method or --layer", type(model).__name__, method, index)
    return np.clip(grey[0], 0.0, 1.0).astype(np.float32), logits[0], index


def compute_raw_cams(model: nn.Module, x: torch.Tensor, layer: nn.Module, method: str,
                     target: int) -> tuple[np.ndarray, torch.Tensor]:
    """:func:`compute_cam` for a batch ``Bx3xHxW`` explaining class ``target`` in every image,
    returning the unscaled maps (``Bxhxw`` at the layer's resolution, negative parts cut) and
    the logits ``BxC``: ``grad-cam`` scales each image's map to [0, 1] on its own, which would
    make the tiles of one field incomparable."""
    _, raw, logits, _ = _run_cam(model, x, layer, method, target, raw=True)
    return np.maximum(np.asarray(raw, np.float32), 0.0), logits


def _run_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module, method: str,
             target: int | None, raw: bool = False
             ) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor, int]:
    import pytorch_grad_cam

    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]  # grad-cam calls model.zero_grad(): keep a caller's grads
    was_training = model.training
    goal = LogOddsTarget(target)
    hook = layer.register_forward_hook(_leaf, prepend=True)
    cam = None
    try:
        for p in params:
            p.requires_grad_(False)
        kind = _fast_eigen_cam() if method == "eigencam" else getattr(pytorch_grad_cam,
                                                                      METHODS[method])
        cam = (_capturing(kind) if raw else kind)(model=model, target_layers=[layer],
                                                  reshape_transform=token_reshape(model, x))
        with torch.enable_grad():
            grey = cam(input_tensor=x, targets=[goal] * len(x))
        logits = cam.outputs.detach()
        captured = getattr(cam, "raw", None)
    finally:
        hook.remove()
        if cam is not None:
            cam.activations_and_grads.release()
            cam.outputs = None  # holds the graph (grad-cam backpropagates with retain_graph)
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    if goal.index is None:  # gradient-free methods (EigenCAM) never call the target
        goal.index = int(logits[0].argmax())
    return grey, captured, logits, goal.index


def _capturing(kind: type) -> type:
    """``kind`` keeping its maps as computed, before ``grad-cam`` scales them per image."""

    class Capturing(kind):
        def get_cam_image(self, *args, **kwargs):
            self.raw = super().get_cam_image(*args, **kwargs)
            return self.raw

    return Capturing


def eigen_projection(activations: np.ndarray) -> np.ndarray:
    """First principal component of ``BxCxHxW`` activations per image, salient side positive.

    The same map as ``grad-cam``'s ``get_2d_projection_with_sign_correction``, but with an
    economy SVD: the package asks for all of V (1280x1280 for EfficientNet-B0), about a second
    per image on CPU, and uses only its first row.
    """
    out = []
    for act in np.nan_to_num(activations):
        flat = torch.from_numpy(np.ascontiguousarray(act.reshape(act.shape[0], -1).T))
        flat = flat - flat.mean(dim=0)
        # torch's SVD: numpy's OpenBLAS spins up its own threads, ~100x slower on a busy CPU.
        vt = torch.linalg.svd(flat, full_matrices=False)[2]
        proj = (flat @ vt[0]).reshape(act.shape[1:]).numpy()
        out.append(-proj if abs(proj.min()) > abs(proj.max()) else proj)
    return np.float32(out)


@functools.cache
def _fast_eigen_cam() -> type:
    from pytorch_grad_cam import EigenCAM

    class FastEigenCAM(EigenCAM):
        def get_cam_image(self, input_tensor, target_layer, target_category, activations,
                          grads, eigen_smooth):
            return eigen_projection(activations)

    return FastEigenCAM


def resize_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map to ``(width, height)``, kept in [0, 1]."""
    import cv2

    out = cv2.resize(cam.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def class_index(target: str | int | None, classes: list[str]) -> int | None:
    """``predicted``/``None`` -> ``None``; a class name or index -> its index."""
    if target is None or target == "predicted":
        return None
    if isinstance(target, int) and 0 <= target < len(classes):
        return target
    if target in classes:
        return classes.index(target)
    raise ValueError(f"unknown class {target!r}; choose predicted or one of {', '.join(classes)}")


def model_input(image: np.ndarray, preprocess: Preprocess, stain: StainFn | None = None
                ) -> torch.Tensor:
    """Original ``HxWx3`` uint8 image -> normalised ``1x3xhxw`` model input (the one
    preparation path of :class:`~histoclass.models.classifier.Preparation`)."""
    return Preparation(((preprocess, stain),))(image)[0].unsqueeze(0)


def explain_image(model: nn.Module, image: np.ndarray, preprocess: Preprocess,
                  classes: list[str], *,
                  method: str = "gradcam", target: str | int | None = "predicted",
                  layer: str | None = None, stain: StainFn | None = None) -> Explanation:
    """Explain one model's output on one original-resolution ``HxWx3`` uint8 image.

    Args:
        model: Classifier returning logits.
        image: The original image (the map is returned at its size).
        preprocess: The model's :class:`~histoclass.data.transforms.Preprocess`.
        classes: Class names in output order.
        method: One of :data:`METHODS`.
        target: ``predicted``, a class name or index.
        layer: Target layer name; ``None`` finds it (see :func:`find_target_layer`).
        stain: Optional stain normaliser applied before resizing, as in training.
    """
    layer_name, module = find_target_layer(model, layer)
    x = model_input(image, preprocess, stain)
    cam, logits, index = compute_cam(model, x, module, method, class_index(target, classes))
    probs = torch.softmax(logits.float(), 0).numpy()
    full = resize_map(cam, (image.shape[1], image.shape[0]))
    return Explanation(full, probs, index, list(classes), method, layer_name)
