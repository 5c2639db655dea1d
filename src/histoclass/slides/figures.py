"""Pictures of a slide run: the heat map over the thumbnail, and the most malignant tiles.

Built on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot state), like the
explanation figures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclass.models.classifier import Classifier
from histoclass.slides.outputs import CMAP, atomic, heat_rgba, shrink, write_png
from histoclass.slides.reader import Slide

log = logging.getLogger(__name__)
_NICE_MM = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)


def heatmap_figure(thumb: np.ndarray, heat: np.ndarray, grid: Any, scale: float,
                   polygons: list[Any], title: str, threshold: float, thumb_mpp: float,
                   path: Path) -> Path:
    """``heatmap.png``: thumbnail, p(malignant) per tile, colour bar, legend and scale bar.

    Args:
        scale: Thumbnail pixels per level-0 pixel.
        thumb_mpp: Microns per thumbnail pixel (for the scale bar).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    thumb, f = shrink(thumb, 1600)
    scale, thumb_mpp = scale * f, thumb_mpp / f
    h, w = thumb.shape[:2]
    width_in = 9.0
    fig = Figure(figsize=(width_in, width_in * h / w * 0.85 + 1.2), dpi=110,
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(thumb)
    ax.imshow(heat_rgba(heat, grid, (h, w), scale), alpha=0.55, interpolation="nearest")
    for poly in polygons:
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords) * scale
            ax.plot(xy[:, 0], xy[:, 1], color="black", linewidth=1.2)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    mappable = ScalarMappable(Normalize(0, 1), colormaps[CMAP])
    fig.colorbar(mappable, ax=ax, fraction=0.04, label="p(malignant) per tile")
    target_mm = w * thumb_mpp / 1000 / 5
    mm = max([v for v in _NICE_MM if v <= target_mm] or [_NICE_MM[0]])
    ax.add_artist(AnchoredSizeBar(ax.transData, mm * 1000 / thumb_mpp, f"{mm:g} mm",
                                  "lower right", pad=0.4, color="black", frameon=True,
                                  size_vertical=max(1, h / 150)))
    ax.legend(handles=[Patch(facecolor="none", edgecolor="black",
                             label=f"malignant region (p >= {threshold:g})"),
                       Patch(facecolor="white", edgecolor="grey",
                             label="no colour: glass, or tile below --min-tissue")],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8,
              frameon=False)
    with atomic(path) as fh:
        fig.savefig(fh, format="png", pil_kwargs={"compress_level": 1})
    fig.clear()
    return path


def top_tiles(clf: Classifier, slide: Slide, level: int, frame: pd.DataFrame,
              p_mal: np.ndarray, k: int, out: Path) -> list[Path]:
    """The ``k`` most malignant tiles as read (``NN_x<X>_y<Y>.png``) and, for a PyTorch model,
    their Grad-CAM figures (``NN_x<X>_y<Y>.cam.png``, fused over members for ensembles)."""
    from histoclass.models.ensemble import Ensemble

    explain = isinstance(clf, Ensemble)
    if not explain and k:
        log.warning("Grad-CAM needs the PyTorch checkpoint; writing the top tiles without CAMs")
    written = []
    order = np.argsort(-np.nan_to_num(p_mal, nan=-1.0), kind="stable")[:k]
    for rank, i in enumerate(order, 1):
        t = frame.iloc[int(i)]
        x, y, w, h = (int(t[c]) for c in ("x", "y", "width", "height"))
        stem = f"{rank:02d}_x{x}_y{y}"
        tile = slide.read(x, y, w, h, level)
        written.append(write_png(tile, out / f"{stem}.png"))
        if explain:
            written.append(_cam_figure(clf, tile, f"#{rank} ({x}, {y}) p(malignant)="
                                       f"{p_mal[i]:.3f}", out / f"{stem}.cam.png"))
    return written


def _cam_figure(clf: Any, tile: np.ndarray, title: str, path: Path) -> Path:
    from histoclass.explain import (
        EnsembleExplanation,
        ensemble_figure,
        explain_model,
        explanation_figure,
    )

    e = explain_model(clf, tile)
    fig = (ensemble_figure(tile, e, title) if isinstance(e, EnsembleExplanation)
           else explanation_figure(tile, e, title))
    with atomic(path) as fh:
        fig.savefig(fh, format="png", pil_kwargs={"compress_level": 1})
    fig.clear()
    return path
