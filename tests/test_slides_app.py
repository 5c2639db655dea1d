"""The web app's Slide tab: its handler, the served-folder rule, and a real headless browser."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openslide", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")
pytest.importorskip("shapely", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")

import histoclass
from histoclass.app import analyse_slide
from histoclass.slides.batch import list_slides
from histoclass.slides.outputs import overlay_of
from slide_helpers import canvas, sample_images, tiny_member, write_slide
from test_app import CHROMIUM, CHROMIUM_ARGS, _free_port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    imgs = sample_images(3)
    write_slide(root / "case7.tiff", canvas(1400, 1000, [(64, 64, imgs[1]), (640, 448, imgs[2])]))
    (root / "notes.txt").write_text("not a slide")
    outside = tmp_path_factory.mktemp("outside")
    write_slide(outside / "secret.tiff", canvas(300, 300, []))
    (root / "link.tiff").symlink_to(outside / "secret.tiff")  # leads out of the folder
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_member(tmp_path_factory.mktemp("m") / "m.pt")


def test_handler_scores_a_listed_slide_only(served, ckpt, tmp_path):
    assert list_slides(served) == ["case7.tiff"]
    model = histoclass.load(ckpt)
    text, heat, gallery, summary = analyse_slide("case7.tiff", 0.5, model, served, tmp_path)
    assert text.startswith("### case7.tiff\n**Verdict: ") and summary["slide"] == "case7.tiff"
    assert f"**Verdict: {summary['verdict'].upper()}**" in text
    assert heat.ndim == 3 and heat.shape[2] == 3
    assert len(gallery) == min(6, summary["tiles_scored"])
    assert all(path.endswith(".cam.png") for path, _ in gallery)
    folder = tmp_path / "case7"
    bare = np.asarray(__import__("PIL.Image").Image.open(folder / "thumbnail.png"))
    np.testing.assert_array_equal(overlay_of(folder, 0.0), bare)  # opacity 0: the thumbnail
    assert not np.array_equal(overlay_of(folder, 1.0), bare)
    for name in ("../outside/secret.tiff", "link.tiff", "notes.txt", "/etc/passwd"):
        text, heat, gallery, summary = analyse_slide(name, 0.5, model, served, tmp_path)
        assert "is not a slide in the served folder" in text and heat is None and not summary


@pytest.fixture(scope="module")
def server(ckpt, served, tmp_path_factory):
    pytest.importorskip("gradio", reason="the 'demo' extra (gradio) is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("srv") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(histoclass.__file__).parents[1]),
           "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "histoclass", "serve", str(ckpt),
                                 "--port", str(port), "--slides", str(served), "--slides-out",
                                 str(tmp_path_factory.mktemp("results"))],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after 120 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_browser_slide_tab_shows_heatmap_tiles_and_summary(server):
    if not CHROMIUM.exists():
        pytest.skip(f"BROWSER TEST SKIPPED: {CHROMIUM} missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="BROWSER TEST SKIPPED: playwright not installed")
    from playwright.sync_api import expect

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server)
        page.get_by_role("tab", name="Slide").click()
        page.locator("#slide-choice input").click()
        page.get_by_role("option", name="case7.tiff").click()
        page.locator("#slide-run").click()
        expect(page.locator("#slide-status")).to_contain_text("Verdict:", timeout=120_000)
        expect(page.locator("#slide-status")).to_contain_text("case7.tiff")
        heat = page.locator("#slide-heatmap img").first
        expect(heat).to_be_visible(timeout=30_000)
        page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                               arg=heat.element_handle(), timeout=30_000)
        assert page.locator("#slide-top img").count() >= 1
        expect(page.locator("#slide-summary")).to_contain_text("verdict_rule")
        before = heat.get_attribute("src")
        slider = page.locator("#slide-opacity input[type=range]")
        slider.fill("0.9")
        slider.dispatch_event("change")
        slider.dispatch_event("pointerup")
        page.wait_for_function("([el, s]) => el.src !== s", arg=[heat.element_handle(), before],
                               timeout=30_000)
        assert "Traceback" not in page.content()
        browser.close()
