"""Many slides: expand files and folders, run each, and report the ones that could not be used.

A bad slide (not a slide, truncated, no tissue, no microns per pixel, ...) costs one line in
``OUT/skipped.csv`` and the log; the others still complete. ``OUT/slides.csv`` has one row per
finished slide.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from histoclass.models.classifier import Classifier
from histoclass.slides.reader import SlideError
from histoclass.slides.run import SlideOptions, model_resolution, predict_slide

log = logging.getLogger(__name__)
# What OpenSlide reads (a folder is searched for these; a file given by name is always tried).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                  ".svslide", ".bif", ".dcm")
COLUMNS = ("slide", "path", "verdict", "top_k_mean_p_malignant", "malignant_fraction",
           "tissue_area_mm2", "tiles_scored", "refer", "seconds")


def list_slides(folder: str | Path) -> list[str]:
    """Slide files under ``folder`` (recursively), as sorted POSIX paths relative to it;
    symbolic links that lead outside ``folder`` are left out."""
    root = Path(folder).resolve()
    found = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file():
            real = p.resolve()
            if real == root or root in real.parents:
                found.append(p.relative_to(root).as_posix())
    return found


def resolve_listed(folder: str | Path, name: str) -> Path:
    """The slide ``name`` from :func:`list_slides` of ``folder``; anything else is refused (the
    web app opens only the slides it was started with)."""
    if name not in list_slides(folder):
        raise SlideError(f"{name!r} is not a slide in the served folder")
    return Path(folder).resolve() / name


def expand_slides(items: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Slide files and folders (searched recursively by suffix) -> slide paths, and the inputs
    left out as ``(path, reason)``."""
    paths, skipped = [], []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found = [item / n for n in list_slides(item)]
            if not found:
                skipped.append((str(item), f"no slide files ({', '.join(SLIDE_SUFFIXES)})"))
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            skipped.append((str(item), "no such file or folder"))
    return paths, skipped


def predict_slides(clf: Classifier, slides: Sequence[str | Path], out: str | Path,
                   options: SlideOptions = SlideOptions()
                   ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """:func:`predict_slide` for each slide; writes ``OUT/slides.csv`` and, when some could not
    be used, ``OUT/skipped.csv`` (``path,reason``).

    Raises:
        ValueError: The model's resolution is unknown (no slide could be read at it).
    """
    from histoclass.data.manifest import write_manifest

    model_resolution(clf, options.model_mpp)  # a model problem is one error, not one per slide
    out = Path(out)
    paths, skipped = expand_slides(slides)
    summaries, stems = [], {}
    for path in paths:
        if path.stem in stems:
            skipped.append((str(path), f"another slide in this run, {stems[path.stem]}, has the "
                                       f"same name stem {path.stem!r} (one folder per stem)"))
            continue
        stems[path.stem] = str(path)
        try:
            summaries.append(predict_slide(clf, path, out, options))
        except (SlideError, OSError) as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            log.warning("skipped slide %s: %s", path, reason)
            skipped.append((str(path), reason))
    rows = [{"slide": s["slide"], "path": s["path"], "verdict": s["verdict"],
             "top_k_mean_p_malignant": s["top_k_mean_p_malignant"],
             "malignant_fraction": s["malignant_fraction"],
             "tissue_area_mm2": s["tissue"]["area_mm2"], "tiles_scored": s["tiles_scored"],
             "refer": int(s["refer"]), "seconds": s["seconds"]} for s in summaries]
    write_manifest(pd.DataFrame(rows, columns=list(COLUMNS)), out / "slides.csv")
    if skipped:
        write_manifest(pd.DataFrame(skipped, columns=["path", "reason"]), out / "skipped.csv")
    else:  # a list from an earlier run would name slides that are fine now
        (out / "skipped.csv").unlink(missing_ok=True)
    return summaries, skipped
