"""The web demo's ``Slide`` tab: whole slides from the folder given at start (``serve MODEL
--slides DIR``), never an arbitrary server path.

The heat map over the thumbnail with an opacity slider, the most malignant tiles with their
Grad-CAM, and the slide's summary; a run resumes from its output folder.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from histoclass.api import Model

log = logging.getLogger(__name__)


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
