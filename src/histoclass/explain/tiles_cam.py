"""Class activation maps of a ``tiles`` member (``--input tiles``), stitched over the field.

A tiles member sees a field as native-resolution tiles (:mod:`histoclass.data.field_tiles`) and
predicts their mean (:mod:`histoclass.models.tiles`). Its map is computed per tile, for the
class the whole field is explained for, each tile's map upsampled to the tile, and the tiles
stitched back in place (averaged where they overlap, padding cut off): one map at the field's
native size. The tiles' maps are kept unscaled until stitched and the field's map is then
scaled to [0, 1] once (:func:`~histoclass.explain.cam.compute_raw_cams`), so a tile with
stronger evidence stays brighter than a tile with weaker evidence.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from histoclass.data.field_tiles import InputMode, stitch
from histoclass.data.transforms import Preprocess
from histoclass.explain.cam import (
    Explanation,
    class_index,
    compute_raw_cams,
    find_target_layer,
    resize_map,
)
from histoclass.models.classifier import Preparation, StainFn
from histoclass.models.tiles import reduce_logits, run_tiles

# Tiles per CAM pass (each keeps its activations and gradients at the target layer).
CAM_CHUNK = 32


def field_input(image: np.ndarray, preprocess: Preprocess, mode: InputMode,
                stain: StainFn | None = None) -> torch.Tensor:
    """A field's normalised tiles ``Tx3xSxS`` (the one preparation path)."""
    return Preparation(((preprocess, stain),), inputs=(mode,))(image)[0]


@torch.no_grad()
def field_probs(model: nn.Module, tiles: torch.Tensor, head: str = "finetune") -> np.ndarray:
    """The field's class probabilities from its tiles, as predict computes them."""
    _, logits = run_tiles(model, tiles)
    return reduce_logits(logits, torch.tensor([len(tiles)]), head).softmax(-1)[0].numpy()


def explain_tiles(model: nn.Module, image: np.ndarray, preprocess: Preprocess,
                  classes: list[str], mode: InputMode, *, method: str = "gradcam",
                  target: str | int | None = "predicted", layer: str | None = None,
                  stain: StainFn | None = None, head: str = "finetune") -> Explanation:
    """:func:`~histoclass.explain.cam.explain_image` for a tiles member: the map stitched from
    its tiles, at the field's (the image's) size."""
    layer_name, module = find_target_layer(model, layer)
    tiles = field_input(image, preprocess, mode, stain)
    probs = field_probs(model, tiles, head)
    index = class_index(target, classes)
    index = int(np.argmax(probs)) if index is None else index
    maps = []
    for part in tiles.split(CAM_CHUNK):
        raw, _ = compute_raw_cams(model, part, module, method, index)
        maps += [resize_map_raw(m, mode.size) for m in raw]
    h, w = image.shape[:2]
    full = stitch(np.stack(maps), w, h, mode.size, mode.stride)
    top = float(full.max())
    full = (full / top if top > 0 else full).astype(np.float32)
    return Explanation(np.clip(full, 0.0, 1.0), probs, index, list(classes), method, layer_name)


def resize_map_raw(cam: np.ndarray, size: int) -> np.ndarray:
    """An unscaled ``hxw`` map bilinearly resized to ``size x size`` (not clipped to [0, 1])."""
    top = float(cam.max())
    if top <= 0:
        return np.zeros((size, size), np.float32)
    return resize_map(cam / top, (size, size)) * top  # resize_map clips to [0, 1]: scale around it
