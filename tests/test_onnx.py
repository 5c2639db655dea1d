"""ONNX export and the ONNX Runtime backend: metadata, parity with PyTorch, batches, INT8."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
import onnx

import histoclass
from helpers_predict import make_member
from histoclass.cli import app
from histoclass.data.manifest import sample_path
from histoclass.deploy.runtime import OnnxClassifier

SAMPLES = sorted(sample_path("breakhis").glob("*.png"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, str]:
    """A member exported through the CLI (FP32 and INT8), and the CLI's output."""
    root = tmp_path_factory.mktemp("onnx")
    ckpt = make_member(root / "m.pt")
    res = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(root / "m.onnx"), "--int8"])
    assert res.exit_code == 0, res.output
    return ckpt, root / "m.onnx", res.output


def test_metadata_is_embedded(exported):
    ckpt, int8, _ = exported
    fp32 = int8.with_name("m.fp32.onnx")
    meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    assert json.loads(meta["preprocess"]) == torch.load(ckpt, weights_only=True)["meta"][
        "preprocess"]
    assert json.loads(meta["classes"]) == ["benign", "malignant"]
    assert (meta["task"], meta["arch"], meta["method"]) == ("binary", "test_efficientnet",
                                                            "single")
    assert (meta["stain"], meta["output"], meta["quantization"]) == ("null", "probabilities",
                                                                     "none")
    meta8 = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert meta8["quantization"] == "int8-static-qdq" and meta8["classes"] == meta["classes"]


def test_fp32_matches_pytorch_on_real_images(exported):
    ckpt, int8, output = exported
    ref = histoclass.load(ckpt).predict(SAMPLES)
    got = histoclass.load(int8.with_name("m.fp32.onnx")).predict(SAMPLES)
    for a, b in zip(ref, got, strict=True):
        assert b.probs == pytest.approx(a.probs, abs=1e-4)
    assert "max |p_onnx - p_torch|" in output and f"same class {len(SAMPLES)}" in output


def test_dynamic_batch_and_probabilities(exported):
    clf = OnnxClassifier(exported[1].with_name("m.fp32.onnx"), threads=1)
    x = clf.preprocess_paths(SAMPLES[:5])
    # The graph takes the decoded bytes; normalisation happens inside it.
    assert x.shape == (5, 64, 64, 3) and x.dtype == np.uint8 and clf.uint8_input
    five = clf.predict_batch(x)
    one = np.concatenate([clf.predict_batch(x[i:i + 1]) for i in range(5)])
    assert np.allclose(five, one, atol=1e-6) and np.allclose(five.sum(1), 1, atol=1e-6)
    with pytest.raises(ValueError, match="takes uint8 input, got float32"):
        clf.predict_batch(clf.normalize(x))


def test_float_input_export_still_reads(exported, tmp_path):
    """``uint8_input=False`` (and files from before the uint8 input) take normalised float32
    NCHW; the backend normalises for them and gets the same probabilities."""
    from histoclass.deploy.export import export_onnx

    legacy = export_onnx(exported[0], tmp_path / "f.onnx", uint8_input=False)
    meta = {p.key: p.value for p in onnx.load(str(legacy)).metadata_props}
    assert meta["input"] == "float32-nchw-normalised"
    old, new = OnnxClassifier(legacy, threads=1), OnnxClassifier(
        exported[1].with_name("m.fp32.onnx"), threads=1)
    x = old.preprocess_paths(SAMPLES)
    assert x.shape == (len(SAMPLES), 3, 64, 64) and x.dtype == np.float32
    from PIL import Image

    pre = old.preprocess  # the checkpoint's own preprocessing (see test_metadata_is_embedded)
    torch_x = torch.stack([pre.normalize(pre.resize(Image.open(p).convert("RGB")))
                           for p in SAMPLES])
    assert np.abs(x - torch_x.numpy()).max() < 1e-5  # numpy normalisation = Preprocess's
    assert np.abs(old.predict_batch(x) - new.predict_batch(new.preprocess_paths(SAMPLES))
                  ).max() < 1e-5


@pytest.mark.parametrize(("workers", "executor"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_predict_paths_skips_bad_files_and_keeps_order(exported, tmp_path, workers, executor):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    clf = OnnxClassifier(exported[1].with_name("m.fp32.onnx"), threads=1)
    paths = [*SAMPLES[:3], bad, *SAMPLES[3:]]
    out = clf.predict_paths(paths, batch_size=2, workers=workers, executor=executor)
    assert out.index == [0, 1, 2, 4, 5, 6]
    assert [(p, r.split(" (")[0]) for p, r in out.skipped] == [
        (str(bad), "corrupt or truncated image")]
    assert np.allclose(out.proba, clf.predict_batch(clf.preprocess_paths(SAMPLES)), atol=1e-6)
    assert out.pred.tolist() == out.proba.argmax(1).tolist()
    # What histoclass.predict's CSV code consumes: numpy throughout, no torch round trip.
    assert all(isinstance(a, np.ndarray) for a in (out.proba, out.pred, out.members))


def test_clear_errors(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx does not exist"):
        OnnxClassifier(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        OnnxClassifier(tmp_path / "junk.onnx")
    plain = onnx.load(str(exported[1].with_name("m.fp32.onnx")))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ValueError, match="without histoclass metadata"):
        OnnxClassifier(tmp_path / "plain.onnx")
    with pytest.raises(RuntimeError, match="Grad-CAM needs the PyTorch checkpoint"):
        histoclass.load(exported[1]).explain(SAMPLES[0])
    res = CliRunner().invoke(app, ["export", str(tmp_path / "x.pt"), "--out", "y.onnx"])
    assert res.exit_code == 2 and "x.pt does not exist" in res.output


@pytest.mark.parametrize("method", ["hard", "concat"])
def test_ensemble_exports_as_one_graph(tmp_path, method):
    from histoclass.models import ensemble as ens
    a = make_member(tmp_path / "a.pt", seed=1, bias=[0.0, math.log(9.0)])
    # Another input size (resized inside the graph); a clear vote, so resizing cannot flip it.
    b = make_member(tmp_path / "b.pt", seed=2, size=48, bias=[0.0, 3.0], zero=False)
    c = make_member(tmp_path / "c.pt", seed=3)
    paths = [a, b, c] if method == "hard" else [a, c]
    members = [ens.load_member(p, p.stem) for p in paths]
    head = None
    if method == "concat":
        from histoclass.models.concat import ConcatHead

        torch.manual_seed(0)
        head = ConcatHead(sum(m.model.num_features for m in members), 2).eval()
    ens.Ensemble(members, method, head=head, member_paths=paths).save(tmp_path / "e.pt")
    from histoclass.deploy.export import export_onnx

    export_onnx(tmp_path / "e.pt", tmp_path / "e.onnx")
    ref = histoclass.load(tmp_path / "e.pt").predict_frame(SAMPLES)
    got = histoclass.load(tmp_path / "e.onnx").predict_frame(SAMPLES)
    assert list(got.columns) == list(ref.columns)
    num = [c for c in ref.columns if c not in ("path", "pred", "error", "refer_reason")]
    # Same-size members match to float precision; b sees a resize of the 64-px input.
    tol = 2e-2 if method == "hard" else 1e-5
    assert np.abs(got[num].to_numpy(float) - ref[num].to_numpy(float)).max() < tol
    assert got["pred"].tolist() == ref["pred"].tolist()
    out = OnnxClassifier(tmp_path / "e.onnx", threads=1).predict_paths(SAMPLES, workers=0)
    assert out.members.shape == (len(paths), len(SAMPLES), 2)
    assert np.allclose(out.proba[:, 1], got["p_malignant"], atol=1e-6)
