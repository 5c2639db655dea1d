"""A self-contained HTML report of an evaluation: one file, figures and thumbnails embedded as
base64 data URIs, inline CSS, no scripts, nothing fetched from anywhere."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from histoclass.data.splits import LEAK_NOTE
from histoclass.evaluate import Evaluation, metric_set, predicted, probabilities
from histoclass.metrics import METRICS, PATIENT_METRICS
from histoclass.report.calibration import calibration_section
from histoclass.report.parts import confusion_figure, fmt, roc_figure, table

log = logging.getLogger(__name__)

NOTES = {
    "binary": "Malignant is the positive class (recall = sensitivity).",
    "subtype": "Precision, recall, F1 and specificity are macro averages over the classes "
               "present; ROC-AUC is the one-vs-rest macro average.",
}

CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}
td{text-align:right}th{background:#eee}.leak{color:#b00;font-weight:bold;font-size:1.2em}
.figs img{max-width:380px;margin-right:1em}.gallery{display:flex;flex-wrap:wrap;gap:8px}
.tile{width:170px;font-size:11px;word-break:break-all}.missing{width:160px;height:120px;
background:#eee;display:flex;align-items:center;justify-content:center;text-align:center}"""


def metrics_table(ev: Evaluation) -> str:
    """Metric, value, patient-bootstrap 95% CI and, for k folds, mean +- std."""
    header = ["metric", "value", "95% CI (patient bootstrap)"]
    if ev.folds:
        header.append(f"mean ± std over {len(ev.folds['folds'])} folds")
    rows = []
    for key in METRICS:
        ci = ev.metrics["ci95"].get(key)
        value = fmt(ev.metrics[key])
        if key in PATIENT_METRICS and ev.meta.get("patient_note"):
            value = ev.meta["patient_note"]  # "n/a: no patient ids; pass --groups CSV"
        row = [f"<b>{key}</b>", html.escape(value),
               "n/a" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"]
        if ev.folds:
            row.append(f"{fmt(ev.folds['mean'][key])} ± {fmt(ev.folds['std'][key])}")
        rows.append(row)
    return table(header, rows)


def by_name_table(first: str, named: dict[str, dict]) -> str:
    """One row per name (magnification, member), one column per metric."""
    return table([first, *METRICS], [[f"<b>{html.escape(name)}</b>", *(fmt(m[k]) for k in METRICS)]
                                      for name, m in named.items()])


def _resolve(path: str, source: str) -> Path:
    """Relative image paths are relative to the predictions CSV, as in manifests."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(source).parent / p


def thumbnail(path: Path, size: int = 160) -> str:
    """An ``<img>`` with a base64 JPEG thumbnail, or a placeholder naming an unreadable file."""
    from histoclass.data.images import ImageLoadError, load_rgb

    try:
        img = load_rgb(path)
    except (ImageLoadError, OSError) as exc:
        log.debug("gallery: %s", exc)
        return f'<div class="missing">image unavailable: {html.escape(str(path))}</div>'
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def gallery(frame: pd.DataFrame, ev: Evaluation, limit: int = 24, size: int = 160) -> str:
    """The misclassified images, most confident mistakes first."""
    p = probabilities(frame, ev.task)
    pred = predicted(p, ev.threshold)
    conf = np.where(pred == 1, p, 1 - p) if p.ndim == 1 else p.max(axis=1)
    wrong = np.flatnonzero(pred != frame["y"].to_numpy())
    if len(wrong) == 0:
        return "<p>No misclassified images.</p>"
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:limit]
    tiles = []
    for i in order:
        row = frame.iloc[i]
        lines = [f"true {ev.task.classes[row['y']]}, predicted {ev.task.classes[pred[i]]} "
                 f"({conf[i]:.2f})", f"patient {row['patient_id']} {row['magnification']}",
                 Path(row["path"]).name]
        tiles.append(f'<div class="tile">{thumbnail(_resolve(row["path"], row["source"]), size)}'
                     f"<br>{'<br>'.join(html.escape(t) for t in lines)}</div>")
    missing = sum('class="missing"' in t for t in tiles)
    if missing:
        log.warning("gallery: %d of %d image(s) unavailable, shown as placeholders naming them",
                    missing, len(tiles))
    note = f" (the {limit} most confident of {len(wrong)})" if len(wrong) > limit else ""
    return f'<p>{len(order)} shown{note}.</p><div class="gallery">{"".join(tiles)}</div>'


def render(ev: Evaluation, limit: int = 24) -> str:
    """The report's HTML; the leakage warning, when due, is the first line of the body."""
    frame, task, meta = ev.frame, ev.task, ev.meta
    y, p = frame["y"].to_numpy(), probabilities(frame, task)
    pooled = metric_set(frame, task, ev.threshold)  # figures pool the folds; so do their titles
    decision = (f"malignant when P(malignant) >= {ev.threshold}" if task.kind == "binary"
                else "decision: the most probable class")
    parts = []
    if meta.get("leaks_patients"):
        parts.append(f'<p class="leak">WARNING: {html.escape(LEAK_NOTE)}</p>')
    if meta.get("errors"):
        parts.append(f'<p class="leak">{meta["errors"]} row(s) have no prediction (the model '
                     "gave a non-finite output): not scored, see their error column</p>")
    files = ", ".join(html.escape(f) for f in meta["files"])
    patients = meta.get("patient_note") or f"{meta['patients']} patients"
    cis = meta.get("ci_note") or (f"{meta['bootstrap']} patient bootstrap replicates, seed "
                                  f"{meta['seed']}")
    e = html.escape  # every value from data (class names come from CSV headers) is escaped
    parts += [
        "<h1>histoclass evaluation</h1>",
        f"<p>{e(task.kind)} task ({e(', '.join(task.classes))}); {meta['images']} images, "
        f"{e(patients)}; source: {e(meta.get('source', 'split ' + meta['split']))}; "
        f"{e(decision)}. Files: {files}</p>",
        f"<p>{NOTES[task.kind]} ECE: 15 equal-width bins of top-label confidence. Patient "
        "recognition rate: mean over patients of their share of images right; patient "
        "accuracy: one decision per patient from the mean probability.</p>",
        "<h2>Metrics</h2>", metrics_table(ev),
        f'<p class="ci">95% CIs: {e(cis)}. {e(meta.get("ci_rule", ""))}.</p>',
        '<div class="figs">',
        confusion_figure(y, predicted(p, ev.threshold), task.classes),
        roc_figure(y, p, task.classes, f"ROC (AUC {fmt(pooled['roc_auc'])})"), "</div>",
        *calibration_section(ev),
    ]
    if ev.metrics["per_magnification"]:
        parts += ["<h2>Per magnification</h2>",
                  by_name_table("magnification", ev.metrics["per_magnification"])]
    if ev.members:
        parts += ["<h2>Members and ensemble</h2>", "<p>All on the same (pooled) images.</p>",
                  by_name_table("model", ev.members)]
    if ev.referral:
        r = ev.referral
        parts += ["<h2>Referral</h2>",
                  f"<p>{r['referred']} of {r['images']} images referred "
                  f"({100 * r['referral_rate']:.1f}%); metrics on the images kept:</p>",
                  by_name_table("images kept", {"retained": r["retained"]})]
    parts += ["<h2>Misclassified images</h2>", gallery(frame, ev, limit)]
    title = "histoclass evaluation" + (" (patients leak)" if meta.get("leaks_patients") else "")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(ev: Evaluation, path: str | Path, limit: int = 24) -> Path:
    """Write ``render(ev)`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(ev, limit), encoding="utf-8")
    return path
