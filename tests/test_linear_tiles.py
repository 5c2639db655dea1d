"""Issue 13's acceptance path: a ViT linear probe on native-resolution tiles, through the CLI
(train twice: the second extracts nothing), ensemble, predict, explain, ONNX and the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.data import load_rgb
from histoclass.data.field_tiles import field_tiles
from histoclass.data.images import to_array
from histoclass.data.transforms import Preprocess
from histoclass.models import load_checkpoint, read_checkpoint
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

VIT = ["--model", "test_vit", "--model-arg", "dynamic_img_size=true"]
COMMON = ["--no-pretrained", "--head", "linear", "--input", "tiles", "--image-size", "48",
          "--batch-size", "8", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lt")
    manifest = synthetic_manifest(root, n_train=12, n_val=6, n_test=4)  # 96x72 fields
    cache, runner = root / "features", CliRunner()

    def train(name: str, model: list[str]) -> Path:
        res = runner.invoke(app, ["train", str(manifest), "--out", str(root / name), *model,
                                  *COMMON, "--feature-cache", str(cache)])
        assert res.exit_code == 0, res.output
        return root / name / "best.pt"

    vit = train("vit", VIT)
    again = train("vit2", VIT)
    eff = train("eff", ["--model", "test_efficientnet"])
    return {"root": root, "manifest": manifest, "vit": vit, "again": again, "eff": eff}


def test_member_records_tiles_and_linear_and_the_second_run_extracts_nothing(run):
    meta = read_checkpoint(run["vit"])["meta"]
    assert meta["head"] == "linear" and meta["timm_name"] == "test_vit"
    assert meta["input"]["mode"] == "tiles" and meta["input"]["size"] == 48
    assert meta["linear"]["features"] == {**meta["linear"]["features"], "extracted": 18,
                                          "cached": 0}
    again = read_checkpoint(run["again"])["meta"]["linear"]["features"]
    assert (again["cached"], again["extracted"]) == (18, 0)
    a, b = load_checkpoint(run["vit"])[0], load_checkpoint(run["again"])[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def test_predict_is_the_mean_of_tile_logits_and_api_and_onnx_agree(run):
    import histoclass

    frame = pd.read_csv(run["manifest"])
    test = frame.loc[frame["split"] == "test", "path"].tolist()
    out, runner = run["root"], CliRunner()
    res = runner.invoke(app, ["predict", str(run["vit"]), *test, "--out", str(out / "p.csv")])
    assert res.exit_code == 0, res.output
    csv = pd.read_csv(out / "p.csv")
    model, meta = load_checkpoint(run["vit"])
    pre, t = Preprocess.from_dict(meta["preprocess"]), meta["temperature"]  # fitted on val
    by_hand = []
    for path in test:  # 96x72 at 48: tiles at x 0, 48 and y 0, 24 (last shifted inward)
        tiles = field_tiles(to_array(load_rgb(path)), 48, 48)
        assert len(tiles) == 4
        x = pre.normalize(torch.from_numpy(tiles).permute(0, 3, 1, 2))
        with torch.no_grad():
            by_hand.append((model(x).mean(0) / t).softmax(0)[1].item())
    np.testing.assert_allclose(csv["p_malignant"], by_hand, atol=1e-5)
    api = [p.probs["malignant"] for p in histoclass.load(run["vit"]).predict(test)]
    np.testing.assert_allclose(api, by_hand, atol=1e-5)
    res = runner.invoke(app, ["export", str(run["vit"]), "--out", str(out / "vit.onnx")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", str(out / "vit.onnx"), *test, "--backend", "onnx",
                              "--out", str(out / "o.csv")])
    assert res.exit_code == 0, res.output
    onnx = pd.read_csv(out / "o.csv")["p_malignant"].to_numpy()
    assert np.abs(onnx - np.array(by_hand)).max() < 1e-4


def test_ensemble_and_explain(run, tmp_path):
    import histoclass

    runner = CliRunner()
    ens = tmp_path / "ens.pt"
    res = runner.invoke(app, ["ensemble", str(run["vit"]), str(run["eff"]), "--method", "stack",
                              "--manifest", str(run["manifest"]), "--out", str(ens)])
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(run["manifest"])
    test = frame.loc[frame["split"] == "test", "path"].tolist()
    preds = histoclass.load(ens).predict(test)
    assert len(preds) == 4 and all(len(p.members) == 2 for p in preds)
    res = runner.invoke(app, ["explain", str(run["vit"]), *test[:2], "--out",
                              str(tmp_path / "cams"), "--maps"])
    assert res.exit_code == 0, res.output
    maps = sorted((tmp_path / "cams").glob("*.cam.npy"))
    assert len(maps) == 2 and all(np.load(m).shape == (72, 96) for m in maps)
