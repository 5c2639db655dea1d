"""Preprocessing (taken from the model, carried in checkpoints) and training augmentations.

Whole images are resized ("squashed") to the model's input size, as the study did: a BreakHis
image is one field of view, and a centre crop would throw away a sixth of the tissue.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

# Bounds on a model's input side: the largest timm models take ~600 px; 4096 px is a 200 MB
# float tensor per image, and anything above is a broken or hostile model file.
MIN_SIDE, MAX_SIDE = 8, 4096

# Ruifrok & Johnston's haematoxylin/eosin/DAB optical-density vectors (rows), as in skimage.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: size ``(H, W)``, normalisation, interpolation."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @classmethod
    def from_data_config(cls, cfg: dict[str, Any], image_size: int | None = None) -> Preprocess:
        """Build from ``timm.data.resolve_model_data_config`` output, optionally resized."""
        _, h, w = cfg["input_size"]
        if image_size:
            h = w = int(image_size)
        interp = cfg.get("interpolation", "bicubic")
        if interp not in _INTERP:
            raise ValueError(f"interpolation {interp!r} not supported; use one of {list(_INTERP)}")
        return cls((int(h), int(w)), tuple(map(float, cfg["mean"])),
                   tuple(map(float, cfg["std"])), interp)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, safe for ``torch.load(weights_only=True)`` and JSON."""
        d = asdict(self)
        for key in ("input_size", "mean", "std"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`, checked: model files come from anywhere.

        Raises:
            ValueError: A missing key, or a value of the wrong type or out of bounds (an input
                side outside ``[8, MAX_SIDE]`` would be a typo or an out-of-memory kill).
        """
        if not isinstance(d, dict):
            raise ValueError(f"preprocess must be a mapping, got {type(d).__name__}")
        missing = [k for k in ("input_size", "mean", "std", "interpolation") if k not in d]
        if missing:
            raise ValueError(f"preprocess is missing {', '.join(missing)}")
        size, interp = d["input_size"], d["interpolation"]
        if (not isinstance(size, list | tuple) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
                or not all(MIN_SIDE <= v <= MAX_SIDE for v in size)):
            raise ValueError(f"preprocess input_size {size!r}: need [height, width], integers in "
                             f"[{MIN_SIDE}, {MAX_SIDE}]")
        for key in ("mean", "std"):
            v = d[key]
            if (not isinstance(v, list | tuple) or len(v) != 3
                    or not all(isinstance(x, int | float) and math.isfinite(x) for x in v)
                    or (key == "std" and not all(x > 0 for x in v))):
                raise ValueError(f"preprocess {key} {v!r}: need 3 finite numbers"
                                 + (" > 0" if key == "std" else ""))
        if interp not in _INTERP:
            raise ValueError(f"preprocess interpolation {interp!r}: choose one of "
                             f"{', '.join(_INTERP)}")
        return cls(tuple(size), tuple(map(float, d["mean"])), tuple(map(float, d["std"])), interp)

    def resize(self, img: Image.Image) -> np.ndarray:
        """Resize an RGB image to the input size; returns ``HxWx3`` uint8."""
        h, w = self.input_size
        if img.size != (w, h):
            img = img.resize((w, h), _INTERP[self.interpolation])
        return np.array(img, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays

    def normalize(self, arr: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``HxWx3`` uint8 array (or ``3xHxW`` uint8 tensor) -> normalised float ``3xHxW``."""
        t = torch.from_numpy(arr).permute(2, 0, 1) if isinstance(arr, np.ndarray) else arr
        t = t.float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return t.sub_(mean).div_(std)


class HedJitter(torch.nn.Module):
    """Random scale and shift of haematoxylin/eosin/DAB concentrations (Tellez et al. 2018).

    Args:
        sigma: Scale factors are drawn from ``U(1 - sigma, 1 + sigma)`` and shifts from
            ``U(-sigma, sigma)``, per stain channel.
    """

    def __init__(self, sigma: float = 0.05) -> None:
        super().__init__()
        self.sigma = sigma
        self.register_buffer("to_hed", torch.tensor(HED_FROM_RGB, dtype=torch.float32))
        self.to_rgb: torch.Tensor
        self.register_buffer("to_rgb", torch.tensor(RGB_FROM_HED, dtype=torch.float32))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Jitter a ``3xHxW`` uint8 tensor; returns uint8."""
        x = img.float().div(255.0).clamp_min(1e-6)
        od = -torch.log(x).permute(1, 2, 0)  # HxWx3 optical density
        hed = od @ self.to_hed
        alpha = 1 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.sigma
        od = (hed * alpha + beta) @ self.to_rgb
        out = torch.exp(-od).clamp(0, 1).mul(255.0).round().to(torch.uint8)
        return out.permute(2, 0, 1)


@dataclass(frozen=True)
class Augment:
    """The study's augmentations, plus optional colour and HED jitter (off by default)."""

    flips: bool = True
    degrees: float = 36.0
    translate: float = 0.3
    color_jitter: float = 0.0
    hed_jitter: float = 0.0

    def build(self) -> v2.Compose:
        """A torchvision pipeline over ``3xHxW`` uint8 tensors."""
        ops: list[torch.nn.Module] = []
        if self.flips:
            ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if self.degrees or self.translate:
            # White fill: what lies beyond a field of view is empty glass.
            ops.append(v2.RandomAffine(self.degrees, (self.translate, self.translate), fill=255))
        if self.color_jitter:
            c = self.color_jitter
            ops.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(c, 0.5) / 4))
        if self.hed_jitter:
            ops.append(HedJitter(self.hed_jitter))
        return v2.Compose(ops)
