"""What a slide run leaves behind: heat map (array and figure), GeoJSON for QuPath, summary.

Every file except the appended ``tiles.csv`` is written to a temporary name and renamed, so a
crash never leaves half a file under the final name.

Slide verdict (:data:`VERDICT_RULE`): ``malignant`` when the mean p(malignant) of the ``top_k``
most malignant tissue tiles (all tiles when fewer) reaches ``threshold``, else ``benign``. The
slide is referred to a pathologist when one of those tiles is flagged ``refer`` (its members
disagree) or fewer than ``top_k`` tissue tiles were scored.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from histoclass.data.breakhis import SUBTYPE_LABEL
from histoclass.slides.tiling import Grid

VERDICT_RULE = ("malignant when the mean p(malignant) of the {k} most malignant tissue tiles "
                "(all tiles when fewer) is >= {t:g}, else benign; refer when one of those tiles "
                "is flagged refer (members disagree) or fewer than {k} tissue tiles were scored")
CMAP = "RdYlBu_r"  # blue benign -> red malignant; glass and unscored tiles stay transparent
COLOURS = {"benign": [60, 120, 220], "malignant": [220, 40, 40]}


@contextlib.contextmanager
def atomic(path: Path) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``path`` only once fully written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with 0o666 honours the umask (mkstemp would make every result owner-only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: Path) -> Path:
    """JSON (indented, NaN refused: undefined numbers must already be ``None``)."""
    with atomic(path) as fh:
        fh.write(json.dumps(obj, indent=2, allow_nan=False).encode())
    return path


def write_png(image: np.ndarray, path: Path) -> Path:
    """An ``HxW`` or ``HxWx3/4`` uint8 array as PNG."""
    from PIL import Image

    with atomic(path) as fh:
        Image.fromarray(image).save(fh, format="png", compress_level=1)
    return path


def p_malignant(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """p(malignant) per row: the binary column, or the sum over the malignant subtypes."""
    if "p_malignant" in frame:
        return frame["p_malignant"].to_numpy(float)
    cols = [f"p_{c}" for c in classes if SUBTYPE_LABEL.get(c) == "malignant"]
    return frame[cols].to_numpy(float).sum(1)


def heat_grid(frame: pd.DataFrame, p_mal: np.ndarray, grid: Grid) -> np.ndarray:
    """``[rows, cols]`` float32 map of p(malignant); NaN where no tile was scored."""
    heat = np.full((grid.rows, grid.cols), np.nan, np.float32)
    heat[frame["row"].to_numpy(int), frame["col"].to_numpy(int)] = p_mal
    return heat


def regions(frame: pd.DataFrame, p_mal: np.ndarray, threshold: float) -> list[Any]:
    """Polygons (level-0 pixels) of the union of tiles with p(malignant) >= ``threshold``."""
    import shapely

    hit = frame[p_mal >= threshold]
    if hit.empty:
        return []
    boxes = shapely.box(hit["x"], hit["y"], hit["x"] + hit["width"], hit["y"] + hit["height"])
    union = shapely.union_all(boxes).simplify(0)
    return list(getattr(union, "geoms", [union]))


def _finite(values: dict[str, Any]) -> dict[str, float]:
    """Measurements as floats, leaving out undefined ones (JSON has no NaN)."""
    out = {k: float(v) for k, v in values.items()}
    return {k: v for k, v in out.items() if np.isfinite(v)}


def _ring(coords: Any) -> list[list[float]]:
    return [[float(x), float(y)] for x, y in coords]


def write_geojson(frame: pd.DataFrame, p_mal: np.ndarray, polygons: list[Any], mpp: float,
                  threshold: float, path: Path) -> Path:
    """A FeatureCollection QuPath imports (File > Import objects): one ``tile`` per scored tile
    with its ``classification`` (the predicted class) and ``measurements``, and one
    ``annotation`` per merged malignant region. Streamed: memory does not grow with tiles."""
    import shapely

    measure = [c for c in frame.columns if c.startswith("p_") or ".p_" in c
               or c in ("tissue", "disagreement", "refer")]
    ix = {c: i for i, c in enumerate(frame.columns)}
    with atomic(path) as fh:
        fh.write(b'{"type": "FeatureCollection", "features": [\n')
        first = True
        for t, p in zip(frame.itertuples(index=False, name=None), p_mal, strict=True):
            x, y, w, h = (int(t[ix[c]]) for c in ("x", "y", "width", "height"))
            pred = str(t[ix["pred"]])
            feat = {"type": "Feature", "id": f"tile-{t[ix['row']]}-{t[ix['col']]}",
                    "geometry": {"type": "Polygon", "coordinates": [
                        [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
                    "properties": {
                        "objectType": "tile", "name": f"tile {t[ix['row']]},{t[ix['col']]}",
                        "classification": {"name": pred,
                                           "color": COLOURS.get(pred, [128, 128, 128])},
                        "measurements": _finite({"p_malignant": p,
                                                 **{c: t[ix[c]] for c in measure}})}}
            fh.write((("" if first else ",\n") + json.dumps(feat)).encode())
            first = False
        for i, poly in enumerate(polygons, 1):
            inside = shapely.contains_xy(poly, frame["x"] + frame["width"] / 2,
                                         frame["y"] + frame["height"] / 2) & (p_mal >= threshold)
            feat = {"type": "Feature", "id": f"region-{i}",
                    "geometry": {"type": "Polygon", "coordinates": [
                        _ring(poly.exterior.coords), *(_ring(r.coords) for r in poly.interiors)]},
                    "properties": {"objectType": "annotation", "name": f"malignant region {i}",
                                   "classification": {"name": "malignant",
                                                      "color": COLOURS["malignant"]},
                                   "measurements": {
                                       "area_mm2": float(poly.area * mpp * mpp / 1e6),
                                       "tiles": int(inside.sum()),
                                       "mean_p_malignant": float(p_mal[inside].mean())}}}
            fh.write((("" if first else ",\n") + json.dumps(feat)).encode())
            first = False
        fh.write(b"\n]}\n")
    return path


def verdict(frame: pd.DataFrame, p_mal: np.ndarray, top_k: int, threshold: float
            ) -> dict[str, Any]:
    """The slide-level numbers of :data:`VERDICT_RULE` (``frame``: scored tissue tiles)."""
    ok = np.isfinite(p_mal)
    p, tissue = p_mal[ok], frame["tissue"].to_numpy(float)[ok]
    order = np.argsort(-p, kind="stable")[:top_k]
    top_mean = float(p[order].mean()) if len(order) else None
    refer_top = int(frame["refer"].to_numpy(int)[ok][order].sum()) if "refer" in frame else 0
    reasons = []
    if refer_top:
        reasons.append(f"{refer_top} of the top {len(order)} tiles flagged refer")
    if len(p) < top_k:
        reasons.append(f"only {len(p)} tissue tile(s) scored (< top-k {top_k})")
    return {
        "tiles_scored": len(p), "tiles_non_finite": int((~ok).sum()),
        "malignant_fraction": float((tissue * (p >= threshold)).sum() / tissue.sum())
        if tissue.sum() > 0 else None,
        "top_k": top_k, "top_k_mean_p_malignant": top_mean,
        "max_p_malignant": float(p.max()) if len(p) else None,
        "verdict": None if top_mean is None else
        ("malignant" if top_mean >= threshold else "benign"),
        "verdict_rule": VERDICT_RULE.format(k=top_k, t=threshold),
        "refer": bool(reasons), "refer_reasons": reasons,
        "refer_tiles": int(frame["refer"].sum()) if "refer" in frame else 0,
    }


def heat_rgba(heat: np.ndarray, grid: Grid, shape: tuple[int, int], scale: float) -> np.ndarray:
    """The heat map as an ``HxWx4`` uint8 image over a thumbnail of ``shape`` at ``scale``
    thumbnail pixels per level-0 pixel (each tile's stride cell, centred on the tile)."""
    from matplotlib import colormaps

    h, w = shape
    off_x, off_y = (grid.tile_w - grid.stride_x) / 2, (grid.tile_h - grid.stride_y) / 2
    cols = np.floor(((np.arange(w) + 0.5) / scale - off_x) / grid.stride_x).astype(int)
    rows = np.floor(((np.arange(h) + 0.5) / scale - off_y) / grid.stride_y).astype(int)
    valid = (rows[:, None] >= 0) & (rows[:, None] < grid.rows) & (cols >= 0) & (cols < grid.cols)
    values = heat[np.clip(rows, 0, grid.rows - 1)[:, None], np.clip(cols, 0, grid.cols - 1)]
    values = np.where(valid, values, np.nan)
    rgba = (colormaps[CMAP](np.nan_to_num(values, nan=0.0)) * 255 + 0.5).astype(np.uint8)
    rgba[..., 3] = np.where(np.isfinite(values), 255, 0)
    return rgba


def blend(thumb: np.ndarray, rgba: np.ndarray, alpha: float) -> np.ndarray:
    """``rgba`` over the RGB thumbnail at opacity ``alpha`` (the app's slider)."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0 * float(np.clip(alpha, 0, 1))
    return (thumb * (1 - a) + rgba[..., :3] * a + 0.5).astype(np.uint8)


def shrink(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``image`` scaled down (area average) to at most ``max_side`` pixels a side, and the
    factor applied (pictures need no more than a screen's pixels)."""
    from PIL import Image

    f = min(1.0, max_side / max(image.shape[:2]))
    if f == 1.0:
        return image, 1.0
    size = (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX)), f


def overlay_of(folder: str | Path, alpha: float = 0.5, max_side: int = 1600) -> np.ndarray:
    """A finished slide folder's heat map over its thumbnail at opacity ``alpha`` (RGB uint8,
    at most ``max_side`` pixels a side), from ``thumbnail.png``, ``heatmap.npy`` and
    ``summary.json`` alone."""
    from PIL import Image

    folder = Path(folder)
    thumb, _ = shrink(np.asarray(Image.open(folder / "thumbnail.png").convert("RGB")), max_side)
    heat = np.load(folder / "heatmap.npy")
    summary = json.loads((folder / "summary.json").read_text())
    r = summary["reading"]
    grid = Grid(*r["tile_level0"], *r["stride_level0"], r["grid"][1], r["grid"][0],
                r["level"], r["upsampled"])
    scale = thumb.shape[1] / summary["slide_info"]["width"]
    return blend(thumb, heat_rgba(heat, grid, thumb.shape[:2], scale), alpha)
