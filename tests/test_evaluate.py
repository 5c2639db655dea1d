"""Predictions CSV -> metrics: task detection, bad input, per magnification, folds, members."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import histoclass
from histoclass.data.breakhis import SUBTYPES
from histoclass.evaluate import (
    detect_task,
    evaluate_files,
    evaluate_frame,
    metric_set,
    read_predictions,
    write_outputs,
)
from histoclass.metrics import METRICS

KEYS = {*METRICS, "per_magnification", "ci95"}


def preds_csv(path: Path, rows: list[tuple], **extra: list) -> Path:
    """Rows of (patient_id, magnification, label, p_malignant); split test, protocol patient."""
    frame = pd.DataFrame(rows, columns=["patient_id", "magnification", "label", "p_malignant"])
    frame.insert(0, "path", [f"img{i}.png" for i in range(len(rows))])
    frame.insert(4, "split", "test")
    frame.insert(5, "protocol", "patient")
    for name, values in extra.items():
        frame[name.replace("__", ".")] = values
    frame.to_csv(path, index=False)
    return path


# 40X: A malignant .9 right, B benign .6 wrong. 100X: A malignant .8 right, B benign .1 right.
MAG_ROWS = [("A", "100X", "malignant", 0.8), ("B", "100X", "benign", 0.1),
            ("A", "40X", "malignant", 0.9), ("B", "40X", "benign", 0.6)]


def test_detect_task() -> None:
    binary = detect_task(["path", "label", "p_benign", "p_malignant", "member.x.p_malignant"])
    assert (binary.kind, binary.classes, binary.prob_columns) == (
        "binary", ("benign", "malignant"), ("p_malignant",))
    cols = ["path", "label", "subtype", *(f"p_{s}" for s in reversed(SUBTYPES))]
    sub = detect_task(cols)
    assert sub.kind == "subtype" and sub.classes == SUBTYPES and sub.label_column == "subtype"
    other = detect_task(["path", "label", "p_cat", "p_dog"])
    assert other.classes == ("cat", "dog") and other.label_column == "label"


def test_csv_without_probability_columns_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "nope.csv"
    pd.DataFrame({"path": ["a.png"], "patient_id": ["A"], "label": ["benign"],
                  "pred": ["benign"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"nope\.csv: no probability columns; expected "
                                         r"p_malignant .* or one p_<class> column per class"):
        evaluate_files([bad])


def test_bad_labels_probabilities_and_splits_are_named(tmp_path: Path) -> None:
    path = preds_csv(tmp_path / "p.csv", [("A", "40X", "malign", 0.5)])
    with pytest.raises(ValueError, match=r"unknown label value\(s\) \['malign'\]; valid: benign, "
                                         "malignant"):
        read_predictions(path)
    path = preds_csv(tmp_path / "p.csv", [("A", "40X", "benign", 1.5)])
    with pytest.raises(ValueError, match=r"column p_malignant row 2 is '1.5'; probabilities must"):
        read_predictions(path)
    path = preds_csv(tmp_path / "p.csv", [("A", "40X", "benign", 0.5)])
    with pytest.raises(ValueError, match=r"no rows with split 'val'; it has splits \['test'\]"):
        read_predictions(path, split="val")
    with pytest.raises(ValueError, match="threshold must be in"):
        evaluate_files([path], threshold=1.0)
    with pytest.raises(FileNotFoundError, match=r"missing\.csv does not exist"):
        read_predictions(tmp_path / "missing.csv")


def test_unlabelled_rows_and_other_splits_are_skipped(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = preds_csv(tmp_path / "p.csv", [*MAG_ROWS, ("C", "40X", "", 0.3), ("D", "40X", "", 0.4),
                                          ("E", "40X", "benign", 0.9)])
    frame = pd.read_csv(path)
    frame.loc[6, "split"] = "train"
    frame.to_csv(path, index=False)
    with caplog.at_level(logging.WARNING):
        rows, _ = read_predictions(path)
    assert "skipping 2 row(s) with no label" in caplog.text
    assert len(rows) == 4 and rows["y"].tolist() == [1, 0, 1, 0]
    assert len(read_predictions(path, split="all")[0]) == 5


def test_per_magnification_splits_rows(tmp_path: Path) -> None:
    rows, task = read_predictions(preds_csv(tmp_path / "p.csv", [*MAG_ROWS,
                                                                 ("C", "", "malignant", 0.2)]))
    out = evaluate_frame(rows, task, bootstrap=0)
    assert set(out) == KEYS
    assert list(out["per_magnification"]) == ["40X", "100X"]  # BreakHis order; "" left out
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["per_magnification"]["40X"]["accuracy"] == 0.5
    assert out["per_magnification"]["40X"]["specificity"] == 0.0
    assert out["per_magnification"]["100X"]["accuracy"] == 1.0
    # patient C has one image, wrong; A all right; B half right at 40X+100X
    assert out["patient_recognition_rate"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    # patient means: A .85 right, B .35 right, C .2 wrong
    assert out["patient_accuracy"] == pytest.approx(2 / 3)
    assert out["ci95"] == dict.fromkeys(METRICS)


def test_undefined_metric_is_null_in_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = preds_csv(tmp_path / "p.csv", [("A", "40X", "malignant", 0.9),
                                          ("B", "40X", "malignant", 0.4)])
    with caplog.at_level(logging.WARNING):
        ev = evaluate_files([path], bootstrap=10)
    write_outputs(ev, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["roc_auc"] is None and saved["specificity"] is None
    assert saved["per_magnification"]["40X"]["roc_auc"] is None
    assert saved["ci95"]["roc_auc"] is None and saved["recall"] == 0.5
    assert "all images: undefined metric(s) reported as null: " in caplog.text


def test_metrics_json_round_trip(tmp_path: Path) -> None:
    ev = evaluate_files([preds_csv(tmp_path / "p.csv", MAG_ROWS)], bootstrap=20, seed=4)
    written = write_outputs(ev, tmp_path / "out")
    assert [p.name for p in written] == ["metrics.json", "evaluation.json", "calibration.json"]
    assert json.loads(written[0].read_text()) == ev.metrics
    meta = json.loads(written[1].read_text())
    assert (meta["images"], meta["patients"], meta["task"]) == (4, 2, "binary")
    cal = json.loads(written[2].read_text())
    assert cal == ev.calibration and not cal["calibrated"] and cal["ece_before"] is None
    assert cal["note"].startswith("not calibrated")


def test_folds_mean_and_std(tmp_path: Path) -> None:
    # fold 0: four images all right (accuracy 1); fold 1: two of four right (0.5)
    m, b = ("40X", "malignant"), ("40X", "benign")
    f0 = preds_csv(tmp_path / "f0.csv", [("A", *m, 0.9), ("A", *m, 0.8), ("B", *b, 0.1),
                                         ("B", *b, 0.2)])
    f1 = preds_csv(tmp_path / "f1.csv", [("C", *m, 0.9), ("C", *m, 0.3), ("D", *b, 0.1),
                                         ("D", *b, 0.7)])
    ev = evaluate_files([f0, f1], bootstrap=50)
    assert set(ev.metrics) == KEYS
    assert ev.metrics["accuracy"] == pytest.approx(0.75)
    assert ev.folds["std"]["accuracy"] == pytest.approx(((0.25**2 + 0.25**2) / 1) ** 0.5)
    assert [f["accuracy"] for f in ev.folds["folds"]] == [1.0, 0.5]
    assert set(ev.folds["folds"][0]) == {"fold", *METRICS, "per_magnification"}
    assert [f["fold"] for f in ev.folds["folds"]] == [str(f0), str(f1)]
    # patient accuracy: fold 0 both right; fold 1 C mean .6 right, D mean .4 right
    assert ev.folds["mean"]["patient_accuracy"] == 1.0
    assert ev.metrics["per_magnification"]["40X"]["accuracy"] == pytest.approx(0.75)
    # 2 patients per class are too few to resample (issue 12, item 1): no CI, and why not
    assert ev.meta["images"] == 8 and ev.metrics["ci95"]["accuracy"] is None
    assert "too few patients" in ev.meta["ci_note"]
    names = [p.name for p in write_outputs(ev, tmp_path / "out")]
    assert "folds.json" in names
    three = evaluate_files([f0, f1, f0], bootstrap=0)
    assert three.metrics["accuracy"] == pytest.approx(2.5 / 3)


def test_fold_column_splits_one_file(tmp_path: Path) -> None:
    path = preds_csv(tmp_path / "p.csv", MAG_ROWS, fold=[0, 0, 1, 1])
    ev = evaluate_files([path], bootstrap=0, fold_column="fold")
    # fold 0 = the 100X rows (both right), fold 1 = the 40X rows (one right)
    assert [f["fold"] for f in ev.folds["folds"]] == ["fold=0", "fold=1"]
    assert ev.metrics["accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="fold column 'nope' needs exactly one predictions file"):
        evaluate_files([path], fold_column="nope")


def test_members_and_referral(tmp_path: Path) -> None:
    path = preds_csv(tmp_path / "p.csv", MAG_ROWS, member__b0__p_malignant=[0.8, 0.1, 0.9, 0.6],
                     member__b1__p_malignant=[0.2, 0.9, 0.1, 0.9],
                     disagreement=[0.0, 0.4, 0.1, 0.3])
    ev = evaluate_files([path], bootstrap=0, refer_threshold=0.25)
    assert list(ev.members) == ["b0", "b1", "ensemble"]
    assert ev.members["b1"]["accuracy"] == 0.0 and ev.members["b0"]["accuracy"] == 0.75
    assert ev.members["ensemble"] == metric_set(ev.frame, ev.task)
    # rows 2 and 4 (disagreement .4 and .3) are referred; the two kept are right
    assert (ev.referral["referred"], ev.referral["referral_rate"]) == (2, 0.5)
    assert ev.referral["retained"]["accuracy"] == 1.0
    names = [p.name for p in write_outputs(ev, tmp_path / "out")]
    assert {"members.json", "referral.json"} <= set(names)
    with pytest.raises(ValueError, match="no disagreement column"):
        evaluate_files([preds_csv(tmp_path / "q.csv", MAG_ROWS)], refer_threshold=0.2)


def test_subtype_task_uses_subtype_column(tmp_path: Path) -> None:
    probs = {f"p_{s}": [0.0] * 3 for s in SUBTYPES}
    probs["p_adenosis"] = [0.9, 0.2, 0.1]
    probs["p_fibroadenoma"] = [0.1, 0.8, 0.1]
    probs["p_ductal_carcinoma"] = [0.0, 0.0, 0.8]
    frame = pd.DataFrame({"path": ["a", "b", "c"], "patient_id": ["A", "B", "C"],
                          "magnification": "40X", "label": ["benign", "benign", "malignant"],
                          "subtype": ["adenosis", "adenosis", "ductal_carcinoma"],
                          "split": "test", "protocol": "patient", **probs})
    frame.to_csv(tmp_path / "s.csv", index=False)
    ev = evaluate_files([tmp_path / "s.csv"], bootstrap=0)
    assert ev.task.kind == "subtype" and ev.meta["classes"] == list(SUBTYPES)
    assert ev.metrics["accuracy"] == pytest.approx(2 / 3)
    assert ev.metrics["recall"] == pytest.approx((1 / 2 + 1) / 2)  # over present classes
    assert ev.metrics["patient_accuracy"] == pytest.approx(2 / 3)


def test_evaluation_stages_do_not_import_torch() -> None:
    code = ("import sys, histoclass.cli, histoclass.metrics, histoclass.evaluate, "
            "histoclass.report; sys.exit('torch' in sys.modules)")
    src = str(Path(histoclass.__file__).parents[1])  # this tree's package, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], check=False, env=env).returncode == 0
