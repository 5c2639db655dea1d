"""The web demo: upload H&E images, get the verdict, member votes and a Grad-CAM overlay.

A leaf module (only ``histoclass serve`` imports it). The model is loaded once; requests go
through Gradio's queue and the :class:`~histoclass.api.Model` lock, so concurrent users
never share state: every request builds its answer from its own files only. Bad uploads
(not an image, corrupt, too many megabytes or pixels) get a one-line message, never a trace.
"""

from __future__ import annotations

import html
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoclass.api import Model, Prediction, load, to_rgb_image
from histoclass.data.images import ImageLoadError

log = logging.getLogger(__name__)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline, private by default


@dataclass(frozen=True)
class Limits:
    """What one request may upload."""

    max_mb: float = 20.0
    max_pixels: int = 25_000_000
    max_images: int = 16


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def describe(pred: Prediction, clf: Model) -> dict[str, Any]:
    """One image's answer as plain JSON (the API output the load test compares)."""
    out: dict[str, Any] = {"image": Path(pred.source).name, "error": pred.error}
    if pred.ok:
        out.update(verdict=pred.verdict, p_malignant=pred.p_malignant, label=pred.label,
                   probs=pred.probs)
        if clf.is_ensemble:
            out.update(members=pred.members, disagreement=pred.disagreement, refer=pred.refer)
    return out


def verdict_markdown(item: dict[str, Any], clf: Model) -> str:
    """A short human-readable block for one image."""
    name = html.escape(item["image"])
    if item["error"]:
        return f"### {name}\n**Could not analyse this file:** {html.escape(item['error'])}"
    lines = [f"### {name}",
             f"**Verdict: {item['verdict'].upper()}** — p(malignant) = {_pct(item['p_malignant'])}"]
    if clf.task == "subtype":
        lines.append(f"Subtype: **{item['label'].replace('_', ' ')}** "
                     f"({_pct(item['probs'][item['label']])})")
    if clf.is_ensemble:
        votes = ", ".join(f"{n}: {_pct(_p_mal(p))}" for n, p in item["members"].items())
        lines.append(f"Members p(malignant): {votes}")
        flag = ("**members disagree: refer to a pathologist**" if item["refer"]
                else "members agree")
        lines.append(f"Disagreement {item['disagreement']:.3f} "
                     f"(threshold {clf.refer_threshold:.2f}): {flag}")
    return "\n\n".join(lines)


def _p_mal(probs: dict[str, float]) -> float:
    return Prediction("", probs).p_malignant or 0.0


def check_upload(path: str, limits: Limits) -> None:
    """Refuse an upload over the size limit before decoding it."""
    size = Path(path).stat().st_size
    if size > limits.max_mb * 1e6:
        raise ImageLoadError(path, f"file too large: {size / 1e6:.1f} MB > limit "
                                   f"{limits.max_mb:g} MB")


def analyse(files: list[Any] | None, clf: Model, limits: Limits, explain: bool = True
            ) -> tuple[str, list[tuple[np.ndarray, str]], list[dict[str, Any]]]:
    """Everything the page shows for one request: markdown, overlays with captions, JSON."""
    paths = [str(getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        return "Upload one or more H&E images (PNG, JPEG, TIFF).", [], []
    notes = []
    if len(paths) > limits.max_images:
        notes.append(f"Only the first {limits.max_images} of {len(paths)} images were analysed "
                     f"(limit {limits.max_images} per request).")
        paths = paths[:limits.max_images]
    items, gallery = [], []
    explain = explain and cam_available(clf) is None
    for path in paths:
        try:
            check_upload(path, limits)
            img = to_rgb_image(path, limits.max_pixels)
            if explain:
                e = clf.explain(img, max_pixels=limits.max_pixels)
                pred, over = e.prediction, e.overlay
            else:
                pred, over = clf.predict(img, max_pixels=limits.max_pixels)[0], None
            pred.source = path
        except (ImageLoadError, ValueError) as exc:
            pred, over = Prediction(path, error=getattr(exc, "reason", str(exc))), None
        except Exception:  # never show a stack trace to the user; keep it in the log
            log.exception("failed on %s", path)
            pred, over = Prediction(path, error="internal error while analysing this image "
                                                "(see the server log)"), None
        item = describe(pred, clf)
        items.append(item)
        if over is not None:
            gallery.append((over, f"{item['image']}: {item['verdict']} "
                                  f"({_pct(item['p_malignant'])} malignant)"))
    text = "\n\n".join(notes + [verdict_markdown(i, clf) for i in items])
    return text, gallery, items


def cam_available(clf: Model) -> str | None:
    """``None`` when Grad-CAM overlays can be shown, else why not."""
    if clf.backend != "torch":
        return "Grad-CAM needs the PyTorch checkpoint; this server runs an ONNX export."
    return None


def examples() -> list[list[list[str]]]:
    """Example inputs from the bundled BreakHis sample."""
    from histoclass.data.manifest import sample_path

    return [[[str(p)]] for p in sorted(sample_path("breakhis").glob("*.png"))[:4]]


def analyse_slide(name: str | None, alpha: float, clf: Model, slides: Path, out: Path,
                  progress: Any = None) -> tuple[str, Any, list[tuple[str, str]], dict]:
    """The Slide tab's answer: markdown, heat map over the thumbnail, top tiles, summary.

    Only names listed from ``slides`` (the folder given at start) are opened; the run resumes
    from ``out`` when the slide was analysed before.
    """
    from histoclass.slides import SlideError
    from histoclass.slides.batch import resolve_listed
    from histoclass.slides.outputs import overlay_of

    if not name:
        return "Choose a slide.", None, [], {}
    try:
        path = resolve_listed(slides, name)
        report = None if progress is None else (lambda d, t: progress((d, t), unit="tiles"))
        s = clf.predict_slide(path, out, on_progress=report, explain_top=6)
    except (SlideError, ValueError, OSError) as exc:
        return f"**Could not analyse {html.escape(name)}:** {html.escape(str(exc))}", None, [], {}
    except Exception:  # never a stack trace on the page; keep it in the log
        log.exception("failed on slide %s", name)
        return (f"**Could not analyse {html.escape(name)}:** internal error (see the server "
                "log)"), None, [], {}
    folder = out / path.stem
    top = sorted(p for p in (folder / "top").glob("*.png") if not p.name.endswith(".cam.png"))
    gallery = [(str(p.with_suffix(".cam.png")) if p.with_suffix(".cam.png").exists()
                else str(p), p.stem) for p in top]
    text = (f"### {html.escape(s['slide'])}\n**Verdict: {str(s['verdict']).upper()}** "
            f"(mean p(malignant) of the top {s['top_k']} tiles "
            f"{_num(s['top_k_mean_p_malignant'])}; {s['tiles_scored']} tissue tiles, "
            f"{s['tissue']['area_mm2']:.2f} mm^2)" + (" — **refer to a pathologist**: "
                                                      + "; ".join(s["refer_reasons"])
                                                      if s["refer"] else "")
            + f"\n\nRule: {s['verdict_rule']}.")
    return text, overlay_of(folder, alpha), gallery, s


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def slide_tab(clf: Model, slides: Path, out: Path) -> None:
    """The ``Slide`` tab (inside ``build``'s Blocks): slides from the folder given at start."""
    import gradio as gr

    from histoclass.slides import list_slides
    from histoclass.slides.outputs import overlay_of

    def overlay(name: str | None, alpha: float) -> Any:
        from histoclass.slides.batch import resolve_listed

        try:
            return overlay_of(out / resolve_listed(slides, name or "").stem, alpha)
        except (ValueError, OSError):  # not analysed yet
            return None

    with gr.Tab("Slide", elem_id="slide-tab"):
        names = list_slides(slides)
        gr.Markdown(f"Whole slides from the served folder ({len(names)} found). Scoring is "
                    "tile by tile at the model's resolution and resumes where it stopped.")
        with gr.Row():
            with gr.Column(scale=1):
                choice = gr.Dropdown(names, label="Slide", elem_id="slide-choice")
                run = gr.Button("Analyse slide", variant="primary", elem_id="slide-run")
                alpha = gr.Slider(0, 1, 0.5, step=0.05, label="Heat-map opacity",
                                  elem_id="slide-opacity")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="slide-status")
                heat = gr.Image(label="p(malignant) over the thumbnail", format="png",
                                interactive=False, elem_id="slide-heatmap")
                top = gr.Gallery(label="Most malignant tiles (Grad-CAM with PyTorch models)",
                                 columns=3, format="png", elem_id="slide-top")
                summary = gr.JSON(label="Summary", elem_id="slide-summary")

        def go(name: str | None, a: float, progress: Any = gr.Progress()) -> Any:
            return analyse_slide(name, a, clf, slides, out, progress)

        run.click(go, [choice, alpha], [status, heat, top, summary], api_name="slide")
        alpha.release(overlay, [choice, alpha], [heat], api_name="slide_overlay")


def build(model: str | Path | Model, limits: Limits = Limits(), explain: bool = True,
          slides: str | Path | None = None, slides_out: str | Path | None = None) -> Any:
    """The Gradio ``Blocks`` app for ``model`` (loaded once, here); ``slides`` adds the Slide
    tab for the slide files in that folder, results in ``slides_out`` (default: a folder in the
    system's temporary directory)."""
    import gradio as gr

    clf = model if isinstance(model, Model) else load(model)
    kind = (f"ensemble of {len(clf.member_names)} ({', '.join(clf.member_names)})"
            if clf.is_ensemble else clf.member_names[0])
    with gr.Blocks(title="histoclass") as demo:
        gr.Markdown(
            "# histoclass: breast histopathology classifier\n"
            f"Model: **{kind}**, classes: {', '.join(clf.classes)} ({clf.backend}). "
            "Upload H&E images (BreakHis-like fields of view). Research use only: not a "
            f"diagnosis. Limits: {limits.max_mb:g} MB and {limits.max_pixels / 1e6:g} MP per "
            f"image, {limits.max_images} images per request."
            + (f" _{cam_available(clf)}_" if explain and cam_available(clf) else ""))
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(file_count="multiple", label="Images", elem_id="upload")
                run = gr.Button("Classify", variant="primary", elem_id="classify")
                gr.Examples(examples(), inputs=[files], label="Sample H&E images")
            with gr.Column(scale=2):
                verdict = gr.Markdown(elem_id="verdict")
                overlays = gr.Gallery(label="Grad-CAM (fused over members for ensembles)",
                                      elem_id="overlays", columns=2, format="png")
                details = gr.JSON(label="Details", elem_id="details")
        run.click(lambda f: analyse(f, clf, limits, explain), inputs=[files],
                  outputs=[verdict, overlays, details], api_name="classify")
        if slides is not None:
            import tempfile

            slide_tab(clf, Path(slides), Path(slides_out or Path(tempfile.gettempdir())
                                              / "histoclass-slides"))
    return demo


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 7860, *,
          limits: Limits = Limits(), concurrency: int = 2, explain: bool = True,
          slides: str | Path | None = None, slides_out: str | Path | None = None) -> None:
    """Build the app and serve it until interrupted."""
    demo = build(model, limits, explain, slides, slides_out)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    log.info("serving %s on http://%s:%d", model, host, port)
    demo.launch(server_name=host, server_port=port, ssr_mode=False, show_error=False,
                quiet=True, max_file_size=int(4 * limits.max_mb * 1e6), footer_links=["api"])
