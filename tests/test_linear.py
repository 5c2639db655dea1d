"""Linear probes (`train --head linear`): the fold into timm's classifier, the feature cache,
and a linear member used everywhere an ordinary member is."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.models import read_checkpoint
from histoclass.train import TrainConfig, train
from histoclass.train.probe import C_GRID, fit_probe, fold_probe, probe_logits
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

BASE = {"pretrained": False, "batch_size": 8, "image_size": 64, "workers": 0, "device": "cpu",
        "cache_dir": None, "head": "linear"}
VIT = {"model": "test_vit", "model_args": {"dynamic_img_size": True}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return synthetic_manifest(tmp_path_factory.mktemp("lin"), n_train=12, n_val=6, n_test=4)


def probe(manifest: Path, out: Path, cache: Path, **kw) -> Path:
    cfg = {**BASE, "model": "test_efficientnet", "feature_cache": str(cache), **kw}
    return train(TrainConfig(str(manifest), str(out), **cfg))


@pytest.fixture(scope="module")
def members(manifest, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("members")
    return {"eff": probe(manifest, root / "eff", root / "cache"),
            "vit": probe(manifest, root / "vit", root / "cache", **VIT)}


def images(manifest: Path, split: str = "test") -> list[str]:
    frame = pd.read_csv(manifest)
    return frame.loc[frame["split"] == split, "path"].tolist()


def test_binary_fold_is_the_logistic_by_hand():
    # coef 2, intercept 1 on x standardised by mean 1, scale 2: z(x) = 2 (x - 1) / 2 + 1 = x.
    layer = nn.Linear(1, 2).double()
    fold_probe(layer, np.array([[2.0]]), np.array([1.0]), np.array([1.0]), np.array([2.0]))
    assert layer.weight.squeeze(1).tolist() == [-0.5, 0.5]
    assert layer.bias.tolist() == [-0.0, 0.0]
    p = layer(torch.tensor([[3.0]], dtype=torch.float64)).softmax(1)[0, 1].item()
    assert p == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-15)


@pytest.mark.parametrize("classes", [2, 3])
def test_folded_softmax_equals_sklearn_probabilities(classes):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (60, 5)) * np.array([1, 10, 0.1, 1, 5])
    y = np.arange(60) % classes
    x[:, 0] += y  # learnable, not separable
    fit = fit_probe(x[:40], y[:40], x[40:], y[40:], select="loss")
    assert fit["C"] in C_GRID and len(fit["scores"]) == len(C_GRID)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[:40])
    lr = LogisticRegression(C=fit["C"], max_iter=2000).fit(scaler.transform(x[:40]), y[:40])
    want = lr.predict_proba(scaler.transform(x[40:]))
    layer = nn.Linear(5, classes).double()
    fold_probe(layer, fit["coef"], fit["intercept"], fit["mean"], fit["scale"])
    got = layer(torch.from_numpy(x[40:])).softmax(1).detach().numpy()
    assert np.abs(got - want).max() < 1e-12
    z = probe_logits(fit["coef"], fit["intercept"], scaler.transform(x[40:]))
    assert np.abs(torch.from_numpy(z).softmax(1).numpy() - want).max() < 1e-12


def test_fold_refuses_a_layer_of_another_shape():
    with pytest.raises(ValueError, match="cannot fold a 2x4 linear probe"):
        fold_probe(nn.Linear(3, 2), np.ones((1, 4)), np.zeros(1), np.zeros(4), np.ones(4))


def test_linear_member_is_an_ordinary_member(members, manifest):
    import histoclass

    meta = read_checkpoint(members["eff"])["meta"]
    assert meta["kind"] == "member" and meta["head"] == "linear"
    assert meta["linear"]["C"] in C_GRID and meta["linear"]["grid"] == list(C_GRID)
    assert len(meta["linear"]["scores"]) == len(C_GRID)
    assert meta["metrics"] == meta["linear"]["val"]
    assert meta["linear"]["val"]["balanced_accuracy"] == 1.0  # the synthetic task is clear
    assert sorted(p.name for p in members["eff"].parent.iterdir()) == ["best.pt", "config.yaml",
                                                                       "done"]
    for path in members.values():
        preds = histoclass.load(path).predict(images(manifest))
        assert [p.label for p in preds] == ["benign", "malignant"] * 2


@pytest.mark.parametrize("which", ["eff", "vit"])
def test_saved_member_outputs_the_folded_probe_on_cached_features(members, manifest, which):
    # The prediction path's probabilities equal the folded head on the embeddings the probe was
    # fitted on, found in the cache under the key of the *loaded* member's weights.
    import histoclass
    from histoclass.data import load_rgb
    from histoclass.models import load_checkpoint, preprocess_of
    from histoclass.models.checkpoint import file_sha256
    from histoclass.train.features import FeatureCache, setting_key, weights_sha256

    model, meta = load_checkpoint(members[which])
    key = setting_key(meta["timm_name"], meta["model_args"], weights_sha256(model),
                      preprocess_of(meta), "", "cls", meta["input"])
    cache = FeatureCache(Path(meta["linear"]["features"]["cache"]), key)
    paths = images(manifest, "val")
    x = np.stack([cache.get(file_sha256(p)) for p in paths])
    with torch.no_grad():
        want = model.get_classifier()(torch.from_numpy(x))
        clf = histoclass.load(members[which])
        prepared = torch.stack([clf.classifier.preparation(load_rgb(p))[0] for p in paths])
        logits = model(prepared)  # logits, not saturated probabilities, are compared
    assert torch.allclose(logits, want, rtol=1e-4, atol=1e-4)
    got = np.array([[pr.probs[c] for c in meta["classes"]] for pr in clf.predict(paths)])
    t = meta["temperature"]  # fitted on the val split's logits of the saved member
    assert meta["calibration"]["fitted_on"] == "val split" and t > 0
    assert np.abs(got - (want / t).softmax(1).numpy()).max() < 1e-5


def test_second_run_extracts_nothing_and_settings_invalidate(manifest, tmp_path, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="histoclass.train.linear")
    first = read_checkpoint(probe(manifest, tmp_path / "a", cache))["meta"]["linear"]
    assert (first["features"]["cached"], first["features"]["extracted"]) == (0, 18)
    caplog.clear()
    again = read_checkpoint(probe(manifest, tmp_path / "b", cache))["meta"]["linear"]
    assert (again["features"]["cached"], again["features"]["extracted"]) == (18, 0)
    assert "features: 18 cached, 0 extracted" in caplog.text
    assert again["C"] == first["C"] and again["val"] == first["val"]
    resized = read_checkpoint(probe(manifest, tmp_path / "c", cache, image_size=48)
                              )["meta"]["linear"]["features"]
    assert (resized["cached"], resized["extracted"]) == (0, 18)
    reseeded = read_checkpoint(probe(manifest, tmp_path / "d", cache, seed=1)  # other weights
                               )["meta"]["linear"]["features"]
    assert (reseeded["cached"], reseeded["extracted"]) == (0, 18)
    assert len(list(cache.rglob("*.npy"))) == 3 * 18
    assert not list(cache.rglob("*.tmp"))


def test_changed_image_bytes_are_extracted_again(tmp_path):
    manifest = synthetic_manifest(tmp_path / "data", n_train=4, n_val=2, n_test=0)
    probe(manifest, tmp_path / "a", tmp_path / "cache")
    path = images(manifest, "train")[0]
    from PIL import Image

    Image.new("RGB", (96, 72), (10, 200, 10)).save(path)
    feats = read_checkpoint(probe(manifest, tmp_path / "b", tmp_path / "cache")
                            )["meta"]["linear"]["features"]
    assert (feats["cached"], feats["extracted"]) == (5, 1)


def test_cli_and_refusals(manifest, tmp_path, monkeypatch):
    run = ["train", str(manifest), "--model", "test_efficientnet", "--no-pretrained",
           "--image-size", "64", "--workers", "0", "--device", "cpu", "--head", "linear"]
    monkeypatch.setenv("HISTOCLASS_FEATURE_CACHE", str(tmp_path / "env-cache"))
    res = CliRunner().invoke(app, [*run, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "best.pt").is_file() and list((tmp_path / "env-cache").rglob("*.npy"))
    for extra, message in (([], "already holds a run"),
                           (["--resume"], "nothing to resume"),
                           (["--hed-jitter", "0.05"], "without augmentation")):
        res = CliRunner().invoke(app, [*run, "--out", str(tmp_path / "r"), *extra])
        assert res.exit_code == 2 and message in res.output, res.output
    res = CliRunner().invoke(app, [*run, "--out", str(tmp_path / "s"), "--head", "lin"])
    assert res.exit_code == 2 and "choose one of finetune, linear" in res.output


def test_embedding_the_classifier_does_not_see_is_refused(manifest, tmp_path, monkeypatch):
    from histoclass.models.sources import Backbone
    from histoclass.train import linear

    monkeypatch.setattr(linear, "resolve_backbone", lambda *a, **k: Backbone(
        "h0-mini", "test_vit", {}, "hf-hub:bioptimus/H0-mini", "cls+mean_patch"))
    with pytest.raises(ValueError, match="embedding rule is 'cls\\+mean_patch', which timm's "
                                         "classifier layer does not see"):
        probe(manifest, tmp_path / "r", tmp_path / "cache", model="h0-mini")


@pytest.mark.parametrize("method", ["soft", "weighted", "hard", "stack", "concat"])
def test_ensembles_of_linear_members(members, manifest, tmp_path, method):
    import histoclass
    from histoclass.train import fit_ensemble

    ens = fit_ensemble([members["eff"], members["vit"]], method, manifest)
    ens.save(tmp_path / "e.pt")
    preds = histoclass.load(tmp_path / "e.pt").predict(images(manifest))
    assert [p.label for p in preds] == ["benign", "malignant"] * 2
    assert all(len(p.members) == 2 for p in preds)


def test_predict_explain_and_onnx_parity(members, manifest, tmp_path):
    import histoclass

    runner, test = CliRunner(), images(manifest)
    for name, path in members.items():
        torch_csv, onnx_csv = tmp_path / f"{name}.torch.csv", tmp_path / f"{name}.onnx.csv"
        res = runner.invoke(app, ["predict", str(path), "--manifest", str(manifest), "--split",
                                  "test", "--out", str(torch_csv)])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / f"{name}.onnx")])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["predict", str(tmp_path / f"{name}.onnx"), *test,
                                  "--backend", "onnx", "--out", str(onnx_csv)])
        assert res.exit_code == 0, res.output
        a, b = pd.read_csv(torch_csv), pd.read_csv(onnx_csv)
        assert a["pred"].tolist() == b["pred"].tolist() == ["benign", "malignant"] * 2
        assert np.abs(a["p_malignant"].to_numpy() - b["p_malignant"].to_numpy()).max() < 1e-4
    cam = histoclass.load(members["eff"]).explain(test[1])  # Grad-CAM through the probe
    assert cam.overlay.shape[:2] == (72, 96)
    assert float(np.ptp(cam.cam)) > 0
    res = runner.invoke(app, ["explain", str(members["eff"]), *test, "--out",
                              str(tmp_path / "cams")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "cams").glob("*.cam.png"))) == len(test)


def test_stain_target_is_part_of_the_key_and_travels_with_the_member(tmp_path):
    import histoclass

    manifest = synthetic_manifest(tmp_path / "data", n_train=4, n_val=2, n_test=2)
    target = images(manifest, "train")[1]
    probe(manifest, tmp_path / "plain", tmp_path / "cache")
    best = probe(manifest, tmp_path / "stained", tmp_path / "cache", stain="reinhard",
                 stain_target=target)
    meta = read_checkpoint(best)["meta"]
    assert (meta["linear"]["features"]["cached"], meta["linear"]["features"]["extracted"]) == (0, 6)
    assert meta["stain"]["method"] == "reinhard"
    assert histoclass.load(best).describe()["members"][0]["stain"] is not None
