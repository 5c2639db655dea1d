"""Whole slides: tiles at the model's resolution on tissue, exact tile coordinates, heat map,
GeoJSON, resume and torch/ONNX parity, on pyramidal TIFFs built from the bundled real H&E."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("openslide", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")
pytest.importorskip("shapely", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")

import histoclass
from histoclass.models import load_model_file
from histoclass.slides import Slide, SlideError, SlideOptions, predict_slide
from slide_helpers import canvas, sample_images, tiny_member, write_slide
from train_helpers import one_thread  # noqa: F401 (autouse fixture)

TILE = 64  # the model's field: 64 training pixels at 0.5 um/px, on a 0.5 um/px slide
W, H = 2000, 1536


@pytest.fixture(scope="module")
def placed():
    imgs = sample_images(6)  # BreakHis fields (700x460): all tissue, edge to edge
    return [(128, 128, imgs[0]), (1152, 192, imgs[2]), (320, 832, imgs[4]),
            (1500, 1000, imgs[5])]  # the last one runs off the slide's right edge


@pytest.fixture(scope="module")
def image(placed):
    return canvas(W, H, placed)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, image):
    return write_slide(tmp_path_factory.mktemp("slide") / "case1.tiff", image, mpp=0.5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_member(tmp_path_factory.mktemp("model") / "m.pt")


@pytest.fixture(scope="module")
def clf(ckpt):
    return load_model_file(ckpt)


@pytest.fixture(scope="module")
def run(clf, slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = predict_slide(clf, slide_path, out, SlideOptions(batch_size=16))
    return out / "case1", summary


def _overlap(placed, x, y, w, h):
    """Fraction of the box covered by placed images (clipped to the slide)."""
    cover = np.zeros((H, W), bool)
    for px, py, img in placed:
        cover[py:py + img.shape[0], px:px + img.shape[1]] = True
    box = np.zeros((H + h, W + w), bool)
    box[:H, :W] = cover
    return box[y:y + h, x:x + w].mean()


def test_tiles_on_tissue_not_on_glass(run, placed, image):
    folder, s = run
    tiles = pd.read_csv(folder / "tiles.csv")
    rows, cols = s["reading"]["grid"]
    assert (rows, cols) == (-(-H // TILE), -(-W // TILE))  # edge tiles cover the whole slide
    assert s["tiles"]["grid"] == rows * cols
    assert s["tiles"]["tissue"] == len(tiles) == s["tiles_scored"]
    assert s["tiles"]["skipped_background"] == rows * cols - len(tiles)
    assert (tiles[["width", "height"]] == TILE).all().all()
    assert s["reading"]["level"] == 0 and not s["reading"]["upsampled"]
    cover = {(r, c): _overlap(placed, c * TILE, r * TILE, TILE, TILE)
             for r in range(rows) for c in range(cols)}
    scored = set(zip(tiles["row"], tiles["col"], strict=True))
    assert all(cover[k] > 0 for k in scored), "a tile on bare glass was scored"
    # Tissue by a plain per-pixel rule on the full-resolution image: >= 75% coloured pixels.
    x = image.astype(np.float32) / 255
    coloured = np.pad((x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1e-6) > 0.05,
                      ((0, TILE), (0, TILE)))
    tissue = {k for k, v in cover.items() if v == 1.0 and coloured[
        k[0] * TILE:(k[0] + 1) * TILE, k[1] * TILE:(k[1] + 1) * TILE].mean() >= 0.75}
    assert len(tissue) > 150 and len(scored & tissue) >= 0.95 * len(tissue)
    area = sum(img.shape[0] * min(img.shape[1], W - x) for x, _, img in placed) * 0.25 / 1e6
    assert s["tissue"]["area_mm2"] == pytest.approx(area, rel=0.15)
    assert s["slide_info"]["mpp"] == 0.5 and s["slide_info"]["mpp_source"] == "slide"


def test_tile_coordinates_reread_the_classified_pixels(run, clf, slide_path, image):
    folder, _ = run
    tiles = pd.read_csv(folder / "tiles.csv")
    padded = np.full((H + TILE, W + TILE, 3), 255, np.uint8)
    padded[:H, :W] = image
    crops = []
    with Slide(slide_path) as slide:
        for t in tiles.itertuples():
            crop = slide.read(t.x, t.y, t.width, t.height, 0)
            assert np.array_equal(crop, padded[t.y:t.y + t.height, t.x:t.x + t.width])
            crops.append(crop)
    p = clf.predict_images(crops).proba[:, 1]
    np.testing.assert_allclose(p, tiles["p_malignant"], atol=1e-5)


def test_heatmap_cells_are_tile_probabilities(run):
    folder, s = run
    tiles = pd.read_csv(folder / "tiles.csv")
    heat = np.load(folder / "heatmap.npy")
    assert heat.shape == tuple(s["reading"]["grid"]) and heat.dtype == np.float32
    np.testing.assert_array_equal(heat[tiles["row"], tiles["col"]],
                                  tiles["p_malignant"].astype(np.float32))
    assert np.isfinite(heat).sum() == len(tiles)
    for name in ("heatmap.png", "mask.png", "thumbnail.png", "run.json"):
        assert (folder / name).stat().st_size > 0, name
    order = np.sort(tiles["p_malignant"].to_numpy())[::-1][:s["top_k"]]
    assert s["top_k_mean_p_malignant"] == pytest.approx(order.mean())
    assert s["verdict"] == ("malignant" if order.mean() >= 0.5 else "benign")


def test_geojson_tiles_and_merged_regions(run, clf, slide_path):
    folder, _ = run
    tiles = pd.read_csv(folder / "tiles.csv")
    threshold = float(tiles["p_malignant"].median())
    # Outputs only: the rerun resumes every tile and rescores none.
    s = predict_slide(clf, slide_path, folder.parent, SlideOptions(threshold=threshold))
    assert s["scored_now"] == 0 and s["resumed_tiles"] == len(tiles)
    geo = json.loads((folder / "slide.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    kinds = [f["properties"]["objectType"] for f in geo["features"]]
    feats = [f for f in geo["features"] if f["properties"]["objectType"] == "tile"]
    assert len(feats) == len(tiles) and kinds.count("annotation") == s["malignant_regions"] > 0
    by_id = {f["id"]: f for f in feats}
    for t in tiles.itertuples():
        f = by_id[f"tile-{t.row}-{t.col}"]
        ring = f["geometry"]["coordinates"][0]
        assert ring == [[t.x, t.y], [t.x + t.width, t.y], [t.x + t.width, t.y + t.height],
                        [t.x, t.y + t.height], [t.x, t.y]]
        assert f["properties"]["classification"]["name"] == t.pred
        assert f["properties"]["measurements"]["p_malignant"] == pytest.approx(t.p_malignant)
        assert f["properties"]["measurements"]["tissue"] == pytest.approx(t.tissue)
    import shapely

    regions = [shapely.geometry.shape(f["geometry"]) for f in geo["features"]
               if f["properties"]["objectType"] == "annotation"]
    hit = tiles["p_malignant"] >= threshold
    centres = np.c_[tiles["x"] + TILE / 2, tiles["y"] + TILE / 2]
    inside = np.zeros(len(tiles), bool)
    for r in regions:
        inside |= shapely.contains_xy(r, centres[:, 0], centres[:, 1])
    np.testing.assert_array_equal(inside, hit)
    area = sum(f["properties"]["measurements"]["area_mm2"] for f in geo["features"]
               if f["properties"]["objectType"] == "annotation")
    assert area == pytest.approx(hit.sum() * (TILE * 0.5) ** 2 / 1e6)
    assert s["malignant_fraction"] == pytest.approx(
        (tiles["tissue"] * hit).sum() / tiles["tissue"].sum())


def test_resume_after_interruption_gives_the_same_tiles(run, clf, slide_path, tmp_path):
    folder, _ = run
    full = pd.read_csv(folder / "tiles.csv").sort_values(["row", "col"]).reset_index(drop=True)

    def stop(done, total):
        if done >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_slide(clf, slide_path, tmp_path, SlideOptions(batch_size=16), on_progress=stop)
    part = tmp_path / "case1" / "tiles.csv"
    assert len(pd.read_csv(part)) == 32 and not (tmp_path / "case1" / "summary.json").exists()
    with open(part, "a") as fh:  # a write torn by a kill
        fh.write("1216,64,64,64,1,19,0.9")
    s = predict_slide(clf, slide_path, tmp_path, SlideOptions(batch_size=16))
    assert s["resumed_tiles"] == 32 and s["scored_now"] == len(full) - 32
    again = pd.read_csv(part).sort_values(["row", "col"]).reset_index(drop=True)
    assert list(again.columns) == list(full.columns)
    pd.testing.assert_frame_equal(again, full, check_exact=False, atol=1e-6)


def test_a_folder_of_another_run_is_refused(run, clf, slide_path):
    folder, _ = run
    with pytest.raises(SlideError, match=r"holds tiles of another run \(min_tissue\); pass "
                                         "--restart"):
        predict_slide(clf, slide_path, folder.parent, SlideOptions(min_tissue=0.9))
    other = load_model_file(tiny_member(folder.parent / "other.pt", seed=1))
    with pytest.raises(SlideError, match="model weights"):
        predict_slide(other, slide_path, folder.parent)


def test_onnx_backend_matches_torch(run, ckpt, slide_path, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from histoclass.deploy.export import export_onnx
    from histoclass.deploy.runtime import OnnxClassifier

    onnx = OnnxClassifier(export_onnx(ckpt, tmp_path / "m.onnx"))
    assert onnx.resolution == load_model_file(ckpt).resolution
    s = predict_slide(onnx, slide_path, tmp_path, SlideOptions(batch_size=16))
    assert s["model"]["backend"] == "onnx"
    # the tiny member carries no temperature, and the summary does not call it calibrated
    assert s["model"]["probabilities"] == "uncalibrated (the model applies no temperature)"
    a = pd.read_csv(run[0] / "tiles.csv").sort_values(["row", "col"]).reset_index(drop=True)
    b = pd.read_csv(tmp_path / "case1" / "tiles.csv").sort_values(["row", "col"])
    b = b.reset_index(drop=True)
    assert a[["x", "y", "width", "height"]].equals(b[["x", "y", "width", "height"]])
    np.testing.assert_allclose(a["p_malignant"], b["p_malignant"], atol=1e-4)


def test_api_predict_slide_and_top_tiles(ckpt, slide_path, tmp_path):
    model = histoclass.load(ckpt)
    s = model.predict_slide(slide_path, tmp_path, explain_top=2, batch_size=32)
    top = sorted((tmp_path / "case1" / "top").glob("*"))
    assert len(top) == 4 and sum(p.name.endswith(".cam.png") for p in top) == 2
    tiles = pd.read_csv(tmp_path / "case1" / "tiles.csv")
    best = tiles.loc[tiles["p_malignant"].idxmax()]
    assert top[0].name == f"01_x{best.x}_y{best.y}.cam.png"
    assert json.loads((tmp_path / "case1" / "summary.json").read_text()) == s


def test_killed_cli_run_resumes_to_the_same_tiles(run, ckpt, slide_path, tmp_path):
    """SIGKILL mid-run (no cleanup at all), then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    folder, _ = run
    full = pd.read_csv(folder / "tiles.csv").sort_values(["row", "col"]).reset_index(drop=True)
    cmd = [sys.executable, "-m", "histoclass", "slide", str(ckpt), str(slide_path), "--out",
           str(tmp_path), "--batch-size", "1", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(histoclass.__file__).parents[1])}
    tiles = tmp_path / "case1" / "tiles.csv"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if tiles.exists() and tiles.read_bytes().count(b"\n") > 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = tiles.read_bytes().count(b"\n") - 1
    assert 10 <= killed_at < len(full) and not (tmp_path / "case1" / "summary.json").exists()
    subprocess.run(cmd[:-4], env=env, check=True, capture_output=True)  # default batch size
    summary = json.loads((tmp_path / "case1" / "summary.json").read_text())
    assert summary["resumed_tiles"] >= 10 and summary["scored_now"] == len(full) - summary[
        "resumed_tiles"]
    again = pd.read_csv(tiles).sort_values(["row", "col"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(again, full, check_exact=False, atol=1e-6)
