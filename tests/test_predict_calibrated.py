"""Prediction rows of a calibrated member: temperature before softmax, raw probabilities,
confidence and the stated-risk referral, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_predict import fixed_member, index_batch, make_member
from histoclass.calibration import referral, uncalibrated
from histoclass.models.classifier import Scores
from histoclass.models.ensemble import Ensemble
from histoclass.predict import score_frame

# T = 2 takes p to sqrt(p) renormalised: (1/10, 9/10) -> (1/4, 3/4), (1/17, 16/17) -> (1/5, 4/5)
RAW = [[0.1, 0.9], [1 / 17, 16 / 17], [0.5, 0.5]]


def _frame(temperature: float, rule: dict | None):
    m = fixed_member("m", RAW)
    m.meta.update(temperature=temperature, refer_risk=rule)
    ens = Ensemble([m], "single")
    out = ens.predict_proba([index_batch(3)])
    return score_frame(ens, Scores(*(t.numpy() for t in out)))


def test_temperature_confidence_raw_and_refer():
    frame = _frame(2.0, {"threshold": 0.78, "alpha": 0.1})
    assert frame["p_malignant"].to_numpy() == pytest.approx([0.75, 0.8, 0.5], abs=1e-6)
    assert frame["raw.p_malignant"].to_numpy() == pytest.approx([0.9, 16 / 17, 0.5], abs=1e-5)
    assert frame["confidence"].to_numpy() == pytest.approx([0.75, 0.8, 0.5], abs=1e-6)
    assert frame["refer"].tolist() == [1, 0, 1]
    assert frame["refer_reason"].tolist() == ["low confidence 0.75 < 0.78", "",
                                              "low confidence 0.50 < 0.78"]


def test_no_temperature_no_rule_no_extra_columns():
    frame = _frame(1.0, None)
    assert list(frame.columns) == ["p_malignant", "pred", "confidence"]
    assert frame["p_malignant"].to_numpy() == pytest.approx([0.9, 16 / 17, 0.5], abs=1e-6)
    # a refused rule (threshold None) refers nothing and states no confidence rule
    assert "refer" not in _frame(1.0, {"threshold": None, "reason": "x"}).columns


def test_referral_and_uncalibrated_by_hand():
    refer, reason = referral([0.9, 0.6, 0.95], 0.7, np.array([False, True, True]),
                             np.array([False, False, False]))
    assert refer.tolist() == [0, 1, 1]
    assert reason.tolist() == ["", "low confidence 0.60 < 0.70; members disagree",
                               "members disagree"]
    assert uncalibrated(np.array([[0.25, 0.75]]), 2.0)[0] == pytest.approx([0.1, 0.9])


def test_onnx_export_carries_temperature_and_referral(tmp_path):
    import pandas as pd
    from PIL import Image
    from typer.testing import CliRunner

    from histoclass.cli import app
    from histoclass.models import read_checkpoint, save_checkpoint
    from histoclass.models.checkpoint import build_model

    path = make_member(tmp_path / "m.pt", size=32, seed=3)
    obj = read_checkpoint(path)
    model = build_model(obj["meta"])
    model.load_state_dict(obj["state_dict"])
    meta = {**obj["meta"], "temperature": 2.5, "refer_risk": {"threshold": 0.6, "alpha": 0.1}}
    save_checkpoint(path, model, meta)
    rng = np.random.default_rng(0)
    images = []
    for i in range(5):
        images.append(str(tmp_path / f"i{i}.png"))
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images[-1])
    runner = CliRunner()
    for args in (["export", str(path), "--out", str(tmp_path / "m.onnx")],
                 ["predict", str(path), *images, "--out", str(tmp_path / "t.csv")],
                 ["predict", str(tmp_path / "m.onnx"), *images, "--backend", "onnx", "--out",
                  str(tmp_path / "o.csv")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    a, b = pd.read_csv(tmp_path / "t.csv"), pd.read_csv(tmp_path / "o.csv")
    for col in ("p_malignant", "raw.p_malignant", "confidence"):
        assert np.abs(a[col].to_numpy() - b[col].to_numpy()).max() < 1e-4, col
    assert a["refer"].tolist() == b["refer"].tolist()
    assert a["refer_reason"].fillna("").tolist() == b["refer_reason"].fillna("").tolist()
    assert (a["p_malignant"] - a["raw.p_malignant"]).abs().max() > 1e-4  # T really applied
