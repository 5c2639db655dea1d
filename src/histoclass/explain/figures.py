"""Figures for explanations: field, heat map and overlay at full resolution, and the ensemble
grid, in one perceptually uniform colour map (:data:`CMAP`) with a colour bar.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no
global figure registry to leak from in a long-running server, and no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from histoclass.data.files import atomic_write
from histoclass.explain.cam import Explanation
from histoclass.explain.ensemble import EnsembleExplanation

# Pixels per inch for figures whose panels show the image at (close to) full resolution.
_DPI = 100
_MAX_PANEL_PX = 900  # bigger originals are shown smaller in figures (overlay PNGs stay full size)

# Perceptually uniform (equal steps of the map look like equal steps of colour, and it reads in
# grey scale), and its yellow-green-blue stays distinct from the pinks and purples of H&E.
CMAP = "viridis"
ALPHA = 0.6  # opacity where the map is 1; it falls with the map (see ``overlay``)
MAP_NOTE = "map scaled to this image: 0 = no influence, 1 = its strongest region"


def heat_rgba(cam: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """The map as ``HxWx4`` uint8: colour from ``cmap``, opacity equal to the map, so an
    overlay of it at opacity ``a`` blends like :func:`overlay` ``(alpha=a)``."""
    from matplotlib import colormaps

    m = np.clip(cam, 0, 1)
    rgba = colormaps[cmap](m)
    rgba[..., 3] = m
    return np.clip(rgba * 255.0 + 0.5, 0, 255).astype(np.uint8)


def css_gradient(steps: int = 11, cmap: str = CMAP) -> str:
    """The colour map as a CSS ``linear-gradient`` (a colour bar in a web page)."""
    from matplotlib import colormaps

    stops = ", ".join("#{:02x}{:02x}{:02x}".format(*(int(255 * c + 0.5) for c in rgba[:3]))
                      for rgba in colormaps[cmap](np.linspace(0, 1, steps)))
    return f"linear-gradient(to right, {stops})"


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = ALPHA,
            cmap: str = CMAP) -> np.ndarray:
    """Blend a colour-mapped ``HxW`` map in [0, 1] over an ``HxWx3`` uint8 image (same size).

    The blend weight is ``alpha * map``: where the map is low the tissue shows unchanged, so
    the overlay tints only the regions that drove the prediction (a uniform blend tints the
    whole field with the map's low colour).
    """
    from matplotlib import colormaps

    if cam.shape != image.shape[:2]:
        raise ValueError(f"map {cam.shape} and image {image.shape[:2]} differ in size")
    m = np.clip(cam, 0, 1).astype(np.float32)
    heat = colormaps[cmap](m)[..., :3].astype(np.float32) * 255.0
    w = (alpha * m)[..., None]
    out = (1.0 - w) * image.astype(np.float32) + w * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


_BAR_IN = 0.8  # inches below the panels for the colour bar and its label
_TITLE_IN = 0.35  # inches above them for the title (a layout ``rect`` does not keep its room)


def _figure(n_panels: int, ncols: int, height: int, width: int, extra_h: float = 0.45) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale = min(1.0, _MAX_PANEL_PX / max(height, width))
    nrows = math.ceil(n_panels / ncols)
    fig_h = nrows * (height * scale / _DPI + extra_h) + _BAR_IN + _TITLE_IN
    fig = Figure(figsize=(ncols * width * scale / _DPI, fig_h), dpi=_DPI, layout="constrained")
    fig.get_layout_engine().set(rect=(0, _BAR_IN / fig_h, 1,
                                      1 - (_BAR_IN + _TITLE_IN) / fig_h))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    for ax in axes:
        ax.set_axis_off()
    return fig, axes


def _colorbar(fig: Any, ax: Any, x0: float, x1: float) -> None:
    """A horizontal colour bar in the band under the panels, from ``x0`` to ``x1`` (figure
    fractions), drawn as ``ax``'s inset so ``fig.axes`` keeps one axes per panel."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    band = _BAR_IN / fig.get_figheight()
    cax = ax.inset_axes((x0, band * 0.62, x1 - x0, band * 0.2), transform=fig.transFigure)
    cax.set_in_layout(False)  # it sits in the band the layout keeps free
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), CMAP), cax=cax, orientation="horizontal")
    bar.set_ticks([0, 0.25, 0.5, 0.75, 1])
    bar.ax.tick_params(labelsize=8)
    bar.set_label(f"heat map ({CMAP}): {MAP_NOTE}", fontsize=9)


def _prob_text(classes: list[str], probs: np.ndarray, index: int) -> str:
    return f"p({classes[index]})={float(probs[index]):.3f}"


def _truth_text(classes: list[str], pred: int, label: str | None) -> str:
    if not label:
        return "true label unknown"
    return f"true {label}: {'correct' if label == classes[pred] else 'WRONG'}"


def explanation_figure(image: np.ndarray, expl: Explanation | EnsembleExplanation,
                       title: str = "", alpha: float = ALPHA, label: str | None = None) -> Any:
    """The field, its heat map (with a colour bar) and the overlay side by side, titled with
    the prediction, its probability and, when ``label`` is known, the true class.

    An :class:`EnsembleExplanation` shows the fused map of its members.

    Returns:
        A ``matplotlib.figure.Figure`` with three axes (the colour bar is the map's inset).
    """
    h, w = image.shape[:2]
    fig, (a0, a1, a2) = _figure(3, 3, h, w)
    if isinstance(expl, EnsembleExplanation):
        how = f"{expl.members[0][2].method}, fused over {len(expl.members)} members"
    else:
        how = f"{expl.method} @ {expl.layer}"
    a0.imshow(image)
    a0.set_title(f"field ({w}x{h} px)")
    a1.imshow(expl.cam, cmap=CMAP, vmin=0, vmax=1)
    a1.set_title(f"heat map: {how}")
    _colorbar(fig, a1, 0.36, 0.64)
    a2.imshow(overlay(image, expl.cam, alpha))
    a2.set_title(f"overlay: what points to {expl.classes[expl.target]}")
    pred = expl.classes[expl.pred]
    fig.suptitle(f"{title + ': ' if title else ''}predicted {pred} "
                 f"({_prob_text(expl.classes, expl.probs, expl.pred)}); "
                 f"{_truth_text(expl.classes, expl.pred, label)}")
    return fig


def ensemble_figure(image: np.ndarray, ens: EnsembleExplanation, title: str = "",
                    alpha: float = ALPHA, ncols: int = 4, label: str | None = None) -> Any:
    """The study's figure: every member's overlay with its own probability, and the fused one.

    Returns:
        A ``matplotlib.figure.Figure`` with exactly ``len(members) + 1`` axes, the last being the
        ensemble's (its colour bar is an inset).
    """
    h, w = image.shape[:2]
    n = len(ens.members) + 1
    fig, axes = _figure(n, min(ncols, n), h, w, extra_h=0.6)
    for ax, (name, weight, e) in zip(axes, ens.members, strict=False):
        ax.imshow(overlay(image, e.cam, alpha))
        ax.set_title(f"{name} (w={weight:.2f})\n{_prob_text(e.classes, e.probs, ens.target)}",
                     fontsize=9)
    axes[-1].imshow(overlay(image, ens.cam, alpha))
    axes[-1].set_title(f"ensemble: predicted {ens.classes[ens.pred]}\n"
                       f"{_prob_text(ens.classes, ens.probs, ens.target)}", fontsize=9,
                       fontweight="bold")
    _colorbar(fig, axes[-1], 0.3, 0.7)
    method = ens.members[0][2].method
    fig.suptitle(f"{title + ': ' if title else ''}{method}, explaining "
                 f"{ens.classes[ens.target]}; {_truth_text(ens.classes, ens.pred, label)}")
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a figure as PNG and free it."""
    # Fast zlib level: 3-4x quicker to write than the default, files ~15% bigger. Atomic: a
    # full disk leaves no 0-byte PNG behind.
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=_DPI,
                                              pil_kwargs={"compress_level": 1}))
    fig.clear()
    return Path(path)


def save_overlay(image: np.ndarray, cam: np.ndarray, path: str | Path,
                 alpha: float = ALPHA) -> Path:
    """Write the overlay as a PNG at exactly the original image's resolution."""
    from PIL import Image

    img = Image.fromarray(overlay(image, cam, alpha))
    return atomic_write(path, lambda fh: img.save(fh, format="PNG", compress_level=1))
