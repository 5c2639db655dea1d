"""Stain normalization for H&E images: Reinhard, Macenko and Vahadane behind one interface.

    norm = stain.fit("vahadane", [target_rgb])   # uint8 HxWx3 arrays, one or several
    out = norm(img, name="x.png")               # same shape, uint8; too little tissue -> unchanged
    stain.save(norm, "target.json"); stain.load("target.json")  # exact round trip

Why our own numpy code rather than a library: torchstain (Macenko, Reinhard) is torch-first and
its numpy backend still ships inside a package that imports torch, while this module must stay
torch-free (it runs in the data layer and in process pools); StainTools needs SPAMS (a compiled
dependency that often fails to build) and is slow (SPAMS' dictionary learning runs a fixed one
second per image). The three methods are a few hundred lines of numpy, follow StainTools'
definitions (luminosity tissue mask, 99th-percentile concentration matching, non-negative
Lasso concentrations) and are checked against it in ``benchmarks/stain_speed.py``. Vahadane's
sparse non-negative factorisation is solved exactly for two stains in closed form per pixel,
which makes it more than 10x faster than StainTools (see ``docs/benchmarks.md``, stain section).

No torch, OpenCV or scikit-image here: numpy only.

The alternative to normalizing is making the model colour-robust: HED and colour jitter in
training (``histoclass.data.transforms.Augment(hed_jitter=..., color_jitter=...)``), which the
study did not try.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from histoclass.stain._base import FORMAT, Normalizer
from histoclass.stain.macenko import MacenkoNormalizer
from histoclass.stain.reinhard import ReinhardNormalizer
from histoclass.stain.vahadane import VahadaneNormalizer

METHODS = ("reinhard", "macenko", "vahadane")
_CLASSES: dict[str, type[Normalizer]] = {
    "reinhard": ReinhardNormalizer, "macenko": MacenkoNormalizer, "vahadane": VahadaneNormalizer,
}


def create(method: str) -> Normalizer:
    """An unfitted normalizer with default parameters.

    Raises:
        ValueError: ``method`` is not one of :data:`METHODS`.
    """
    key = method.lower() if isinstance(method, str) else method
    if key not in _CLASSES:
        raise ValueError(f"unknown stain method {method!r}; choose one of {', '.join(METHODS)}")
    return _CLASSES[key]()


def fit(method: str, targets: list[np.ndarray] | np.ndarray) -> Normalizer:
    """Fit a normalizer of ``method`` to one target image or several (pooled).

    Args:
        method: One of :data:`METHODS`.
        targets: uint8 ``HxWx3`` RGB array(s).

    Raises:
        ValueError: Unknown method, bad image, or a target with too little tissue.
    """
    return create(method).fit(targets)


def from_dict(d: dict) -> Normalizer:
    """Rebuild a fitted normalizer from :meth:`Normalizer.to_dict` output (exact round trip).

    Raises:
        ValueError: Unknown method or format, or missing fields.
    """
    method = d.get("method") if isinstance(d, dict) else None
    if method not in _CLASSES:
        raise ValueError(f"unknown stain method {method!r}; choose one of {', '.join(METHODS)}")
    if d.get("format") != FORMAT:
        raise ValueError(f"unsupported stain target format {d.get('format')!r}; expected {FORMAT}")
    try:
        obj = _CLASSES[method](float(d["luminosity_threshold"]), float(d["min_tissue"]))
        obj._from_params(d)
    except KeyError as exc:
        raise ValueError(f"{method} stain target is missing field {exc.args[0]!r}") from None
    obj.fitted = True
    return obj


def save(normalizer: Normalizer, path: str | Path) -> Path:
    """Write the fitted target as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(normalizer.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load(path: str | Path) -> Normalizer:
    """Read a normalizer written by :func:`save`.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not JSON, or not a stain target.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stain target {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON stain target ({exc})") from None
    try:
        return from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


__all__ = [
    "METHODS", "MacenkoNormalizer", "Normalizer", "ReinhardNormalizer", "VahadaneNormalizer",
    "create", "fit", "from_dict", "load", "save",
]
