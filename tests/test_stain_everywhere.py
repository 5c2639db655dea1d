"""A checkpoint's stain normaliser is applied identically offline, by the API/web app that
serve uses, by explain, and by the ONNX backend: same image in, same probability out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histoclass import stain
from histoclass.cli import app
from histoclass.data.images import load_rgb
from histoclass.data.manifest import sample_path
from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint

IMAGES = sorted(sample_path("breakhis").glob("*.png"))[:3]


@pytest.fixture(scope="module")
def stained(tmp_path_factory):
    """A member whose checkpoint carries a Macenko normaliser fitted to a real H&E image."""
    root = tmp_path_factory.mktemp("stained")
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 2, pretrained=False).eval()
    pre = model_preprocess(model, 64)
    norm = stain.fit("macenko", [np.asarray(load_rgb(IMAGES[0]))])
    meta = member_meta("test_efficientnet", "test_efficientnet", ["benign", "malignant"], pre,
                       stain=norm.to_dict())
    return save_checkpoint(root / "m.pt", model, meta), model, pre, norm, root


def _by_hand(model, pre, norm, path, use_stain=True):
    arr = np.asarray(load_rgb(path))
    img = Image.fromarray(norm(arr) if use_stain else arr)
    with torch.no_grad():
        return model(pre.normalize(pre.resize(img))[None]).softmax(-1)[0, 1].item()


def test_offline_api_and_app_agree_with_the_hand_computation(stained):
    from histoclass import load
    from histoclass.app import Limits, analyse
    from histoclass.models.ensemble import load_model_file
    from histoclass.predict import predict_paths

    ckpt, model, pre, norm, _ = stained
    expected = [_by_hand(model, pre, norm, p) for p in IMAGES]
    unstained = [_by_hand(model, pre, norm, p, use_stain=False) for p in IMAGES]
    assert max(abs(a - b) for a, b in zip(expected, unstained, strict=True)) > 1e-4

    offline = predict_paths(load_model_file(ckpt), [str(p) for p in IMAGES], workers=0)
    np.testing.assert_allclose(offline.frame["p_malignant"], expected, atol=1e-6)
    api = load(ckpt).predict([str(p) for p in IMAGES])
    np.testing.assert_allclose([r.probs["malignant"] for r in api], expected, atol=1e-6)
    _, _, items = analyse([str(p) for p in IMAGES], load(ckpt), Limits(), explain=False)
    np.testing.assert_allclose([i["p_malignant"] for i in items], expected, atol=1e-6)


def test_explain_shows_the_stained_prediction(stained):
    from histoclass.explain import explain_batch
    from histoclass.models import load_model_file

    ckpt, model, pre, norm, root = stained
    result = explain_batch(load_model_file(ckpt), [(str(IMAGES[1]), "")], root / "cams")
    expected = _by_hand(model, pre, norm, IMAGES[1])
    assert float(result.rows[0]["p_malignant"]) == pytest.approx(expected, abs=1e-4)


def test_onnx_backend_applies_the_same_normaliser(stained):
    pytest.importorskip("onnxruntime")
    import pandas as pd

    ckpt, model, pre, norm, root = stained
    onnx_path = root / "m.onnx"
    res = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(onnx_path)])
    assert res.exit_code == 0, res.output
    out = root / "onnx.csv"
    res = CliRunner().invoke(app, ["predict", str(onnx_path), *map(str, IMAGES), "--out",
                                   str(out), "--backend", "onnx", "--workers", "1"])
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(out).set_index("path")
    expected = [_by_hand(model, pre, norm, p) for p in IMAGES]
    np.testing.assert_allclose([frame.loc[str(p), "p_malignant"] for p in IMAGES], expected,
                               atol=1e-4)
