"""The web demo: request handling, a live server under load, and a real headless browser."""

from __future__ import annotations

import os
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

import histoclass
from histoclass.app import Limits, analyse
from histoclass.data.manifest import sample_path
from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint

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
    text, gallery, items = analyse([str(p) for p in SAMPLES[:2]], clf, Limits())
    for path, item in zip(SAMPLES[:2], items, strict=True):
        offline = clf.predict(path)[0]
        assert item["image"] == path.name and item["error"] is None
        assert item["probs"] == pytest.approx(offline.probs, abs=1e-5)
        assert item["verdict"] == offline.verdict
    assert text.count("**Verdict: MALIGNANT**") == 2
    assert len(gallery) == 2


def test_bad_uploads_get_messages_not_traces(clf, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    text, _, items = analyse([str(notes), str(SAMPLES[0])], clf, Limits())
    assert items[0]["error"] == "not an image (unrecognised format)"
    assert "**Could not analyse this file:** not an image" in text and items[1]["error"] is None
    _, _, items = analyse([str(SAMPLES[0])], clf, Limits(max_mb=0.01))
    assert items[0]["error"].startswith("file too large:") and "limit 0.01 MB" in items[0]["error"]
    _, _, items = analyse([str(SAMPLES[0])], clf, Limits(max_pixels=10_000))
    assert items[0]["error"] == "image too large: 700x460 = 322000 pixels > limit 10000"
    text, _, items = analyse([str(p) for p in SAMPLES[:3]], clf, Limits(max_images=2))
    assert len(items) == 2 and "Only the first 2 of 3 images" in text
    text, gallery, items = analyse(None, clf, Limits())
    assert items == [] and gallery == [] and text.startswith("Upload")


def test_onnx_model_is_served_without_overlay(ckpt, clf, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from histoclass.app import cam_available
    from histoclass.deploy.export import export_onnx

    onnx_clf = histoclass.load(export_onnx(ckpt, tmp_path / "m.onnx"))
    text, gallery, items = analyse([str(SAMPLES[0])], onnx_clf, Limits())
    assert items[0]["probs"] == pytest.approx(clf.predict(SAMPLES[0])[0].probs, abs=1e-4)
    assert gallery == [] and "needs the PyTorch checkpoint" in cam_available(onnx_clf)
    assert f"**Verdict: {items[0]['verdict'].upper()}**" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """``histoclass serve`` in a subprocess on a free loopback port; yields its URL."""
    pytest.importorskip("gradio", reason="the 'demo' extra (gradio) is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("srv") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(histoclass.__file__).parents[1]),
           "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "histoclass", "serve", str(ckpt),
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


def test_browser_shows_verdict_and_overlay(server, browser, clf, tmp_path):
    from playwright.sync_api import expect

    image = tmp_path / SAMPLES[0].name
    shutil.copy(SAMPLES[0], image)
    page = browser.new_page()
    _upload(page, server, image)
    verdict = clf.predict(image)[0].verdict.upper()
    expect(page.locator("#verdict")).to_contain_text(f"Verdict: {verdict}", timeout=60_000)
    expect(page.locator("#verdict")).to_contain_text(image.name)
    img = page.locator("#overlays img").first
    expect(img).to_be_visible(timeout=30_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                           timeout=30_000)
    assert img.evaluate("el => el.naturalWidth") > 0
    page.close()


def test_browser_non_image_gets_a_message(server, browser, tmp_path):
    from playwright.sync_api import expect

    notes = tmp_path / "notes.txt"
    notes.write_text("certainly not an H&E image")
    page = browser.new_page()
    _upload(page, server, notes)
    expect(page.locator("#verdict")).to_contain_text(
        "Could not analyse this file: not an image (unrecognised format)", timeout=60_000)
    assert "Traceback" not in page.content()
    assert np.isclose(page.locator("#overlays img").count(), 0)
    page.close()
