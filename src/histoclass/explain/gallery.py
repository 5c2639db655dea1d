"""Batch explanations: one figure and one full-resolution overlay per image, a CSV and an
``index.html`` gallery (no external resources) sortable by probability and correctness.

Unreadable images are skipped, logged and listed by name in the gallery; the rest are processed.
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
                  alpha: float = 0.4, maps: bool = False,
                  skipped: Sequence[tuple[str, str]] = (), progress: bool = False
                  ) -> BatchResult:
    """Explain every image of ``items`` (``(path, true label or "")``) and write a gallery.

    A lone member gives the three-panel figure; an ensemble the study's grid and the fused
    overlay (:func:`~histoclass.explain.ensemble.explain_model`). Writes ``<name>.png``
    (figure), ``<name>.overlay.png`` (full resolution), with ``maps`` ``<name>.cam.npy`` (the
    fused map, float32 at full resolution), ``explanations.csv`` and ``index.html`` under
    ``out``. ``skipped`` are inputs already left out (listed in the gallery with the rest).
    """
    import pandas as pd

    from histoclass.data.images import ImageLoadError, load_rgb, to_array
    from histoclass.explain.figures import (
        ensemble_figure,
        explanation_figure,
        save_figure,
        save_overlay,
    )

    if method not in METHODS:  # settings errors fail now, not once per image below
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    for m in ens.members:
        find_target_layer(m.model, layer)
    classes = ens.classes
    class_index(target, classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result, used = BatchResult(skipped=list(skipped)), set()
    iterator: Any = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="explain", unit="img")
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
        fig = (ensemble_figure(image, e, title, alpha) if ens.is_ensemble
               else explanation_figure(image, e, title, alpha))
        name = _unique(Path(path).stem, used)
        save_figure(fig, out / f"{name}.png")
        save_overlay(image, e.cam, out / f"{name}.overlay.png", alpha)
        if maps:
            np.save(out / f"{name}.cam.npy", e.cam.astype(np.float32))
        pred = e.pred
        row = {"path": str(path), "name": Path(path).name, "figure": f"{name}.png",
               "overlay": f"{name}.overlay.png", "label": label, "pred": classes[pred],
               "p_pred": float(e.probs[pred]),
               "correct": "" if not label else ("yes" if label == classes[pred] else "no")}
        row.update({f"p_{c}": float(p) for c, p in zip(classes, e.probs, strict=True)})
        result.rows.append(row)
    pd.DataFrame(result.rows).to_csv(out / "explanations.csv", index=False)
    result.gallery = write_gallery(out, result.rows, result.skipped, classes,
                                   title=f"histoclass explain ({method})")
    return result


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
    out = Path(out)
    rows = sorted(rows, key=lambda r: (_ORDER[r["correct"]], -r["p_pred"], r["name"]))
    heads = [("overlay", False), ("file", False), ("true", False), ("predicted", False),
             ("p(predicted)", True)] + [(f"p({c})", True) for c in classes] + [("correct", True)]
    th = "".join(f'<th onclick="sortBy({i}, {str(num).lower()})">{html.escape(h)}</th>'
                 for i, (h, num) in enumerate(heads))
    body = []
    for r in rows:
        e = html.escape
        cells = [
            (r["name"], f'<a href="{e(r["figure"])}"><img src="{e(r["overlay"])}" '
                        f'alt="{e(r["name"])}" width="240"></a>'),
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
Click a column header to sort.</p>
<table id="gallery"><thead><tr>{th}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
{skip_html}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path

