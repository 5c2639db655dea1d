"""The web demo: request handling, a live server under load, and a real headless browser."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import histoclass
from histoclass.app import DISPLAY_PX, Limits, analyse
from histoclass.data.manifest import sample_path
from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint
from histoclass.models import ensemble as ens
from test_api import make_member  # a checkpoint whose fixed head gives a known probability

SAMPLES = sorted(sample_path("breakhis").glob("*.png"))
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 2, pretrained=False)
    model.get_classifier().bias.data = torch.tensor([0.0, 2.0])  # clearly malignant
    meta = member_meta("test_efficientnet", "test_efficientnet", ["benign", "malignant"],
                       model_preprocess(model, 64))
    return save_checkpoint(tmp_path_factory.mktemp("app") / "m.pt", model, meta)


@pytest.fixture(scope="module")
def clf(ckpt):
    return histoclass.load(ckpt)


def test_answers_match_offline_predictions(clf):
    text, page, items = analyse([str(p) for p in SAMPLES[:2]], clf, Limits())
    for path, item in zip(SAMPLES[:2], items, strict=True):
        offline = clf.predict(path)[0]
        assert item["image"] == path.name and item["error"] is None
        assert item["probs"] == pytest.approx(offline.probs, abs=1e-5)
        assert item["verdict"] == offline.verdict
    assert page.count('data-verdict="malignant"') == 2  # one table row each, not uncertain
    assert page.count('class="hc-heat"') == 2 and "2 image(s): 2 malignant" in text


def test_bad_uploads_get_messages_not_traces(clf, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    _, page, items = analyse([str(notes), str(SAMPLES[0])], clf, Limits())
    assert items[0]["error"] == "not an image (unrecognised format)"
    assert "Could not analyse this file: not an image" in page and items[1]["error"] is None
    _, _, items = analyse([str(SAMPLES[0])], clf, Limits(max_mb=0.01))
    assert items[0]["error"].startswith("file too large:") and "limit 0.01 MB" in items[0]["error"]
    _, _, items = analyse([str(SAMPLES[0])], clf, Limits(max_pixels=10_000))
    assert items[0]["error"] == "image too large: 700x460 = 322000 pixels > limit 10000"
    text, _, items = analyse([str(p) for p in SAMPLES[:3]], clf, Limits(max_images=2))
    assert len(items) == 2 and "Only the first 2 of 3 images" in text
    text, page, items = analyse(None, clf, Limits())
    assert items == [] and page == "" and text.startswith("Upload")


def test_onnx_model_is_served_without_overlay(ckpt, clf, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from histoclass.app import cam_available
    from histoclass.deploy.export import export_onnx

    onnx_clf = histoclass.load(export_onnx(ckpt, tmp_path / "m.onnx"))
    _, page, items = analyse([str(SAMPLES[0])], onnx_clf, Limits())
    assert items[0]["probs"] == pytest.approx(clf.predict(SAMPLES[0])[0].probs, abs=1e-4)
    assert "hc-heat" not in page and "needs the PyTorch checkpoint" in cam_available(onnx_clf)
    assert f'data-verdict="{items[0]["verdict"]}"' in page


def test_uncertain_band_and_disagreement_refer_with_the_reason(tmp_path):
    near = histoclass.load(make_member(tmp_path / "near.pt", bias=[0.0, 0.1]))  # p = 0.525
    _, page, (item,) = analyse([str(SAMPLES[0])], near, Limits())
    assert item["p_malignant"] == pytest.approx(1 / (1 + math.exp(-0.1)), abs=1e-6)
    assert item["uncertain"] and item["refer"] and item["verdict"] == "malignant"
    assert item["why"] == "p(malignant) 52.5% is inside the uncertain band 35%\u201365%"
    assert 'data-verdict="uncertain"' in page and "leans malignant" in page
    sure = histoclass.load(make_member(tmp_path / "sure.pt", bias=[0.0, math.log(9.0)]))
    (item,) = analyse([str(SAMPLES[0])], sure, Limits())[2]
    assert not item["uncertain"] and item["why"].startswith("p(malignant) 90.0% is outside")
    # Members at 0.99 and 0.41: mean 0.70 is outside the band, but the spread 0.29 > 0.25.
    a = make_member(tmp_path / "a.pt", bias=[0.0, math.log(99.0)])
    b = make_member(tmp_path / "b.pt", bias=[0.0, math.log(41 / 59)])
    ens.Ensemble([ens.load_member(a, "a"), ens.load_member(b, "b")], "soft",
                 member_paths=[a, b]).save(tmp_path / "e.pt")
    (item,) = analyse([str(SAMPLES[0])], histoclass.load(tmp_path / "e.pt"), Limits(),
                      explain=False)[2]
    assert item["uncertain"] and item["members_disagree"]
    assert item["why"] == ("p(malignant) 70.0% is outside the uncertain band 35%\u201365%; "
                           "members disagree (spread 0.29 > 0.25)")
    # p = 0.90 is outside the band, but under a stated-risk threshold of 0.95: referred
    obj = torch.load(tmp_path / "sure.pt", weights_only=True)
    obj["meta"]["refer_risk"] = {"alpha": 0.05, "delta": 0.1, "threshold": 0.95}
    model = create_model("test_efficientnet", 2, pretrained=False)
    model.load_state_dict(obj["state_dict"])
    save_checkpoint(tmp_path / "risk.pt", model, obj["meta"])
    (item,) = analyse([str(SAMPLES[0])], histoclass.load(tmp_path / "risk.pt"), Limits(),
                      explain=False)[2]
    assert item["refer"] and item["why"] == ("p(malignant) 90.0% is outside the uncertain band "
                                             "35%\u201365%; low confidence 0.90 < 0.95 "
                                             "(stated-risk threshold)")


def _image(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_field_and_heat_map_keep_the_field_shape(clf, tmp_path):
    wide = tmp_path / "wide.png"
    Image.open(SAMPLES[0]).resize((2100, 460)).save(wide)  # longer than DISPLAY_PX
    _, page, _ = analyse([str(wide), str(SAMPLES[1])], clf, Limits())
    sizes = {}
    for cls, src, w, h in re.findall(r'<img class="(hc-field|hc-heat)" src="([^"]+)" '
                                     r'width="(\d+)" height="(\d+)"', page):
        img = _image(src)
        assert img.size == (int(w), int(h))
        sizes.setdefault(cls, []).append(img.size)
    assert sizes["hc-field"] == sizes["hc-heat"] == [(DISPLAY_PX, round(460 * DISPLAY_PX / 2100)),
                                                     (700, 460)]
    assert "the field, 2100 x 460 px" in page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: Path, log: Path):
    """``histoclass serve MODEL`` in a subprocess on a free loopback port; yields its URL."""
    pytest.importorskip("gradio", reason="the 'demo' extra (gradio) is not installed")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(histoclass.__file__).parents[1]),
           "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "histoclass", "serve", str(model),
                                 "--port", str(port), "--concurrency", "2"],
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


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    yield from _serve(ckpt, tmp_path_factory.mktemp("srv") / "server.log")


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory):
    """An ONNX export of a member whose fixed head gives p(malignant) = 0.525 for any image."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from histoclass.deploy.export import export_onnx

    root = tmp_path_factory.mktemp("onnx-srv")
    model = export_onnx(make_member(root / "near.pt", bias=[0.0, 0.1]), root / "near.onnx")
    yield from _serve(model, root / "server.log")


def test_concurrent_clients_get_their_own_answers(server, clf):
    from gradio_client import Client, handle_file

    images = SAMPLES + sorted(sample_path("ucsb").rglob("*.jpg"))[:4]
    offline = {p.name: clf.predict(p)[0].probs for p in images}
    jobs = [images[i % len(images)] for i in range(50)]

    def client_run(part: list[Path]) -> list[tuple[str, dict]]:
        client = Client(server, verbose=False, download_files=False)
        out = []
        for path in part:
            _, _, details = client.predict([handle_file(str(path))], api_name="/classify")
            out.append((path.name, details))
        return out

    with ThreadPoolExecutor(5) as pool:
        results = [r for part in pool.map(client_run, [jobs[i::5] for i in range(5)])
                   for r in part]
    assert len(results) == 50
    for name, details in results:
        assert len(details) == 1 and details[0]["image"] == name and details[0]["error"] is None
        assert details[0]["probs"] == pytest.approx(offline[name], abs=1e-5)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"BROWSER TEST SKIPPED: {CHROMIUM} missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="BROWSER TEST SKIPPED: playwright not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _upload(page, server: str, path: Path) -> None:
    from playwright.sync_api import expect

    page.goto(server)
    page.locator("#upload input[type=file]").set_input_files(str(path))
    # The name's stem and suffix render in separate elements: wait for the stem.
    expect(page.locator("#upload")).to_contain_text(path.stem, timeout=30_000)
    page.locator("#classify").click()


# Box of an element and of its parent (the heat map's stack, or the figure) in the page.
_GEOMETRY = """el => { const r = el.getBoundingClientRect(), f = el.closest('figure')
  .getBoundingClientRect(); return {w: r.width, h: r.height, nw: el.naturalWidth,
  nh: el.naturalHeight, left: r.left, right: r.right, top: r.top, bottom: r.bottom,
  fl: f.left, fr: f.right, ft: f.top, fb: f.bottom, fit: getComputedStyle(el).objectFit,
  page: document.documentElement.clientWidth}; }"""


def test_browser_shows_the_whole_field_beside_its_heat_map(server, browser, clf, tmp_path):
    from playwright.sync_api import expect

    image = tmp_path / SAMPLES[0].name
    shutil.copy(SAMPLES[0], image)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _upload(page, server, image)
    verdict = clf.predict(image)[0].verdict
    row = page.locator("#results details").first
    expect(row).to_contain_text(image.name, timeout=60_000)
    expect(row.locator(".hc-verdict")).to_contain_text(verdict)
    heat = page.locator("#results img.hc-heat").first
    expect(heat).to_be_visible(timeout=30_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                           arg=heat.element_handle(), timeout=30_000)
    for img in (heat, page.locator("#results img.hc-field").first):
        g = img.evaluate(_GEOMETRY)
        assert (g["nw"], g["nh"]) == (700, 460) and g["fit"] != "cover"
        assert g["w"] / g["h"] == pytest.approx(g["nw"] / g["nh"], rel=0.02)  # true aspect
        # Not clipped: the whole image lies inside its figure and inside the page.
        assert g["fl"] - 1 <= g["left"] and g["right"] <= g["fr"] + 1 and g["right"] <= g["page"]
        assert g["ft"] - 1 <= g["top"] and g["bottom"] <= g["fb"] + 1
    # The opacity slider reaches the heat map.
    page.locator("#opacity input[type=number]").fill("0.25")
    page.locator("#opacity input[type=number]").press("Enter")
    expect(heat).to_have_css("opacity", "0.25", timeout=10_000)
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    page.close()


def test_browser_onnx_page_marks_uncertain_and_has_no_empty_panel(onnx_server, browser,
                                                                   tmp_path):
    from playwright.sync_api import expect

    image = tmp_path / SAMPLES[0].name
    shutil.copy(SAMPLES[0], image)
    page = browser.new_page()
    _upload(page, onnx_server, image)
    row = page.locator("#results details").first
    expect(row.locator(".hc-verdict")).to_contain_text("uncertain", timeout=60_000)
    expect(row).to_contain_text("52.5% is inside the uncertain band 35%\u201365%")
    expect(page.locator("#about")).to_contain_text("between 35% and 65%")
    expect(page.locator("#about")).to_contain_text("needs the PyTorch checkpoint")
    assert page.locator("#heat-controls").is_hidden()  # no slider or colour bar for no map
    assert page.locator("#results img.hc-heat").count() == 0
    figures = page.locator("#results figure")
    assert figures.count() == 1  # the field alone: no empty heat-map panel
    img = figures.first.locator("img")
    page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                           arg=img.element_handle(), timeout=30_000)
    assert img.bounding_box()["width"] > 100
    page.close()


def test_browser_non_image_gets_a_message(server, browser, tmp_path):
    from playwright.sync_api import expect

    notes = tmp_path / "notes.txt"
    notes.write_text("certainly not an H&E image")
    page = browser.new_page()
    _upload(page, server, notes)
    expect(page.locator("#results")).to_contain_text(
        "Could not analyse this file: not an image (unrecognised format)", timeout=60_000)
    assert "Traceback" not in page.content()
    assert np.isclose(page.locator("#results img").count(), 0)
    page.close()
