"""The web demo's page: one Gradio ``Blocks`` with a tab per kind of input, and the server.

A leaf (only ``histoclass serve`` imports it). The model is loaded once; requests go through
Gradio's queue and the :class:`~histoclass.api.Model` lock, so concurrent users never share
state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from histoclass.api import Model, load
from histoclass.app.fields import (
    CSS,
    FONTS,
    MONO,
    UNCERTAIN_BAND,
    Limits,
    cam_available,
    fields_tab,
)

log = logging.getLogger(__name__)


def build(model: str | Path | Model, limits: Limits = Limits(), explain: bool = True,
          band: tuple[float, float] = UNCERTAIN_BAND, slides: str | Path | None = None,
          slides_out: str | Path | None = None) -> Any:
    """The Gradio ``Blocks`` app for ``model`` (loaded once, here): one page, one tab per kind
    of input; ``slides`` adds the Slide tab for the slide files in that folder, results in
    ``slides_out`` (default: a folder in the system's temporary directory)."""
    import gradio as gr

    clf = model if isinstance(model, Model) else load(model)
    kind = (f"ensemble of {len(clf.member_names)} ({', '.join(clf.member_names)})"
            if clf.is_ensemble else clf.member_names[0])
    why_not = cam_available(clf) if explain else "Heat maps are switched off on this server."
    with gr.Blocks(title="histoclass") as demo:
        gr.Markdown(
            "# histoclass: breast histopathology classifier\n"
            f"Model: **{kind}**, classes: {', '.join(clf.classes)} ({clf.backend}). Research "
            "use only: not a diagnosis. A result is **uncertain** (refer to a pathologist) when "
            f"p(malignant) is between {band[0]:.0%} and {band[1]:.0%}"
            + (f", or when the members disagree by more than {clf.refer_threshold:.2f}"
               if clf.is_ensemble else "")
            + f". Limits: {limits.max_mb:g} MB and {limits.max_pixels / 1e6:g} MP per image, "
            f"{limits.max_images} images per request." + (f" _{why_not}_" if why_not else ""),
            elem_id="about")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Fields of view", id="fields"):
                fields_tab(clf, limits, explain, band)
            if slides is not None:
                import tempfile

                from histoclass.app.slide import slide_tab

                slide_tab(clf, Path(slides), Path(slides_out or Path(tempfile.gettempdir())
                                                  / "histoclass-slides"))
    return demo


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 7860, *,
          limits: Limits = Limits(), concurrency: int = 2, explain: bool = True,
          slides: str | Path | None = None, slides_out: str | Path | None = None) -> None:
    """Build the app and serve it until interrupted."""
    import gradio as gr

    demo = build(model, limits, explain, slides=slides, slides_out=slides_out)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    log.info("serving %s on http://%s:%d", model, host, port)
    demo.launch(server_name=host, server_port=port, ssr_mode=False, show_error=False,
                quiet=True, max_file_size=int(4 * limits.max_mb * 1e6), footer_links=["api"],
                css=CSS.read_text(encoding="utf-8"),
                theme=gr.themes.Default(font=FONTS, font_mono=MONO))
