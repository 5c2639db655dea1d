"""One slide, start to finish: ``predict_slide(classifier, path, out) -> summary``.

Steps: open the slide (:class:`~histoclass.slides.reader.Slide`), size tiles to the model's
resolution (:mod:`~histoclass.slides.tiling`), find tissue on a thumbnail
(:mod:`~histoclass.slides.tissue`), then score the tissue tiles through the
:class:`~histoclass.models.classifier.Classifier` protocol (PyTorch or ONNX Runtime alike):
reader threads read and prepare the next tiles while the model runs the current batch, so at most
``2 * batch_size + workers`` tiles are in memory whatever the slide's size. Each batch's rows are
appended to ``tiles.csv`` as soon as they are scored; a rerun with the same settings scores only
the tiles still missing (``run.json`` records the settings and a probe of the model). The
function is self-contained (a classifier, a path and a folder in; files and a summary out), so a
process pool or a Ray task can call it per slide.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclass._version import __version__
from histoclass.models.classifier import Classifier, concat_scores
from histoclass.models.resolution import Resolution
from histoclass.predict import prepared_batches, score_frame
from histoclass.slides import outputs
from histoclass.slides.figures import heatmap_figure, top_tiles
from histoclass.slides.reader import Slide, SlideError
from histoclass.slides.resume import fingerprint, resume
from histoclass.slides.tiling import Grid, make_grid
from histoclass.slides.tissue import DEFAULT_MIN_AREA_MM2, METHOD, tile_fractions, tissue_mask

log = logging.getLogger(__name__)
INFO = ["x", "y", "width", "height", "row", "col", "tissue"]
VIEW_SIDE = 1600  # pixels on the long side of thumbnail.png and the heat map's background


@dataclass(frozen=True)
class SlideOptions:
    """Settings of a slide run (the CLI's options; see ``histoclass slide --help``)."""

    mpp: float | None = None  # level-0 um/px for slides that do not record it
    model_mpp: float | None = None  # training-image um/px for models that do not record it
    min_tissue: float = 0.5
    overlap: float = 0.0
    batch_size: int = 16
    workers: int = 2
    threshold: float = 0.5
    top_k: int = 5
    explain_top: int = 0
    refer_threshold: float | None = None
    min_area_mm2: float = DEFAULT_MIN_AREA_MM2
    restart: bool = False
    progress: bool = False


def model_resolution(clf: Classifier, model_mpp: float | None = None) -> tuple[Resolution, str]:
    """The resolution tiles are read at and where it came from (``model`` or ``--model-mpp``).

    Raises:
        ValueError: The model records none and ``model_mpp`` is not given, or members disagree.
    """
    if model_mpp is None:
        recorded = clf.resolution
        if recorded is None:
            raise ValueError("the model records no training resolution; pass --model-mpp (microns"
                             " per pixel of its training images, e.g. 0.4924 for BreakHis 40X, "
                             "0.197 100X, 0.0985 200X, 0.0492 400X)")
        return recorded, "model"
    if not model_mpp > 0:
        raise ValueError(f"--model-mpp {model_mpp}: microns per pixel must be > 0")
    try:
        recorded = clf.resolution
    except ValueError:
        recorded = None
    if recorded is not None and abs(recorded.mpp - model_mpp) > 0.01 * recorded.mpp:
        log.warning("--model-mpp %g overrides the model's recorded %g um/px", model_mpp,
                    recorded.mpp)
    h, w = clf.preparation.steps[0][0].input_size
    return Resolution(float(model_mpp), recorded.field if recorded else (w, h)), "--model-mpp"


def _score(clf: Classifier, slide: Slide, grid: Grid, todo: pd.DataFrame, tiles: Path,
           opts: SlideOptions, bar: Any, on_progress: Callable[[int, int], None] | None,
           done: int, total: int, lock: Any) -> int:
    """Score ``todo`` tiles, appending each batch to ``tiles.csv``; returns how many."""
    boxes = todo[["x", "y", "width", "height"]].to_numpy()

    def load(i: int, prepare: Any) -> Any:
        # Raising (not returning a reason) ends the slide at its first bad tile: OpenSlide
        # handles are unusable after an error.
        try:
            return prepare(slide.read(*boxes[i], grid.level))
        except SlideError:
            raise
        except Exception as exc:  # e.g. a stain step failing on an odd tile
            raise SlideError(f"{slide.path}: tile at ({boxes[i][0]}, {boxes[i][1]}): "
                             f"{type(exc).__name__}: {exc}") from None

    scored = 0
    with open(tiles, "a", newline="") as fh:
        for rows, items, _ in prepared_batches(range(len(todo)), clf.preparation,
                                               opts.batch_size, opts.workers, loader=load):
            with lock:
                scores = clf.predict_prepared(items)
            part = pd.concat([todo.iloc[rows].reset_index(drop=True),
                              score_frame(clf, scores, opts.refer_threshold)], axis=1)
            part.to_csv(fh, header=fh.tell() == 0, index=False, lineterminator="\n")
            fh.flush()
            scored += len(rows)
            bar.update(len(rows))
            if on_progress is not None:
                on_progress(done + scored, total)
    return scored


def predict_slide(clf: Classifier, path: str | Path, out: str | Path,
                  options: SlideOptions = SlideOptions(),
                  on_progress: Callable[[int, int], None] | None = None,
                  lock: Any = None) -> dict[str, Any]:
    """Score one slide into ``out/<slide stem>/`` and return its summary (``summary.json``).

    Args:
        clf: The model (any :class:`Classifier`).
        path: Slide file.
        out: Parent folder of the slide's folder.
        options: Run settings.
        on_progress: Called with ``(tiles done, tissue tiles)`` after every batch.
        lock: Held around each use of the model (a model shared between threads).

    Raises:
        SlideError: The slide cannot be used (the message names it).
        ValueError: The model has no resolution and ``options.model_mpp`` is not given.
    """
    from tqdm.auto import tqdm

    start, opts, path = time.perf_counter(), options, Path(path)
    lock = contextlib.nullcontext() if lock is None else lock
    folder = Path(out) / path.stem
    res, res_source = model_resolution(clf, opts.model_mpp)
    with Slide(path, opts.mpp) as slide:
        grid = make_grid(slide, res, clf, opts.overlap)
        long_um = max(slide.width, slide.height) * slide.mpp
        mask_mpp = max(min(max(min(res.microns) / 16, 2.0), 32.0), long_um / 4096)
        thumb, thumb_mpp = slide.thumbnail(mask_mpp)
        mask = tissue_mask(thumb, thumb_mpp, opts.min_area_mm2)
        view = thumb  # the picture's background: finer when the mask's is coarse
        if long_um / VIEW_SIDE < 0.8 * thumb_mpp:
            view, _ = slide.thumbnail(max(long_um / VIEW_SIDE, slide.mpp))
        outputs.write_png(view, folder / "thumbnail.png")
        outputs.write_png(mask.astype(np.uint8) * 255, folder / "mask.png")
        cells, boxes = grid.boxes()
        scale = thumb.shape[1] / slide.width  # thumbnail pixels per level-0 pixel
        frac = tile_fractions(mask, scale, boxes)
        keep = np.flatnonzero(frac >= opts.min_tissue)
        if not len(keep):
            raise SlideError(f"{path}: no tissue found ({mask.mean():.1%} of the thumbnail is "
                             f"tissue, no tile reaches --min-tissue {opts.min_tissue:g}); mask "
                             f"written to {folder / 'mask.png'}")
        cand = pd.DataFrame(np.concatenate([boxes[keep], cells[keep]], 1), columns=INFO[:6])
        cand["tissue"] = np.round(frac[keep], 4)
        empty = concat_scores([], len(clf.classes), len(clf.member_names))
        columns = INFO + list(score_frame(clf, empty, opts.refer_threshold).columns)
        with lock:
            probe = fingerprint(clf)
        record = {"slide": str(path.resolve()), "slide_size": [slide.width, slide.height],
                  "slide_mpp": slide.mpp, "resolution": res.to_dict(), "grid": grid.to_dict(),
                  "min_tissue": opts.min_tissue, "overlap": opts.overlap,
                  "min_area_mm2": opts.min_area_mm2, "refer_threshold": opts.refer_threshold,
                  "model": probe}
        done = resume(folder, record, columns, opts.restart)
        key = done["row"].astype(int) * grid.cols + done["col"].astype(int)
        todo = cand[~(cand["row"] * grid.cols + cand["col"]).isin(set(key))]
        todo = todo.reset_index(drop=True)
        if len(todo):  # an earlier summary no longer describes this folder
            (folder / "summary.json").unlink(missing_ok=True)
        t_score = time.perf_counter()
        bar = tqdm(total=len(cand), initial=len(cand) - len(todo), unit="tile", desc=path.stem,
                   disable=None if opts.progress else True)
        try:
            scored = _score(clf, slide, grid, todo, folder / "tiles.csv", opts, bar, on_progress,
                            len(cand) - len(todo), len(cand), lock) if len(todo) else 0
        finally:
            bar.close()
        score_s = time.perf_counter() - t_score
        frame = pd.read_csv(folder / "tiles.csv").drop_duplicates(["row", "col"])
        frame = frame.sort_values(["row", "col"]).reset_index(drop=True)
        p_mal = outputs.p_malignant(frame, list(clf.classes))
        summary = _finish(clf, slide, grid, res, res_source, frame, p_mal, mask, thumb_mpp,
                          view, folder, opts, lock)
    summary.update(resumed_tiles=int(len(cand) - len(todo)), scored_now=int(scored),
                   seconds=round(time.perf_counter() - start, 3),
                   tiles_per_s=round(scored / score_s, 2) if scored and score_s > 0 else None)
    outputs.write_json(summary, folder / "summary.json")
    return summary


def _finish(clf: Classifier, slide: Slide, grid: Grid, res: Resolution, res_source: str,
            frame: pd.DataFrame, p_mal: np.ndarray, mask: np.ndarray, thumb_mpp: float,
            view: np.ndarray, folder: Path, opts: SlideOptions, lock: Any
            ) -> dict[str, Any]:
    """Heat map, GeoJSON, top tiles and the summary's numbers (written but ``summary.json``)."""
    heat = outputs.heat_grid(frame, p_mal, grid)
    with outputs.atomic(folder / "heatmap.npy") as fh:
        np.save(fh, heat)
    polygons = outputs.regions(frame, p_mal, opts.threshold)
    outputs.write_geojson(frame, p_mal, polygons, slide.mpp, opts.threshold,
                          folder / "slide.geojson")
    v = outputs.verdict(frame, p_mal, opts.top_k, opts.threshold)
    top = v["top_k_mean_p_malignant"]
    title = (f"{slide.path.name}: {v['verdict']} (top-{opts.top_k} mean p(malignant) "
             f"{'n/a' if top is None else f'{top:.2f}'}; malignant "
             f"{v['malignant_fraction'] or 0:.0%} of scored tissue)")
    view_scale = view.shape[1] / slide.width  # picture pixels per level-0 pixel
    heatmap_figure(view, heat, grid, view_scale, polygons, title, opts.threshold,
                   slide.mpp / view_scale,
                   folder / "heatmap.png")
    if opts.explain_top:
        shutil.rmtree(folder / "top", ignore_errors=True)
        with lock:  # Grad-CAM hooks must not meet another thread's forward pass
            top_tiles(clf, slide, grid.level, frame, p_mal, opts.explain_top, folder / "top")
    described = clf.describe()
    t = float(getattr(clf, "temperature", 1.0))  # the one already in the probabilities
    members_t = [m.meta.get("temperature", 1.0) for m in getattr(clf, "members", [])]
    calibrated = (f"calibrated (temperature {t:.4g})" if t != 1.0 else
                  "members calibrated (their temperatures), the ensemble not" if
                  any(v != 1.0 for v in members_t) else
                  "uncalibrated (the model applies no temperature)")
    return {
        "slide": slide.path.name, "path": str(slide.path), "histoclass_version": __version__,
        "model": {"classes": list(clf.classes), "method": clf.method,
                  "members": clf.member_names, "backend": described.get("backend", "torch"),
                  "resolution": res.to_dict(), "resolution_source": res_source,
                  "probabilities": calibrated},
        "slide_info": slide.info(),
        "reading": {**grid.to_dict(), "level_mpp": slide.level_mpp(grid.level),
                    "overlap": opts.overlap, "batch_size": opts.batch_size},
        "tissue": {"method": METHOD.format(min_area=opts.min_area_mm2, mpp=thumb_mpp),
                   "area_mm2": round(float(mask.sum()) * thumb_mpp ** 2 / 1e6, 4),
                   "min_tissue": opts.min_tissue},
        "tiles": {"grid": grid.rows * grid.cols, "tissue": len(frame),
                  "skipped_background": int(grid.rows * grid.cols - len(frame))},
        **v, "threshold": opts.threshold, "malignant_regions": len(polygons),
        "options": {k: x for k, x in asdict(opts).items() if k != "progress"},
    }
