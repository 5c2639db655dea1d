"""Issue 12, models side: NaN never becomes a class, unpickling errors keep the cause and drop
torch's advice, degenerate stain targets are refused, hand-made metadata is validated."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers_predict import fixed_member, make_member
from histoclass import stain
from histoclass.api import Model
from histoclass.cli import app
from histoclass.data.manifest import sample_path
from histoclass.models import CheckpointError, Ensemble, WeightsError, create_model
from histoclass.models.checkpoint import read_checkpoint, save_checkpoint
from histoclass.models.ensemble import load_model_file
from histoclass.predict import predict_paths, score_frame
from honest_helpers import evil_pickle, grey, nan_onnx

runner = CliRunner()
SAMPLE = sorted(sample_path("breakhis").glob("*.png"))[:2]
NAN = [[float("nan"), float("nan")]] * 4


# -- item 6 ------------------------------------------------------------------------------------
def test_checkpoint_with_nan_weights_is_refused_naming_the_file(tmp_path):
    path = make_member(tmp_path / "ok.pt", size=32)
    obj = read_checkpoint(path)
    obj["state_dict"]["classifier.weight"][0, 0] = float("nan")
    torch.save(obj, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan\.pt: weights contain NaN or infinite "
                                              r"values \(1 tensor\(s\), e\.g\. classifier"):
        load_model_file(tmp_path / "nan.pt")
    res = runner.invoke(app, ["predict", str(tmp_path / "nan.pt"), str(SAMPLE[0]), "--out",
                              str(tmp_path / "p.csv")])
    assert res.exit_code == 2 and "nan.pt: weights contain NaN" in res.output


@pytest.mark.parametrize("members", [1, 2])
def test_nan_outputs_never_become_a_class(tmp_path, members):
    nets = [fixed_member(f"m{i}", NAN) for i in range(members)]
    ens = Ensemble(nets, "single" if members == 1 else "soft")
    frame = predict_paths(ens, SAMPLE).frame
    assert frame["pred"].tolist() == ["", ""] and frame["p_malignant"].isna().all()
    assert frame["error"].str.startswith("non-finite model output").all()
    if members == 2:
        assert frame["refer"].tolist() == [1, 1]  # the safe direction: ask a pathologist
    model = Model(ens, tmp_path / "x.pt")
    pred = model.predict(SAMPLE[0])[0]
    assert pred.error.startswith("non-finite") and pred.verdict is None and pred.label is None
    table = model.predict_frame(SAMPLE)
    assert table["pred"].tolist() == ["", ""] and table["error"].str.startswith("non-finite").all()
    good = score_frame(Ensemble([fixed_member("g", [[0.3, 0.7]] * 4)], "single"),
                       Ensemble([fixed_member("g", [[0.3, 0.7]] * 4)], "single")
                       .predict_images([np.zeros((4, 4, 3), np.uint8)]))
    assert "error" not in good.columns  # the column appears only when a row needs it


def test_app_shows_an_error_not_nan_percent(tmp_path):
    from histoclass.app import Limits, analyse

    model = Model(Ensemble([fixed_member("m", NAN)], "single"), tmp_path / "x.pt")
    note, results, items = analyse([str(SAMPLE[0])], model, Limits(), explain=False)
    page = note + results
    assert "nan%" not in page.lower() and "Could not analyse this file" in page
    assert items[0]["error"].startswith("non-finite") and "<img" not in results


def test_onnx_backend_marks_nan_outputs_as_errors(tmp_path):
    path = nan_onnx(tmp_path / "nan.onnx")
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(path), *map(str, SAMPLE), "--out", str(out),
                              "--backend", "onnx", "--workers", "0"])
    assert res.exit_code == 1 and "non-finite model output" in res.output
    frame = pd.read_csv(out, keep_default_na=False)
    assert frame["pred"].tolist() == ["", ""] and (frame["error"] != "").all()
    import histoclass

    pred = histoclass.load(path).predict(SAMPLE[0])[0]
    assert pred.error.startswith("non-finite") and pred.verdict is None


# -- item 8 ------------------------------------------------------------------------------------
def test_unpickling_errors_keep_the_cause_and_drop_the_advice(tmp_path):
    path = evil_pickle(tmp_path / "evil.pt")
    for call, kind in ((lambda: load_model_file(path), CheckpointError),
                       (lambda: create_model("test_efficientnet", 2, weights=path), WeightsError)):
        with pytest.raises(kind) as info:
            call()
        text = str(info.value)
        assert "GLOBAL posix.system" in text and str(path) in text
        assert "weights_only" not in text and "trust" not in text and "safe_globals" not in text
    from train_helpers import synthetic_manifest

    manifest = synthetic_manifest(tmp_path / "data", n_train=2, n_val=2, n_test=0)
    res = runner.invoke(app, ["train", str(manifest), "--out", str(tmp_path / "r"), "--weights",
                              str(path), "--model", "test_efficientnet", "--workers", "0"])
    assert res.exit_code == 2 and "GLOBAL posix.system" in res.output, res.output
    assert "weights_only" not in res.output


def test_onnx_and_stain_json_errors_name_file_key_and_cause(tmp_path):
    from histoclass.deploy.runtime import OnnxClassifier

    bad = nan_onnx(tmp_path / "b.onnx", meta={"classes": "[benign"})
    with pytest.raises(ValueError, match=r"b\.onnx: histoclass metadata 'classes' is not valid "
                                         r"JSON \(Expecting"):
        OnnxClassifier(bad)
    big = nan_onnx(tmp_path / "big.onnx", meta={"preprocess": json.dumps(
        {"input_size": [100000, 100000], "mean": [0.5] * 3, "std": [0.5] * 3,
         "interpolation": "bilinear"})})
    with pytest.raises(ValueError, match=r"big\.onnx: histoclass metadata preprocess input_size "
                                         r"\[100000, 100000\]: need \[height, width\], integers "
                                         r"in \[8, 4096\]"):
        OnnxClassifier(big)
    (tmp_path / "t.json").write_text('{"method": "vahadane",')
    with pytest.raises(ValueError, match=r"t\.json: not a JSON stain target \(Expecting"):
        stain.load(tmp_path / "t.json")


# -- item 15: hand-made checkpoint metadata ------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"timm_name": "no_such_net"}, "timm_name 'no_such_net' is not a timm model name"),
    ({"preprocess": {"input_size": [100000, 100000], "mean": [0.5] * 3, "std": [0.5] * 3,
                     "interpolation": "bicubic"}}, "preprocess input_size [100000, 100000]"),
    ({"classes": ["benign"]}, "classes ['benign'] must be 2 distinct non-empty names"),
    ({"preprocess": None}, "preprocess must be a mapping"),
])
def test_bad_checkpoint_metadata_is_one_line(tmp_path, change, message):
    obj = read_checkpoint(make_member(tmp_path / "ok.pt", size=32))
    obj["meta"].update(change)
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_model_file(tmp_path / "bad.pt")
    assert message in str(info.value) and "bad.pt" in str(info.value)
    del obj["meta"]["timm_name"]
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="timm_name is missing"):
        load_model_file(tmp_path / "bad.pt")


# -- item 9 ------------------------------------------------------------------------------------
def test_single_stain_targets_are_refused_by_every_method(tmp_path):
    img = np.asarray(Image.open(SAMPLE[1]).convert("RGB"))
    for method in stain.METHODS:
        with pytest.raises(ValueError, match=f"cannot fit {method}"):
            stain.fit(method, grey(img))
    Image.fromarray(grey(img)).save(tmp_path / "grey.png")
    from histoclass.train.data import fit_stain

    with pytest.raises(ValueError, match=r"vahadane.*a stain is absent"):
        fit_stain("vahadane", str(tmp_path / "grey.png"))  # train --stain-target
    res = runner.invoke(app, ["stain", str(SAMPLE[0]).rsplit("/", 1)[0], "--method", "vahadane",
                              "--target", str(tmp_path / "grey.png"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "a stain is absent" in res.output


def test_one_pixel_images_pass_through_every_method_alike():
    img = np.asarray(Image.open(SAMPLE[1]).convert("RGB"))
    one = np.array([[[120, 60, 140]]], np.uint8)
    reasons = set()
    for method in stain.METHODS:
        out, why = stain.fit(method, img).apply(one)
        assert np.array_equal(out, one)
        reasons.add(why)
    assert reasons == {"only 1 tissue pixel(s) (< 64): too few to estimate colours"}


def test_saved_member_round_trip_still_loads(tmp_path):
    model = create_model("test_efficientnet", 2, pretrained=False)
    from histoclass.models import member_meta, model_preprocess

    meta = member_meta("test_efficientnet", "test_efficientnet", ["benign", "malignant"],
                       model_preprocess(model, 32))
    ens = load_model_file(save_checkpoint(tmp_path / "m.pt", model, meta))
    assert ens.classes == ["benign", "malignant"]
