"""The web page's tab for fields of view: upload H&E fields, read a table of verdicts, open a
field to see it beside its Grad-CAM heat map.

Every request builds its answer from its own files only. Bad uploads
(not an image, corrupt, too many megabytes or pixels) get a one-line message, never a trace.

One row per image (name, verdict, p(malignant), refer, why) opens onto the whole field and its
heat map side by side at the field's aspect ratio (never cropped), under one opacity slider and
a colour bar. A result is *uncertain*, and referred, when p(malignant) lies in
:data:`UNCERTAIN_BAND`, the members disagree beyond the referral threshold, or its confidence is
under the model's stated-risk threshold (``train --refer-risk``); the row says which. System
fonts only, so the page renders the same offline.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoclass.api import Model, Prediction
from histoclass.calibration import referral
from histoclass.data.images import ImageLoadError, to_rgb_image

log = logging.getLogger(__name__)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline, private by default

UNCERTAIN_BAND = (0.35, 0.65)  # p(malignant) in here: the model does not know; refer
DISPLAY_PX = 1024  # longest side of the field as sent to the browser
FONTS = ["system-ui", "Segoe UI", "Roboto", "Helvetica Neue", "DejaVu Sans", "Liberation Sans",
         "Arial", "sans-serif"]  # installed fonts only: no web font to miss offline
MONO = ["ui-monospace", "Menlo", "Consolas", "DejaVu Sans Mono", "Liberation Mono", "monospace"]
CSS = Path(__file__).with_name("app.css")  # the table and the fields
_OPACITY_JS = ("(a) => { document.documentElement.style.setProperty('--cam-opacity', a); "
               "return []; }")


@dataclass(frozen=True)
class Limits:
    """What one request may upload."""

    max_mb: float = 20.0
    max_pixels: int = 25_000_000
    max_images: int = 16


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def judge(pred: Prediction, clf: Model, band: tuple[float, float] = UNCERTAIN_BAND
          ) -> tuple[bool, str]:
    """Whether to refer ``pred`` to a pathologist (it is uncertain), and why, in words."""
    p, (lo, hi) = pred.p_malignant or 0.0, band
    inside = lo <= p <= hi
    why = [f"p(malignant) {_pct(p)} is {'inside' if inside else 'outside'} the uncertain band "
           f"{lo:.0%}\u2013{hi:.0%}"]
    disagree = clf.is_ensemble and pred.disagreement is not None and \
        pred.disagreement > clf.refer_threshold
    if clf.is_ensemble and pred.disagreement is not None:
        sign = ">" if disagree else "\u2264"
        why.append(f"members {'disagree' if disagree else 'agree'} (spread "
                   f"{pred.disagreement:.2f} {sign} {clf.refer_threshold:.2f})")
    # the model's stated-risk rule (train --refer-risk), when it has one
    low = getattr(clf.classifier, "confidence_threshold", None)
    below, reason = referral([max(pred.probs.values())], low)
    if below[0]:
        why.append(f"{reason[0]} (stated-risk threshold)")
    return inside or pred.refer or bool(below[0]), "; ".join(why)


def describe(pred: Prediction, clf: Model, band: tuple[float, float] = UNCERTAIN_BAND
             ) -> dict[str, Any]:
    """One image's answer as plain JSON (the API output the load test compares)."""
    out: dict[str, Any] = {"image": Path(pred.source).name, "error": pred.error}
    if pred.ok:
        uncertain, why = judge(pred, clf, band)
        out.update(verdict=pred.verdict, p_malignant=pred.p_malignant, label=pred.label,
                   probs=pred.probs, uncertain=uncertain, refer=uncertain, why=why)
        if clf.is_ensemble:
            out.update(members=pred.members, disagreement=pred.disagreement,
                       members_disagree=pred.disagreement > clf.refer_threshold)
    return out


def _data_url(array: np.ndarray, fmt: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else
                                             {"compress_level": 1}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _display(img: np.ndarray, cam: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The field (and map) at most :data:`DISPLAY_PX` on the longest side, same size."""
    from PIL import Image

    scale = DISPLAY_PX / max(img.shape[:2])
    if scale >= 1:
        return img, cam
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    small = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
    return small, None if cam is None else np.asarray(
        Image.fromarray(cam.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


def field_html(item: dict[str, Any], clf: Model, img: np.ndarray | None,
               cam: np.ndarray | None, target: str | None, open_: bool = False) -> str:
    """One table row that opens onto the field and, when there is a map, its heat map."""
    e = html.escape
    name = e(item["image"])
    if item["error"]:
        return (f'<details class="hc-item hc-error" data-verdict="error"><summary class="hc-row">'
                f'<span class="hc-name">{name}</span><span>could not analyse</span><span>-</span>'
                f'<span>-</span><span class="hc-why">{e(item["error"])}</span></summary>'
                f'<p class="hc-note">Could not analyse this file: {e(item["error"])}</p></details>')
    verdict = item["verdict"]
    shown = f"uncertain<br><small>leans {verdict}</small>" if item["uncertain"] else verdict
    if clf.task == "subtype":
        shown += f"<br><small>{e(item['label'].replace('_', ' '))} " \
                 f"{_pct(item['probs'][item['label']])}</small>"
    row = (f'<summary class="hc-row"><span class="hc-name">{name}</span>'
           f'<span class="hc-verdict">{shown}</span>'
           f'<span data-label="p(malignant)">{_pct(item["p_malignant"])}</span>'
           f'<span data-label="refer">{"yes" if item["refer"] else "no"}</span>'
           f'<span class="hc-why">{e(item["why"])}</span></summary>')
    body = ""
    if img is not None:
        h, w = img.shape[:2]
        small, cam = _display(img, cam)
        sh, sw = small.shape[:2]
        field = _data_url(small, "JPEG")
        body = (f'<figure><img class="hc-field" src="{field}" width="{sw}" height="{sh}" '
                f'alt="{name}"><figcaption>the field, {w} x {h} px</figcaption></figure>')
        if cam is not None:
            from histoclass.explain.figures import heat_rgba

            heat = _data_url(heat_rgba(cam), "PNG")
            body += (f'<figure><div class="hc-stack"><img class="hc-base" src="{field}" '
                     f'width="{sw}" height="{sh}" alt=""><img class="hc-heat" src="{heat}" '
                     f'width="{sw}" height="{sh}" alt="Grad-CAM heat map of {name}"></div>'
                     f'<figcaption>Grad-CAM: what points to {e(target or verdict)}'
                     f'{" (fused over members)" if clf.is_ensemble else ""}</figcaption></figure>')
        body = f'<div class="hc-pair">{body}</div>'
    if clf.is_ensemble:
        votes = ", ".join(f"{e(n)} {_pct(Prediction('', p).p_malignant or 0.0)}"
                          for n, p in item["members"].items())
        body += f'<p class="hc-note">Members p(malignant): {votes}.</p>'
    shown_as = "uncertain" if item["uncertain"] else verdict
    return (f'<details class="hc-item hc-{shown_as}" data-verdict="{shown_as}"'
            f'{" open" if open_ else ""}>{row}{body}</details>')


def results_html(rows: list[str]) -> str:
    """The table: a header row, then one expandable row per image (nothing for no rows)."""
    head = ('<div class="hc-row hc-head"><span>image</span><span>verdict</span>'
            '<span>p(malignant)</span><span>refer</span><span>why</span></div>')
    return f'<div class="hc-table">{head}{"".join(rows)}</div>' if rows else ""


def check_upload(path: str, limits: Limits) -> None:
    """Refuse an upload over the size limit before decoding it."""
    size = Path(path).stat().st_size
    if size > limits.max_mb * 1e6:
        raise ImageLoadError(path, f"file too large: {size / 1e6:.1f} MB > limit "
                                   f"{limits.max_mb:g} MB")


def analyse(files: list[Any] | None, clf: Model, limits: Limits, explain: bool = True,
            band: tuple[float, float] = UNCERTAIN_BAND) -> tuple[str, str, list[dict[str, Any]]]:
    """Everything the page shows for one request: a note, the results table (HTML), JSON."""
    paths = [str(getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        return "Upload one or more H&E images (PNG, JPEG, TIFF).", "", []
    notes = []
    if len(paths) > limits.max_images:
        notes.append(f"Only the first {limits.max_images} of {len(paths)} images were analysed "
                     f"(limit {limits.max_images} per request).")
        paths = paths[:limits.max_images]
    items, rows = [], []
    explain = explain and cam_available(clf) is None
    for path in paths:
        img = cam = target = None
        try:
            check_upload(path, limits)
            img = np.asarray(to_rgb_image(path, limits.max_pixels))
            if explain:
                ex = clf.explain(img, max_pixels=limits.max_pixels)
                pred, cam, target = ex.prediction, ex.cam, ex.target
            else:
                pred = clf.predict(img, max_pixels=limits.max_pixels)[0]
            pred.source = path
        except (ImageLoadError, ValueError) as exc:
            pred = Prediction(path, error=getattr(exc, "reason", str(exc)))
        except Exception:  # never show a stack trace to the user; keep it in the log
            log.exception("failed on %s", path)
            pred = Prediction(path, error="internal error while analysing this image "
                                          "(see the server log)")
        item = describe(pred, clf, band)
        items.append(item)
        rows.append(field_html(item, clf, img if pred.ok else None, cam, target,
                               open_=len(rows) == 0))
    ok = [i for i in items if not i["error"]]
    counts = [f"{sum(i['verdict'] == v and not i['uncertain'] for i in ok)} {v}"
              for v in ("malignant", "benign")]
    notes.append(f"{len(items)} image(s): {', '.join(counts)}, "
                 f"{sum(i['uncertain'] for i in ok)} uncertain (refer), "
                 f"{len(items) - len(ok)} unreadable. Click a row to open or close it.")
    return "\n\n".join(notes), results_html(rows), items


def cam_available(clf: Model) -> str | None:
    """``None`` when Grad-CAM heat maps can be shown, else why not."""
    if clf.backend != "torch":
        return "Grad-CAM needs the PyTorch checkpoint; this server runs an ONNX export."
    return None


def examples() -> list[list[list[str]]]:
    """Example inputs from the bundled BreakHis sample."""
    from histoclass.data.manifest import sample_path

    return [[[str(p)]] for p in sorted(sample_path("breakhis").glob("*.png"))[:4]]


def colorbar_html() -> str:
    """The heat map's colour bar, in the colour map of the figures."""
    from histoclass.explain.figures import css_gradient

    return (f'<div class="hc-bar" style="background:{css_gradient()}"></div>'
            '<div class="hc-ticks"><span>0: no influence (transparent)</span>'
            '<span class="hc-mid">0.5</span><span>1: this image\'s strongest region</span></div>')


def fields_tab(clf: Model, limits: Limits, explain: bool, band: tuple[float, float]) -> None:
    """The tab for fields of view: upload, table of verdicts, fields with their heat maps."""
    import gradio as gr

    cam = explain and cam_available(clf) is None
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            files = gr.File(file_count="multiple", label="Images", elem_id="upload")
            run = gr.Button("Classify", variant="primary", elem_id="classify")
            gr.Examples(examples(), inputs=[files], label="Sample H&E fields (BreakHis)")
        with gr.Column(scale=3):
            with gr.Row(visible=cam, elem_id="heat-controls"):
                opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Heat-map opacity",
                                    elem_id="opacity", scale=1)
                gr.HTML(colorbar_html(), elem_id="colorbar", label="Colour bar", scale=2)
            note = gr.Markdown(elem_id="note")
            results = gr.HTML(elem_id="results", js_on_load=None)
            with gr.Accordion("Details (JSON)", open=False):
                details = gr.JSON(elem_id="details")
    opacity.input(None, inputs=[opacity], outputs=None, js=_OPACITY_JS)
    run.click(lambda f: analyse(f, clf, limits, explain, band), inputs=[files],
              outputs=[note, results, details], api_name="classify")
