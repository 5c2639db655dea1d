"""Hand-computed answers for every metric, patient aggregation and the patient bootstrap."""

from __future__ import annotations

import logging
from math import sqrt

import numpy as np
import pandas as pd
import pytest

from histoclass.metrics import (
    auc,
    binary_metrics,
    bootstrap_ci,
    ece,
    mcc_from_confusion,
    multiclass_metrics,
    patient_accuracy,
    patient_recognition_rate,
    reliability,
    top_label,
)

# Ten images, 6 malignant then 4 benign. Threshold 0.5 calls the first four malignant images
# (TP=4) and the last two benign ones (FP=2) malignant; FN=2 (0.35, 0.25), TN=2 (0.15, 0.05).
Y10 = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
P10 = [0.95, 0.85, 0.75, 0.65, 0.35, 0.25, 0.15, 0.05, 0.65, 0.55]


def test_binary_metrics_ten_images() -> None:
    m = binary_metrics(Y10, P10, threshold=0.5)
    assert m["accuracy"] == pytest.approx(6 / 10)  # (TP+TN)/N
    assert m["precision"] == pytest.approx(4 / 6)  # TP/(TP+FP)
    assert m["recall"] == pytest.approx(4 / 6)  # TP/(TP+FN)
    assert m["specificity"] == pytest.approx(2 / 4)  # TN/(TN+FP)
    assert m["f1"] == pytest.approx(8 / 12)  # 2TP/(2TP+FP+FN)
    assert m["balanced_accuracy"] == pytest.approx((4 / 6 + 2 / 4) / 2)  # 7/12
    assert m["mcc"] == pytest.approx((4 * 2 - 2 * 2) / sqrt(6 * 6 * 4 * 4))  # 1/6
    assert m["roc_auc"] == pytest.approx(13 / 16)  # pair count below
    assert m["ece"] == pytest.approx(0.24)  # bins below


def test_threshold_moves_the_operating_point_not_auc_or_ece() -> None:
    # At 0.7: TP=3 (0.95, 0.85, 0.75), FP=0, FN=3, TN=4.
    m = binary_metrics(Y10, P10, threshold=0.7)
    assert (m["precision"], m["recall"], m["specificity"]) == (1.0, 0.5, 1.0)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["roc_auc"] == pytest.approx(13 / 16)
    assert m["ece"] == pytest.approx(0.24)
    # p == threshold is a malignant call
    tie = binary_metrics([1, 0], [0.5, 0.4])
    assert (tie["recall"], tie["specificity"], tie["accuracy"]) == (1.0, 1.0, 1.0)


def test_roc_auc_by_pair_counting_with_a_tie() -> None:
    # 24 malignant/benign pairs. Benign 0.15 and 0.05 rank below all 6 (12 pairs); benign 0.65
    # is below 0.95, 0.85, 0.75 and ties 0.65 (3.5); benign 0.55 is below 4. 19.5 / 24 = 13/16.
    assert auc(Y10, P10) == pytest.approx(19.5 / 24)
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_binary_ece_from_explicit_bins() -> None:
    # Top-label confidence max(p, 1-p) and whether the top label (p >= 0.5) is right:
    # 0.55 (wrong)              bin (8/15, 9/15]:   1/10 * |0 - 0.55|    = 0.055
    # 0.65 x3 (right, 2 wrong)  bin (9/15, 10/15]:  3/10 * |1/3 - 0.65|  = 0.095
    # 0.75 x2 (1 right)         bin (11/15, 12/15]: 2/10 * |1/2 - 0.75|  = 0.050
    # 0.85 x2 (both right)      bin (12/15, 13/15]: 2/10 * |1 - 0.85|    = 0.030
    # 0.95 x2 (both right)      bin (14/15, 1]:     2/10 * |1 - 0.95|    = 0.010
    correct, conf = top_label(Y10, np.array(P10))
    assert conf.tolist() == pytest.approx([0.95, 0.85, 0.75, 0.65, 0.65, 0.75, 0.85, 0.95, 0.65,
                                           0.55])
    assert ece(correct, conf) == pytest.approx(0.055 + 0.095 + 0.05 + 0.03 + 0.01)
    n, acc, mean_conf = reliability(correct, conf)
    assert n.tolist() == [0] * 8 + [1, 3, 0, 2, 2, 0, 2]
    assert acc[9] == pytest.approx(1 / 3) and np.isnan(acc[0])
    assert mean_conf[11] == pytest.approx(0.75)


def test_ece_of_a_perfectly_calibrated_bin_is_zero() -> None:
    # Four images at confidence 0.75, three right: accuracy equals confidence.
    assert ece([1, 1, 1, 0], [0.75] * 4) == pytest.approx(0.0)
    assert ece([1, 1], [0.5, 1.0], n_bins=2) == pytest.approx(0.5 / 2)  # bin (0, .5]: |1 - .5|


# Three classes, six images; argmax predictions [0, 1, 1, 1, 2, 0].
Y6 = [0, 0, 1, 1, 2, 2]
P6 = [[0.7, 0.2, 0.1], [0.3, 0.65, 0.05], [0.1, 0.85, 0.05],
      [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]]


def test_multiclass_metrics_hand_computed() -> None:
    m = multiclass_metrics(Y6, P6)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recall per class 1/2, 2/2, 1/2
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    # precision: class 0 called twice (1 right), class 1 three times (2 right), class 2 once
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)  # 13/18
    # F1 = 2TP/(2TP+FP+FN): 2/4, 4/5, 2/3
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)  # 59/90
    # specificity TN/(TN+FP): 3/4, 3/4, 4/4
    assert m["specificity"] == pytest.approx(5 / 6)
    # Gorodkin: c=4, s=6, t=(2,2,2), p=(2,3,1): (24-12)/sqrt((36-14)(36-12))
    assert m["mcc"] == pytest.approx(12 / sqrt(22 * 24))
    # one-vs-rest AUC: 7/8, 7/8, 1
    assert m["roc_auc"] == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)
    # ECE: conf .5 x2 (1 right) 0; .65 wrong .65/6; .7 x2 right 2*.3/6; .85 right .15/6
    assert m["ece"] == pytest.approx(7 / 30)


def test_mcc_binary_confusion() -> None:
    assert mcc_from_confusion(np.array([[2, 2], [2, 4]])) == pytest.approx(1 / 6)
    assert mcc_from_confusion(np.array([[5, 0], [0, 5]])) == pytest.approx(1.0)
    assert mcc_from_confusion(np.array([[0, 5], [5, 0]])) == pytest.approx(-1.0)


def test_undefined_metrics_are_none_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="histoclass.metrics"):
        m = binary_metrics([0, 0, 0], [0.1, 0.6, 0.2])
    # no malignant image: recall, balanced accuracy, ROC-AUC and MCC have no denominator
    assert m["recall"] is None and m["roc_auc"] is None and m["mcc"] is None
    assert m["balanced_accuracy"] is None
    assert m["specificity"] == pytest.approx(2 / 3) and m["precision"] == 0.0
    assert "roc_auc is undefined (only one class present)" in caplog.text
    assert "recall is undefined" in caplog.text
    one = multiclass_metrics([1, 1], [[0.2, 0.8], [0.6, 0.4]])
    assert one["roc_auc"] is None and one["specificity"] is None and one["accuracy"] == 0.5


def test_patient_recognition_rate_and_patient_accuracy_differ() -> None:
    # A: 3 malignant images, p .9 .4 .4 -> 1/3 right; mean .567 -> patient right
    # B: 1 benign image, p .2 -> right; patient right
    # C: 2 malignant images, p .6 .1 -> 1/2 right; mean .35 -> patient wrong
    ids, y, p = list("AAABCC"), [1, 1, 1, 0, 1, 1], np.array([0.9, 0.4, 0.4, 0.2, 0.6, 0.1])
    correct = (p >= 0.5) == np.array(y)
    assert correct.mean() == 0.5  # image accuracy
    assert patient_recognition_rate(ids, correct) == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert patient_accuracy(ids, y, p) == pytest.approx(2 / 3)
    assert patient_accuracy(ids, y, p, threshold=0.6) == pytest.approx(1 / 3)  # A .567 < .6


def test_patient_accuracy_multiclass_uses_mean_probabilities_and_majority_label() -> None:
    # A: mean (0.55, 0.45) -> class 0, true 0. B: images of classes 1, 1, 2 judged as 1;
    # mean probs (0.1, 0.3, 0.6) -> class 2, wrong.
    ids, y = ["A", "A", "B", "B", "B"], [0, 0, 1, 1, 2]
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.5, 0.4], [0.1, 0.2, 0.7],
                      [0.1, 0.2, 0.7]])
    assert patient_accuracy(ids, y, probs) == 0.5


def _cohort(n_patients: int = 40, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = i % 2
        for _ in range(int(rng.integers(2, 6))):
            rows.append({"patient_id": f"P{i}", "y": label,
                         "p": float(np.clip(rng.normal(0.3 + 0.4 * label, 0.2), 0, 1))})
    return pd.DataFrame(rows)


def _fn(frame: pd.DataFrame) -> dict:
    return binary_metrics(frame["y"], frame["p"])


def test_bootstrap_is_seeded_and_covers_the_estimate() -> None:
    frame = _cohort()
    a = bootstrap_ci(_fn, frame, n=200, seed=0)
    assert a == bootstrap_ci(_fn, frame, n=200, seed=0)
    assert a != bootstrap_ci(_fn, frame, n=200, seed=1)
    point = _fn(frame)
    for key in ("accuracy", "roc_auc", "f1", "mcc"):
        lo, hi = a[key]
        assert lo <= point[key] <= hi and lo < hi


def test_bootstrap_resamples_whole_patients() -> None:
    # A has 1 image, B has 3: a cluster replicate holds 2 (AA), 4 (AB) or 6 (BB) images, and
    # always 2 patients, a patient drawn twice counting twice.
    frame = pd.DataFrame({"patient_id": ["A", "B", "B", "B"], "y": [1, 0, 0, 0]})
    ci = bootstrap_ci(lambda f: {"images": len(f), "patients": f["patient_id"].nunique()},
                      frame, n=100, seed=0, level=1.0)
    assert ci == {"images": [2.0, 6.0], "patients": [2.0, 2.0]}
    sizes = bootstrap_ci(lambda f: {"odd": len(f) % 2}, frame, n=100, seed=0, level=1.0)
    assert sizes["odd"] == [0.0, 0.0]


def test_bootstrap_undefined_everywhere_is_none_and_bad_n_is_refused() -> None:
    frame = pd.DataFrame({"patient_id": ["A", "B"], "y": [0, 0], "p": [0.2, 0.7]})
    assert bootstrap_ci(_fn, frame, n=20)["roc_auc"] is None
    with pytest.raises(ValueError, match="bootstrap replicates must be >= 1, got 0"):
        bootstrap_ci(_fn, frame, n=0)


def test_bad_labels_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels must be class indices 0..1 .*got \[2\]"):
        binary_metrics([0, 2], [0.1, 0.9])
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        binary_metrics([0, 1, 1], [0.1, 0.9])
    with pytest.raises(ValueError, match=r"probs must be an \(n, K\) matrix, got shape \(2,\)"):
        multiclass_metrics([0, 1], [0.1, 0.9])
    with pytest.raises(ValueError, match=r"class indices 0..1 .*got \[-1, 5\]"):
        multiclass_metrics([5, -1], [[0.5, 0.5], [0.5, 0.5]])
