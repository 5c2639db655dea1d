"""Batch explanations: one figure and one full-resolution overlay per image, a CSV and an
``index.html`` gallery (no external resources) sortable by probability and correctness.

Outputs are named for what they are (``<stem>.cam.png``, ``<stem>.overlay.png``), and the folder
is marked as histoclass output (:func:`histoclass.data.files.mark_output`), so a later ``split``
or ``predict`` of it refuses it rather than taking figures for data. Unreadable images are
skipped, logged and listed by name in the gallery; the rest are processed.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoclass.explain.cam import METHODS, class_index, find_target_layer
from histoclass.explain.ensemble import explain_model
from histoclass.models.ensemble import Ensemble

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What a batch run wrote: one row per explained image, and the skipped files."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    gallery: Path | None = None


def _unique(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name


def explain_batch(ens: Ensemble, items: list[tuple[str, str]], out: str | Path, *,
                  method: str = "gradcam", target: str = "predicted", layer: str | None = None,
                  alpha: float | None = None, maps: bool = False,
                  skipped: Sequence[tuple[str, str]] = (), progress: bool = False
                  ) -> BatchResult:
    """Explain every image of ``items`` (``(path, true label or "")``) and write a gallery.

    Writes under ``out``: ``<name>.cam.png`` (field | heat map with colour bar | overlay, the
    prediction and the true label; an ensemble's fused map,
    :func:`~histoclass.explain.ensemble.explain_model`), for ensembles also
    ``<name>.members.cam.png`` (the study's grid of member overlays), ``<name>.overlay.png``
    (full resolution), with ``maps`` ``<name>.cam.npy`` (the fused map, float32 at full
    resolution), ``explanations.csv``, ``index.html`` and the output marker. ``alpha`` is the
    overlay's opacity where the map is 1 (default :data:`~histoclass.explain.figures.ALPHA`).
    ``skipped`` are inputs already left out (listed in the gallery with the rest).
    """
    import pandas as pd

    from histoclass.data.files import mark_output
    from histoclass.data.images import ImageLoadError, load_rgb, to_array
    from histoclass.explain.figures import (
        ALPHA,
        ensemble_figure,
        explanation_figure,
        save_figure,
        save_overlay,
    )

    alpha = ALPHA if alpha is None else alpha
    if method not in METHODS:  # settings errors fail now, not once per image below
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    for m in ens.members:
        find_target_layer(m.model, layer)
    classes = ens.classes
    class_index(target, classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "explain")
    result, used = BatchResult(skipped=list(skipped)), set()
    iterator: Any = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="explain", unit="img", disable=None)  # None: tty only
    for path, label in iterator:
        try:
            image = to_array(load_rgb(path))
        except ImageLoadError as exc:
            log.warning("skipped %s", exc)
            result.skipped.append((Path(path).name, exc.reason))
            continue
        title = Path(path).name
        try:
            e = explain_model(ens, image, method=method, target=target, layer=layer)
        except ValueError as exc:  # e.g. a stain normaliser refusing a blank image
            log.warning("skipped %s: %s", path, exc)
            result.skipped.append((title, str(exc)))
            continue
        name = _unique(Path(path).stem, used)
        save_figure(explanation_figure(image, e, title, alpha, label), out / f"{name}.cam.png")
        grid = ""
        if ens.is_ensemble:
            grid = f"{name}.members.cam.png"
            save_figure(ensemble_figure(image, e, title, alpha, label=label), out / grid)
        save_overlay(image, e.cam, out / f"{name}.overlay.png", alpha)
        if maps:
            np.save(out / f"{name}.cam.npy", e.cam.astype(np.float32))
        pred = e.pred
        row = {"path": str(path), "name": Path(path).name, "figure": f"{name}.cam.png",
               "members_figure": grid, "overlay": f"{name}.overlay.png",
               "map": f"{name}.cam.npy" if maps else "", "label": label,
               "pred": classes[pred],
               "p_pred": float(e.probs[pred]),
               "correct": "" if not label else ("yes" if label == classes[pred] else "no")}
        row.update({f"p_{c}": float(p) for c, p in zip(classes, e.probs, strict=True)})
        result.rows.append(row)
    pd.DataFrame(result.rows).to_csv(out / "explanations.csv", index=False)
    result.gallery = write_gallery(out, result.rows, result.skipped, classes,
                                   title=f"histoclass explain ({method})")
    return result


def written_files(out: str | Path, result: BatchResult) -> list[Path]:
    """Every file :func:`explain_batch` wrote for ``result``, in a stable order."""
    from histoclass.data.files import OUTPUT_MARKER

    out = Path(out)
    keys = ("figure", "members_figure", "overlay", "map")
    return [out / r[k] for r in result.rows for k in keys if r[k]] + [
        out / "explanations.csv", out / "index.html", out / OUTPUT_MARKER]


_ORDER = {"no": 0, "": 1, "yes": 2}  # misclassified first, then unlabelled, then correct

_SCRIPT = """
function sortBy(col, numeric) {
  const body = document.querySelector('#gallery tbody');
  const rows = Array.from(body.rows);
  const th = document.querySelectorAll('#gallery th')[col];
  const dir = th.dataset.dir === 'asc' ? -1 : 1;
  th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  rows.sort((a, b) => {
    let x = a.cells[col].dataset.key, y = b.cells[col].dataset.key;
    if (numeric) { x = parseFloat(x); y = parseFloat(y); }
    return (x < y ? -1 : x > y ? 1 : 0) * dir;
  });
  rows.forEach(r => body.appendChild(r));
}
"""


def write_gallery(out: str | Path, rows: list[dict[str, Any]], skipped: list[tuple[str, str]],
                  classes: list[str], title: str = "histoclass explain") -> Path:
    """Write ``index.html`` referencing the relative PNGs; misclassified images first.

    Click a column header to sort by it (again to reverse).
    """
    from histoclass.explain.figures import CMAP, MAP_NOTE

    out = Path(out)
    rows = sorted(rows, key=lambda r: (_ORDER[r["correct"]], -r["p_pred"], r["name"]))
    heads = [("overlay", False), ("file", False), ("true", False), ("predicted", False),
             ("p(predicted)", True)] + [(f"p({c})", True) for c in classes] + [("correct", True)]
    th = "".join(f'<th onclick="sortBy({i}, {str(num).lower()})">{html.escape(h)}</th>'
                 for i, (h, num) in enumerate(heads))
    body = []
    for r in rows:
        e = html.escape
        grid = (f'<br><a href="{e(r["members_figure"])}">members</a>'
                if r.get("members_figure") else "")
        cells = [  # width only: the thumbnail keeps the field's aspect ratio, never cropped
            (r["name"], f'<a href="{e(r["figure"])}"><img src="{e(r["overlay"])}" '
                        f'alt="{e(r["name"])}" width="240"></a>{grid}'),
            (r["name"], e(r["name"])), (r["label"], e(r["label"] or "?")),
            (r["pred"], e(r["pred"])), (f'{r["p_pred"]:.6f}', f'{r["p_pred"]:.3f}'),
            *[(f'{r[f"p_{c}"]:.6f}', f'{r[f"p_{c}"]:.3f}') for c in classes],
            (str(_ORDER[r["correct"]]), e(r["correct"] or "?")),
        ]
        cls = ' class="wrong"' if r["correct"] == "no" else ""
        body.append(f"<tr{cls}>" + "".join(f'<td data-key="{e(k)}">{v}</td>' for k, v in cells)
                    + "</tr>")
    wrong = sum(r["correct"] == "no" for r in rows)
    skip_html = ""
    if skipped:
        items = "".join(f"<li><code>{html.escape(n)}</code>: {html.escape(why)}</li>"
                        for n, why in skipped)
        skip_html = f'<h2>Skipped ({len(skipped)})</h2><ul id="skipped">{items}</ul>'
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px}} th{{cursor:pointer;background:#eee}}
tr.wrong{{background:#fdd}}</style>
<script>{_SCRIPT}</script></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} image(s) explained, {wrong} misclassified, {len(skipped)} skipped.
Click a column header to sort; click an overlay for its figure (field, heat map, overlay).</p>
<p>Colour map: {CMAP} (dark blue low, yellow high; {html.escape(MAP_NOTE)}). The overlay
tints only where the map is high (opacity = alpha &times; map), so unmarked tissue is the
field as scanned.</p>
<table id="gallery"><thead><tr>{th}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
{skip_html}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path

