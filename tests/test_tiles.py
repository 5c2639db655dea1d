"""--input tiles end to end: training stores the mode, predict averages tile probabilities,
ensembles mix input modes, ONNX matches PyTorch and Grad-CAM is stitched over the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.data.field_tiles import field_tiles
from histoclass.data.images import load_rgb
from histoclass.models import load_model_file, read_checkpoint
from histoclass.models.tiles import reduce_logits
from histoclass.predict import predict_paths
from histoclass.train import TrainConfig, train
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A test_efficientnet member trained on 700x460 fields with 224 tiles (12 per field)."""
    root = tmp_path_factory.mktemp("fields")
    manifest = synthetic_manifest(root, n_train=4, n_val=2, n_test=2, size=(700, 460))
    torch.set_num_threads(1)
    result = CliRunner().invoke(app, [
        "train", str(manifest), "--out", str(root / "run"), "--model", "test_efficientnet",
        "--no-pretrained", "--input", "tiles", "--image-size", "224", "--epochs", "1",
        "--batch-size", "2", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    paths = sorted(str(p) for p in (root / "images").glob("*.png"))
    return root / "run" / "best.pt", manifest, paths


def test_training_stores_the_input_mode(run):
    meta = read_checkpoint(run[0])["meta"]
    assert meta["input"] == {"mode": "tiles", "size": 224, "stride": 224,
                             "edge": "shift-inward, reflect-pad if smaller"}
    assert meta["preprocess"]["input_size"] == [224, 224]
    hist = pd.read_csv(run[0].parent / "history.csv")
    assert np.isfinite(hist["val_loss"]).all()


def test_predict_is_the_mean_of_tile_probabilities(run):
    best, _, paths = run
    ens = load_model_file(best)
    m = ens.members[0]
    pred = predict_paths(ens, paths[:3], batch_size=2).frame
    for i, path in enumerate(paths[:3]):
        tiles = field_tiles(np.asarray(load_rgb(path)), 224)
        assert tiles.shape == (12, 224, 224, 3)
        x = torch.stack([m.preprocess.normalize(t) for t in tiles])
        with torch.no_grad():  # mean tile probability, then the member's temperature
            p = (m.model(x).softmax(-1).mean(0).log() / m.meta["temperature"]).softmax(-1)
        assert pred["p_malignant"][i] == pytest.approx(float(p[1]), abs=1e-5)
    # the returned logits are log(mean p): softmax gives the mean back, temperature-ready
    z = torch.tensor([[0.0, 2.0], [1.0, -1.0], [3.0, 3.0]])
    out = reduce_logits(z, torch.tensor([2, 1]))
    expect = torch.stack([z[:2].softmax(-1).mean(0), z[2].softmax(-1)])
    torch.testing.assert_close(out.softmax(-1), expect)
    torch.testing.assert_close(reduce_logits(z, torch.tensor([2, 1]), "linear"),
                               torch.stack([z[:2].mean(0), z[2]]))


def test_tta_and_a_mixed_ensemble_give_each_member_its_own_input(run, tmp_path):
    best, manifest, paths = run
    cfg = TrainConfig(str(manifest), str(tmp_path / "r"), model="test_efficientnet",
                      pretrained=False, epochs=1, batch_size=4, image_size=64, workers=0,
                      device="cpu")
    resized = train(cfg)
    assert read_checkpoint(resized)["meta"]["input"]["mode"] == "resize"
    from histoclass.models.ensemble import ensemble_of, load_member

    ens = ensemble_of([load_member(best), load_member(resized)], [best, resized])
    both = ens.predict_images([load_rgb(p) for p in paths[:3]])
    for k, f in enumerate((best, resized)):
        alone = load_model_file(f).predict_images([load_rgb(p) for p in paths[:3]])
        np.testing.assert_allclose(both.members[k], alone.proba, atol=1e-6)
    tta = load_model_file(best).predict_images([load_rgb(paths[0])], tta=True)
    assert tta.proba.shape == (1, 2) and np.isclose(tta.proba.sum(), 1.0)


def test_onnx_export_tiles_the_same_way(run, tmp_path):
    from histoclass.deploy.export import export_onnx, parity
    from histoclass.deploy.runtime import OnnxClassifier

    best, _, paths = run
    out = export_onnx(best, tmp_path / "m.onnx")
    clf = OnnxClassifier(out)
    assert clf.input_mode.tiles and clf.input_mode.size == 224 and clf.reduce == "mean-prob"
    worst, same = parity(best, out, paths[:4])
    assert worst < 1e-4 and same == 4


def test_cam_of_a_tiles_member_is_stitched_at_the_field_size(run):
    from histoclass.explain import explain_model

    best, _, paths = run
    ens = load_model_file(best)
    img = np.asarray(load_rgb(paths[0]))
    e = explain_model(ens, img)
    assert e.cam.shape == (460, 700)
    assert e.cam.min() >= 0.0 and e.cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(e.probs, ens.predict_images([img]).proba[0], atol=1e-6)


def test_tile_stride_needs_tiles():
    with pytest.raises(ValueError, match="--tile-stride 100: needs --input tiles"):
        TrainConfig("m.csv", "out", tile_stride=100).check()
    with pytest.raises(ValueError, match="--input 'crop': choose one of resize, tiles"):
        TrainConfig("m.csv", "out", input="crop").check()


def test_a_slide_is_read_at_a_tiles_members_native_resolution(tmp_path):
    pytest.importorskip("openslide", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")
    from histoclass.models import read_checkpoint as read
    from histoclass.models.checkpoint import atomic_save
    from histoclass.slides import Slide, SlideOptions, predict_slide
    from slide_helpers import canvas, sample_images, tiny_member, write_slide

    ckpt = tiny_member(tmp_path / "m.pt", train_mpp=0.5, field=(140, 92), size=64)
    obj = read(ckpt)
    obj["meta"]["input"] = {"mode": "tiles", "size": 64, "stride": 64, "edge": ""}
    atomic_save(obj, ckpt)
    clf = load_model_file(ckpt)
    imgs = sample_images(3)
    image = canvas(1600, 1200, [(128, 128, imgs[0]), (800, 600, imgs[2])])
    path = write_slide(tmp_path / "s.tiff", image, mpp=0.5)
    summary = predict_slide(clf, path, tmp_path / "out", SlideOptions(batch_size=4))
    reading = summary["reading"]  # read at 0.5 um/px, level 0: native pixels, no upsampling
    assert reading["level"] == 0 and not reading["upsampled"] and reading["level_mpp"] == 0.5
    tiles = pd.read_csv(tmp_path / "out" / "s" / "tiles.csv")
    assert (tiles["width"] == 140).all() and (tiles["height"] == 92).all()
    with Slide(path) as slide:
        crops = [slide.read(t.x, t.y, t.width, t.height, 0) for t in tiles.itertuples()]
    np.testing.assert_allclose(clf.predict_images(crops).proba[:, 1], tiles["p_malignant"],
                               atol=1e-5)
