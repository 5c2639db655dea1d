"""Whole slides, the inputs around them: levels and microns per pixel, the model's resolution
(training, ensembles, ONNX), tissue detection, and every kind of bad slide."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

pytest.importorskip("openslide", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")
pytest.importorskip("shapely", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")

from histoclass.cli import app
from histoclass.data.breakhis import MPP
from histoclass.models import Ensemble, load_member, load_model_file
from histoclass.models.resolution import Resolution
from histoclass.slides import (
    Slide,
    SlideError,
    SlideOptions,
    model_resolution,
    predict_slide,
    predict_slides,
)
from histoclass.slides.tissue import otsu, tile_fractions, tissue_mask
from slide_helpers import (
    canvas,
    sample_images,
    tiny_member,
    write_slide,
    write_sparse_slide,
)
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def tissue_image():
    imgs = sample_images(3)
    return canvas(1400, 1000, [(64, 64, imgs[1]), (640, 448, imgs[2])])


@pytest.fixture(scope="module")
def good(tmp_path_factory, tissue_image):
    return write_slide(tmp_path_factory.mktemp("good") / "good.tiff", tissue_image, mpp=0.5)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return load_model_file(tiny_member(tmp_path_factory.mktemp("m") / "m.pt"))


def test_level_choice_never_upsamples_silently(tmp_path, tissue_image, caplog):
    path = write_slide(tmp_path / "s.tiff", tissue_image, mpp=0.25, levels=4)
    with Slide(path) as s:
        assert [round(s.level_mpp(i), 3) for i in range(4)] == [0.25, 0.5, 1.0, 2.0]
        assert s.level_for(0.6) == (1, False)  # nearest above, then resized down
        assert s.level_for(0.5) == (1, False) and s.level_for(2.5) == (3, False)
        assert s.level_for(0.2) == (0, True)
    # A BreakHis 40X field (700x460 px at 0.4924 um/px) on a 0.25 um/px slide, 64 px input.
    m = load_model_file(tiny_member(tmp_path / "m.pt", MPP["40X"], (700, 460)))
    sm = predict_slide(m, path, tmp_path / "out", SlideOptions(min_tissue=0.2))
    assert sm["reading"]["tile_level0"] == [round(700 * 0.4924 / 0.25), round(460 * 0.4924 / 0.25)]
    assert sm["reading"]["level"] == 3 and not sm["reading"]["upsampled"]  # needs 3.5 um/px
    fine = load_model_file(tiny_member(tmp_path / "f.pt", 0.05, (64, 64)))
    with caplog.at_level(logging.WARNING):
        up = predict_slide(fine, path, tmp_path / "out2", SlideOptions(min_tissue=0.01))
    assert up["reading"]["upsampled"] and "tiles are upsampled" in caplog.text


def test_mpp_from_the_slide_or_the_user(tmp_path, tissue_image):
    path = write_slide(tmp_path / "nompp.tiff", tissue_image, mpp=None)
    with pytest.raises(SlideError, match=r"nompp.tiff: the slide records no microns per pixel; "
                                         r"pass --mpp"):
        Slide(path)
    with Slide(path, mpp=0.5) as s:
        assert (s.mpp, s.mpp_source) == (0.5, "--mpp")


def test_model_resolution_recorded_or_required(tmp_path, clf):
    res, source = model_resolution(clf)
    assert res == Resolution(0.5, (64, 64)) and source == "model"
    bare = load_model_file(tiny_member(tmp_path / "bare.pt", train_mpp=None))
    with pytest.raises(ValueError, match="records no training resolution; pass --model-mpp"):
        model_resolution(bare)
    assert model_resolution(bare, 0.25) == (Resolution(0.25, (64, 64)), "--model-mpp")
    a = load_member(tiny_member(tmp_path / "a.pt", 0.5, (64, 64)), "a")
    b = load_member(tiny_member(tmp_path / "b.pt", 0.25, (64, 64)), "b")
    assert Ensemble([a, a._replace(name="a2")]).resolution == Resolution(0.5, (64, 64))
    with pytest.raises(ValueError, match=r"members disagree on resolution: a 0.5 um/px"):
        _ = Ensemble([a, b]).resolution
    c = load_member(tmp_path / "bare.pt", "c")
    with pytest.raises(ValueError, match=r"member\(s\) c record no training resolution"):
        _ = Ensemble([a, c]).resolution


def test_training_records_its_resolution(tmp_path):
    from histoclass.models import read_checkpoint
    from histoclass.train import TrainConfig, train

    manifest = synthetic_manifest(tmp_path / "data", n_train=4, n_val=2, n_test=0)
    base = {"model": "test_efficientnet", "pretrained": False, "epochs": 1, "batch_size": 4,
            "image_size": 64, "workers": 0, "device": "cpu", "cache_dir": None}
    meta = read_checkpoint(train(TrainConfig(str(manifest), str(tmp_path / "a"),
                                             **base)))["meta"]
    assert meta["train_mpp"] == MPP["40X"] == 0.4924 and meta["train_field"] == [96, 72]
    meta = read_checkpoint(train(TrainConfig(str(manifest), str(tmp_path / "b"), train_mpp=0.3,
                                             **base)))["meta"]
    assert meta["train_mpp"] == 0.3
    frame = pd.read_csv(manifest)
    frame.loc[frame.index[::2], "magnification"] = "400X"
    frame.to_csv(manifest, index=False)
    meta = read_checkpoint(train(TrainConfig(str(manifest), str(tmp_path / "c"),
                                             **base)))["meta"]
    assert meta["train_mpp"] is None  # two magnifications: no one resolution
    with pytest.raises(ValueError, match=r"--train-mpp -1\.0: microns per pixel must be > 0"):
        TrainConfig(str(manifest), str(tmp_path / "d"), train_mpp=-1.0).check()


def test_otsu_and_tissue_mask_on_known_shapes():
    values = np.r_[np.full(500, 0.1), np.full(500, 0.7)]
    assert 0.1 < otsu(values) <= 0.7
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(245, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    img[40:140, 60:220] = np.clip(rng.normal((200, 110, 170), 12, (100, 160, 3)), 0, 255)
    img[170:173, 10:13] = (120, 40, 120)  # a speck of 9 px, below the minimum area
    mask = tissue_mask(img, mpp=8.0, min_area_mm2=0.01)  # 0.01 mm^2 = 156 px at 8 um/px
    truth, near = np.zeros(mask.shape, bool), np.zeros(mask.shape, bool)
    truth[40:140, 60:220], near[39:141, 59:221] = True, True  # the 3x3 averaging: 1 px
    assert mask[truth].all() and not mask[~near].any()
    assert not tissue_mask(np.full((50, 60, 3), 250, np.uint8), 8.0).any()
    boxes = np.array([[0, 0, 100, 100], [100, 0, 100, 100], [50, 0, 100, 100], [590, 0, 20, 20]])
    frac = tile_fractions(np.tile([[True] * 100 + [False] * 100], (100, 1)), 1.0, boxes)
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.5, 0.0])  # beyond the slide is glass


def _bad_slides(tmp_path, tissue_image):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a slide")
    trunc = write_slide(tmp_path / "trunc.tiff", tissue_image, mpp=0.5)
    data = trunc.read_bytes()
    trunc.write_bytes(data[:len(data) // 3])
    blank = write_slide(tmp_path / "blank.tiff", np.full((800, 900, 3), 250, np.uint8), mpp=0.5)
    nompp = write_slide(tmp_path / "nompp.tiff", tissue_image, mpp=None)
    return {"notes": notes, "trunc": trunc, "blank": blank, "nompp": nompp}


def test_bad_slides_get_one_line_and_the_rest_complete(tmp_path, good, clf, tissue_image):
    bad = _bad_slides(tmp_path, tissue_image)
    summaries, skipped = predict_slides(clf, [bad["notes"], good, bad["trunc"], bad["blank"],
                                              bad["nompp"], tmp_path / "missing.svs"],
                                        tmp_path / "out")
    assert [s["slide"] for s in summaries] == ["good.tiff"]
    reasons = dict(skipped)
    assert reasons[str(bad["notes"])] == ("not a slide OpenSlide can read (unsupported format "
                                          "or not a slide file)")
    assert reasons[str(bad["trunc"])] == ("a TIFF file OpenSlide cannot open (truncated, "
                                          "corrupt, or not tiled)")
    assert reasons[str(bad["blank"])].startswith("no tissue found")
    assert reasons[str(bad["nompp"])].startswith("the slide records no microns per pixel")
    assert reasons[str(tmp_path / "missing.svs")] == "no such file or folder"
    listed = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert sorted(listed["path"]) == sorted(reasons)
    assert len(pd.read_csv(tmp_path / "out" / "slides.csv")) == 1


def test_truncated_slide_read_error_names_the_file(tmp_path, tissue_image, clf):
    # Zero the tile data in place, keeping the header and directories: the slide opens and
    # the first read of a tile fails.
    path = write_slide(tmp_path / "corrupt.tiff", tissue_image, mpp=0.5)
    data = bytearray(path.read_bytes())
    data[4096:len(data) // 2] = b"\x00" * (len(data) // 2 - 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError, match=r"corrupt.tiff: cannot read level \d at \(\d+, \d+\): "):
        predict_slide(clf, path, tmp_path / "out")


def test_enormous_slide_runs_on_its_tissue_only(tmp_path, clf):
    """60000 x 60000 pixels (3.6 gigapixels; 14 GB as RGBA) with tissue in two 512-px tiles."""
    imgs = sample_images(3)
    blocks = {(40, 30): imgs[1][:512, :512] if imgs[1].shape[0] >= 512 else np.pad(
        imgs[1], ((0, 512 - imgs[1].shape[0]), (0, 0), (0, 0)), constant_values=255)[:, :512],
        (41, 30): np.pad(imgs[2], ((0, 52), (0, 0), (0, 0)), constant_values=255)[:512, :512]}
    path = write_sparse_slide(tmp_path / "huge.tiff", 60000, 60000, blocks, levels=8)
    s = predict_slide(clf, path, tmp_path / "out", SlideOptions(batch_size=32))
    tiles = pd.read_csv(tmp_path / "out" / "huge" / "tiles.csv")
    assert s["slide_info"]["width"] == 60000 and s["tiles"]["grid"] == 938 * 938
    assert tiles["x"].between(40 * 512 - 64, 42 * 512).all()
    assert tiles["y"].between(30 * 512 - 64, 31 * 512).all()
    assert 0 < len(tiles) <= 2 * (512 // 64 + 1) ** 2
    flat = write_sparse_slide(tmp_path / "flat.tiff", 60000, 60000, blocks, levels=1)
    with pytest.raises(SlideError, match=r"flat.tiff: no pyramid level coarse enough"):
        predict_slide(clf, flat, tmp_path / "out")


def test_cli_slide_reports_written_files_and_skips(tmp_path, good, tissue_image):
    ckpt = tiny_member(tmp_path / "m.pt")
    bad = _bad_slides(tmp_path, tissue_image)
    r = CliRunner().invoke(app, ["slide", str(ckpt), str(good), str(bad["notes"]), "--out",
                                 str(tmp_path / "out"), "--batch-size", "32"])
    assert r.exit_code == 0, r.output
    assert "good.tiff: " in r.output and "slide.geojson" in r.output
    assert f"{bad['notes']}: not a slide OpenSlide can read" in r.output
    assert (tmp_path / "out" / "good" / "heatmap.png").is_file()
    bare = tiny_member(tmp_path / "bare.pt", train_mpp=None)
    r = CliRunner().invoke(app, ["slide", str(bare), str(good), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "records no training resolution; pass --model-mpp" in r.output
    r = CliRunner().invoke(app, ["slide", str(bare), str(good), "--out", str(tmp_path / "o3"),
                                 "--model-mpp", "0.5", "--backend", "torch"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["slide", str(ckpt), str(bad["blank"]), "--out",
                                 str(tmp_path / "o4")])
    assert r.exit_code == 1 and "no slide could be scored" in r.output
