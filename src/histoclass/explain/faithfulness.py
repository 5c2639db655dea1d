"""Which CAM method to trust: deletion/insertion scores (Petsiuk et al. 2018), optionally ROAD.

Deletion replaces the pixels a map ranks highest, step by step, with a blurred copy of the image
and records the explained class's probability: a faithful map makes it fall fast (low area
under the curve). Insertion starts from the blurred image and restores those pixels first: a
faithful map makes it rise fast (high area). A blurred baseline rather than black keeps the
perturbed images closer to what the model saw in training. Every method is compared with a
random map on the same images, its chance level. ROAD (Rong et al. 2022, shipped by
``grad-cam``) imputes removed pixels from their neighbours instead; it is slower (a sparse
solve per percentile), so it is optional.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from histoclass.data.transforms import Preprocess
from histoclass.explain.cam import (
    class_index,
    compute_cam,
    find_target_layer,
    model_input,
    resize_map,
)
from histoclass.models.classifier import StainFn


def _blur(x: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F  # noqa: N812

    size = max(x.shape[-2:])
    k = max(3, (size // 8) | 1)
    return F.gaussian_blur(x, [k, k], [k / 3.0, k / 3.0])


def deletion_insertion(model: nn.Module, x: torch.Tensor, cam: np.ndarray, target: int,
                       steps: int = 8, seed: int = 0) -> tuple[float, float]:
    """Areas under the deletion and insertion curves of ``cam`` (input size) for ``target``.

    Args:
        model: Classifier returning logits.
        x: ``1x3xHxW`` normalised input.
        cam: ``HxW`` map at the input size.
        target: Class whose probability is tracked.
        steps: Fractions ``0, 1/steps, ..., 1`` of the pixels are removed/restored.
        seed: Breaks ties between equal map values (maps are upsampled from coarse grids).

    Returns:
        ``(deletion_auc, insertion_auc)``, both in [0, 1].
    """
    h, w = x.shape[-2:]
    if cam.shape != (h, w):
        raise ValueError(f"map {cam.shape} must have the input's size {(h, w)}")
    jitter = np.random.default_rng(seed).random(h * w) * 1e-6
    order = torch.from_numpy(np.argsort(-(cam.reshape(-1) + jitter), kind="stable").copy())
    base = _blur(x)
    masks = torch.zeros(steps + 1, h * w)
    for k in range(1, steps + 1):
        masks[k, order[: round(k / steps * h * w)]] = 1.0
    masks = masks.view(steps + 1, 1, h, w)
    deleted = x * (1 - masks) + base * masks
    inserted = base * (1 - masks) + x * masks
    with torch.inference_mode():
        probs = torch.cat([torch.softmax(model(b), 1)[:, target]
                           for b in torch.cat([deleted, inserted]).split(9)]).numpy()
    dx = 1.0 / steps
    trapz = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it
    return float(trapz(probs[: steps + 1], dx=dx)), float(trapz(probs[steps + 1:], dx=dx))


def road_score(model: nn.Module, x: torch.Tensor, cam: np.ndarray, target: int,
               percentiles: tuple[int, ...] = (20, 40, 60, 80)) -> float:
    """``grad-cam``'s ROAD combined score (higher is more faithful) for one map."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    metric = ROADCombined(percentiles=list(percentiles))
    torch.manual_seed(0)  # the imputer adds noise
    return float(metric(x, cam[None], [ClassifierOutputSoftmaxTarget(target)], model)[0])


def _random_cam(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    coarse = rng.random((7, 7)).astype(np.float32)  # as coarse as a CAM at stride 32
    return resize_map(coarse, (shape[1], shape[0]))


def score_methods(model: nn.Module, preprocess: Preprocess, images: list[np.ndarray],
                  classes: list[str], methods: list[str], *, target: str = "predicted",
                  layer: str | None = None, steps: int = 8, road: bool = False,
                  stain: StainFn | None = None) -> list[dict[str, Any]]:
    """One row per method (plus ``random``): mean deletion, insertion, insertion - deletion,
    optionally ROAD, and the CAM's seconds per image.

    Higher ``ins_minus_del`` (and ROAD) means a more faithful map; a method not clearly above
    ``random`` should not be trusted on these images.
    """
    _, module = find_target_layer(model, layer)
    wanted = class_index(target, classes)
    inputs = [model_input(img, preprocess, stain) for img in images]
    with torch.inference_mode():
        targets = [wanted if wanted is not None else int(model(x)[0].argmax()) for x in inputs]
    rng = np.random.default_rng(0)
    rows = []
    for method in [*methods, "random"]:
        dels, inss, roads, seconds = [], [], [], 0.0
        for x, t in zip(inputs, targets, strict=True):
            start = time.perf_counter()
            if method == "random":
                cam = _random_cam(tuple(x.shape[-2:]), rng)
            else:
                cam, _, _ = compute_cam(model, x, module, method, t)
            seconds += time.perf_counter() - start
            d, i = deletion_insertion(model, x, cam, t, steps)
            dels.append(d)
            inss.append(i)
            if road:
                roads.append(road_score(model, x, cam, t))
        row = {"method": method, "deletion": float(np.mean(dels)),
               "insertion": float(np.mean(inss)),
               "ins_minus_del": float(np.mean(inss) - np.mean(dels))}
        if road:
            row["road"] = float(np.mean(roads))
        row["sec_per_image"] = seconds / max(1, len(inputs))
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`score_methods` rows."""
    import pandas as pd

    return pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}")
