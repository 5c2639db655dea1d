"""histoclass.load: predictions from paths, PIL images and arrays, errors, stain, ensembles."""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import histoclass
from histoclass.data.breakhis import SUBTYPES
from histoclass.data.manifest import sample_path
from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint

SAMPLES = sorted(sample_path("breakhis").glob("*.png"))


def make_member(path: Path, classes=("benign", "malignant"), size: int = 64,
                bias: list[float] | None = None, stain: dict | None = None,
                task: str = "binary") -> Path:
    """A tiny test_efficientnet checkpoint; ``bias`` with a zeroed head fixes the output."""
    torch.manual_seed(0)
    model = create_model("test_efficientnet", len(classes), pretrained=False)
    if bias is not None:
        model.get_classifier().weight.data.zero_()
        model.get_classifier().bias.data = torch.tensor(bias)
    meta = member_meta("test_efficientnet", "test_efficientnet", list(classes),
                       model_preprocess(model, size), task=task)
    meta["stain"] = stain
    return save_checkpoint(path, model, meta)


@pytest.fixture(scope="module")
def member(tmp_path_factory) -> Path:
    return make_member(tmp_path_factory.mktemp("api") / "m.pt")


def test_import_is_light_and_load_is_lazy():
    code = ("import sys, histoclass; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(histoclass.load); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(Path(histoclass.__file__).parents[1])})
    assert out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = histoclass.nope


def test_known_answer_from_fixed_head(tmp_path):
    clf = histoclass.load(make_member(tmp_path / "m.pt", bias=[0.0, math.log(3.0)]))
    (pred,) = clf.predict(SAMPLES[0])
    assert pred.probs["malignant"] == pytest.approx(0.75, abs=1e-6)
    assert pred.label == "malignant" and pred.verdict == "malignant"
    assert pred.prob == pytest.approx(0.75, abs=1e-6)
    assert not clf.is_ensemble and pred.members == {} and pred.disagreement is None


def test_subtype_verdict_sums_malignant_subtypes(tmp_path):
    # Softmax of these biases: exp(b) / sum; malignant subtypes are the last four.
    bias = [0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    clf = histoclass.load(make_member(tmp_path / "s.pt", SUBTYPES, bias=bias, task="subtype"))
    (pred,) = clf.predict(SAMPLES[0])
    e = np.exp(bias)
    assert pred.p_malignant == pytest.approx(e[4:].sum() / e.sum(), abs=1e-6)
    assert pred.label == "fibroadenoma" and pred.verdict == "benign"


def test_path_pil_and_array_inputs_agree(member):
    clf = histoclass.load(member)
    img = Image.open(SAMPLES[1])
    by_path, by_pil, by_array = clf.predict([SAMPLES[1], img, np.asarray(img.convert("RGB"))])
    assert by_path.probs == pytest.approx(by_pil.probs, abs=1e-6)
    assert by_path.probs == pytest.approx(by_array.probs, abs=1e-6)
    assert sum(by_path.probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert by_path.source == str(SAMPLES[1]) and by_pil.source == "<image 1>"


def test_batches_match_single_images(member):
    clf = histoclass.load(member)
    batched = clf.predict(SAMPLES, batch_size=4)
    for path, pred in zip(SAMPLES, batched, strict=True):
        assert clf.predict(path)[0].probs == pytest.approx(pred.probs, abs=1e-5)


def test_unreadable_file_is_reported_and_others_kept(member, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    clf = histoclass.load(member)
    preds = clf.predict([SAMPLES[0], bad, SAMPLES[1]])
    assert [p.ok for p in preds] == [True, False, True]
    assert preds[1].error == "not an image (unrecognised format)" and preds[1].label is None
    frame = clf.predict_frame([SAMPLES[0], bad])
    assert list(frame.columns) == ["path", "p_malignant", "pred", "confidence", "error"]
    assert frame["error"].tolist() == ["", "not an image (unrecognised format)"]
    assert frame["p_malignant"].iloc[0] == pytest.approx(preds[0].probs["malignant"])


def test_bad_inputs_raise_clear_errors(member, tmp_path):
    clf = histoclass.load(member)
    with pytest.raises(ValueError, match=r"HxWx3.*float64"):
        clf.predict(np.zeros((8, 8, 3)))
    with pytest.raises(TypeError, match="got int"):
        clf.predict([7])
    with pytest.raises(ValueError, match="image too large: 700x460"):
        clf.predict(Image.open(SAMPLES[0]), max_pixels=1000)
    with pytest.raises(ValueError, match="does not exist"):
        histoclass.load(tmp_path / "missing.pt")


def test_stain_normaliser_from_checkpoint_is_applied(tmp_path, monkeypatch):
    # A stand-in for histoclass.stain whose normaliser inverts the image: the prediction must
    # equal an unnormalised model's prediction on the inverted image.
    fake = types.ModuleType("histoclass.stain")
    fake.from_dict = lambda d: (lambda arr, name="": 255 - arr)
    monkeypatch.setitem(sys.modules, "histoclass.stain", fake)
    stained = histoclass.load(make_member(tmp_path / "st.pt", stain={"method": "invert"}))
    plain = histoclass.load(make_member(tmp_path / "pl.pt"))
    inverted = 255 - np.asarray(Image.open(SAMPLES[2]).convert("RGB"))
    assert stained.predict(SAMPLES[2])[0].probs == pytest.approx(
        plain.predict(inverted)[0].probs, abs=1e-6)
    assert plain.predict(SAMPLES[2])[0].probs != pytest.approx(
        plain.predict(inverted)[0].probs, abs=1e-6)


def test_explain_overlay_matches_prediction(member):
    clf = histoclass.load(member)
    img = np.asarray(Image.open(SAMPLES[0]).convert("RGB"))
    ex = clf.explain(img)
    assert ex.overlay.shape == img.shape and ex.overlay.dtype == np.uint8
    assert ex.cam.shape == img.shape[:2] and 0 <= ex.cam.min() <= ex.cam.max() <= 1
    assert ex.prediction.probs == pytest.approx(clf.predict(img)[0].probs, abs=1e-5)
    assert ex.target == ex.prediction.label


def test_ensemble_members_disagreement_and_refer(tmp_path):
    from histoclass.models import ensemble as ens
    a = make_member(tmp_path / "a.pt", bias=[0.0, math.log(9.0)])  # p(malignant) = 0.9
    b = make_member(tmp_path / "b.pt", bias=[0.0, math.log(3 / 7)])  # p(malignant) = 0.3
    members = [ens.load_member(a, "a"), ens.load_member(b, "b")]
    ens.Ensemble(members, "soft", member_paths=[a, b]).save(tmp_path / "e.pt")
    clf = histoclass.load(tmp_path / "e.pt")
    (pred,) = clf.predict(SAMPLES[0])
    assert clf.is_ensemble and clf.member_names == ["a", "b"]
    assert pred.p_malignant == pytest.approx(0.6, abs=1e-6)
    assert pred.members["a"]["malignant"] == pytest.approx(0.9, abs=1e-6)
    assert pred.members["b"]["malignant"] == pytest.approx(0.3, abs=1e-6)
    assert pred.disagreement == pytest.approx(0.3, abs=1e-6)  # population std of 0.9, 0.3
    assert pred.refer  # 0.3 > default threshold 0.25
    frame = clf.predict_frame([SAMPLES[0]])
    assert frame[["member.a.p_malignant", "member.b.p_malignant", "refer"]].iloc[0].tolist() \
        == pytest.approx([0.9, 0.3, 1], abs=1e-6)


def test_low_confidence_refers_with_its_reason_apart_from_disagreement(tmp_path):
    from histoclass.app.fields import describe
    from histoclass.models import ensemble as ens
    a = make_member(tmp_path / "a.pt", bias=[0.0, math.log(9.0)])  # p(malignant) = 0.9
    b = make_member(tmp_path / "b.pt", bias=[0.0, math.log(3 / 7)])  # p(malignant) = 0.3
    members = [ens.load_member(a, "a"), ens.load_member(b, "b")]
    # agreement rule off (0.3 <= 0.5); the stated-risk rule refers below confidence 0.7
    ens.Ensemble(members, "soft", member_paths=[a, b], refer_threshold=0.5,
                 refer_risk={"threshold": 0.7, "alpha": 0.1}).save(tmp_path / "e.pt")
    clf = histoclass.load(tmp_path / "e.pt")
    (pred,) = clf.predict(SAMPLES[0])
    assert pred.refer and pred.refer_reason == "low confidence 0.60 < 0.70"
    shown = describe(pred, clf)
    assert shown["refer"] and shown["members_disagree"] is False
    assert "members agree" in shown["why"] and "stated-risk threshold" in shown["why"]
    assert clf.predict_frame([SAMPLES[0]])["refer_reason"].tolist() == [pred.refer_reason]


def test_ensemble_explanation_is_fused_over_members(tmp_path):
    from histoclass.models import ensemble as ens
    a, b = make_member(tmp_path / "a.pt"), make_member(tmp_path / "b.pt", size=48)
    members = [ens.load_member(a, "a"), ens.load_member(b, "b")]
    ens.Ensemble(members, "weighted", weights=[0.75, 0.25], member_paths=[a, b]).save(
        tmp_path / "e.pt")
    clf = histoclass.load(tmp_path / "e.pt")
    ex = clf.explain(SAMPLES[0])
    assert sorted(ex.member_overlays) == ["a", "b"] and ex.overlay.shape == (460, 700, 3)
    assert ex.prediction.probs == pytest.approx(clf.predict(SAMPLES[0])[0].probs, abs=1e-6)
    assert ex.prediction.members["b"] and ex.target == ex.prediction.label
