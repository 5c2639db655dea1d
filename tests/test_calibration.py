"""Temperature, ECE/Brier, Clopper-Pearson and the referral threshold, against hand-computed
answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from histoclass import calibration as cal


def test_temperature_recovers_the_analytic_optimum():
    # logits (2, 0) for every image, 3 of 4 labelled 0: the NLL optimum has
    # sigmoid(2 / T) = 3/4, so T = 2 / ln 3
    logits = np.tile([2.0, 0.0], (4, 1))
    assert cal.fit_temperature(logits, [0, 0, 0, 1]) == pytest.approx(2 / np.log(3), rel=1e-4)


def test_temperature_needs_images():
    with pytest.raises(ValueError, match="0 images"):
        cal.fit_temperature(np.zeros((0, 2)), [])


def test_ece_and_brier_by_hand():
    p = np.array([[0.9, 0.1], [0.6, 0.4]])
    # top labels 0 (conf 0.9, right), 0 (conf 0.6, wrong): bins apart -> (0.1 + 0.6) / 2
    assert cal.ece(p, [0, 1]) == pytest.approx(0.35)
    # (0.01 + 0.01 + 0.36 + 0.36) / 2
    assert cal.brier(p, [0, 1]) == pytest.approx(0.37)
    assert cal.brier(np.zeros((0, 2)), []) is None


def test_clopper_pearson_upper():
    assert cal.clopper_pearson_upper(2, 20, 0.05) == pytest.approx(beta.ppf(0.95, 3, 18))
    assert cal.clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** 0.1)
    assert cal.clopper_pearson_upper(5, 5, 0.05) == 1.0
    with pytest.raises(ValueError, match="k=6, n=5"):
        cal.clopper_pearson_upper(6, 5, 0.05)


def test_refer_threshold_on_a_hand_made_set():
    conf = np.linspace(0.99, 0.60, 20)
    correct = np.array([True] * 15 + [False, False, True, False, False])
    # alpha 0.3, delta 0.05: fewer than 9 images can never pass (1 - 0.05 ** (1/8) = 0.312);
    # n = 9..15 have 0 errors (pass), n = 16 has 1 (beta.ppf(.95, 2, 15) = 0.271, pass),
    # n = 17 has 2 (beta.ppf(.95, 3, 15) = 0.333 > 0.3): stop, threshold = 16th confidence
    assert beta.ppf(0.95, 2, 15) < 0.3 < beta.ppf(0.95, 3, 15)
    rule = cal.choose_refer_threshold(conf, correct, alpha=0.3)
    assert rule["threshold"] == pytest.approx(conf[15])
    assert rule["val_coverage"] == pytest.approx(16 / 20) and rule["val_n"] == 20
    assert rule["val_error"] == pytest.approx(1 / 16)


def test_refer_threshold_refuses_when_nothing_passes():
    assert cal.choose_refer_threshold([0.9] * 5, [True] * 5, alpha=0.05) is None
    with pytest.raises(ValueError, match="alpha"):
        cal.choose_refer_threshold([0.9], [True], alpha=0.0)


def test_calibrate_logits_recovers_a_known_scale():
    # logits k * (ln 3, 0), 3 of 4 labelled 0: softmax(logits / k) gives 3/4, the empirical
    # rate, so the NLL optimum is T = k exactly
    logits = np.tile([3 * np.log(3), 0.0], (4, 1))
    rec = cal.calibrate_logits(logits, [0, 0, 0, 1])
    assert rec["temperature"] == pytest.approx(3.0, rel=1e-4)
    c = rec["calibration"]
    assert c["images"] == 4 and c["nll_after"] < c["nll_before"]
    # after: confidence 0.75 and accuracy 0.75 in one bin
    assert c["ece_after"] == pytest.approx(0.0, abs=1e-4)
    assert rec["refer_risk"] is None


def test_calibrate_logits_none_and_no_images():
    logits = np.tile([3 * np.log(3), 0.0], (4, 1))
    rec = cal.calibrate_logits(logits, [0, 0, 0, 1], method="none")
    assert rec["temperature"] == 1.0 and rec["calibration"]["reason"] == "calibration none"
    empty = cal.calibrate_logits(np.zeros((0, 2)), [])
    assert empty["temperature"] == 1.0
    assert empty["calibration"] == {"images": 0, "method": "temperature",
                                    "reason": "no validation images"}
    with pytest.raises(ValueError, match="choose one of temperature, none"):
        cal.calibrate_logits(logits, [0, 0, 0, 1], method="platt")


def test_calibrate_logits_refer_rule_and_refusal():
    # 20 images, logits (s, 0) with the 5 lowest confidences holding 4 errors: the rule of
    # test_refer_threshold_on_a_hand_made_set, on probabilities of one fixed T (method none)
    conf = np.linspace(0.99, 0.60, 20)
    logits = np.stack([np.log(conf / (1 - conf)), np.zeros(20)], axis=1)
    labels = np.array([0] * 15 + [1, 1, 0, 1, 1])
    rec = cal.calibrate_logits(logits, labels, method="none", refer_risk=0.3, refer_delta=0.05)
    rule = rec["refer_risk"]
    assert rule["threshold"] == pytest.approx(conf[15]) and rule["accepted"] == 16
    assert rule["method"] == "Clopper-Pearson fixed-sequence (Learn then Test)"
    assert rule["images"] == 20 and rule["delta"] == 0.05
    # 0 errors in 20 images cannot bound the error at 0.01 (1 - 0.05 ** (1/20) = 0.139)
    refused = cal.calibrate_logits(logits, labels, method="none", refer_risk=0.01)["refer_risk"]
    assert refused["threshold"] is None and "no confidence threshold" in refused["reason"]


def test_evaluate_writes_calibration_json(tmp_path):
    import json

    import pandas as pd

    from histoclass.evaluate import evaluate_files, write_outputs

    p = [0.9, 0.2, 0.6, 0.45]
    pd.DataFrame({
        "path": [f"{i}.png" for i in range(4)], "patient_id": ["a", "a", "b", "b"],
        "magnification": "40X", "label": ["malignant", "benign", "benign", "malignant"],
        "split": "test", "p_malignant": p, "pred": "", "confidence": [max(q, 1 - q) for q in p],
        "refer": [0, 0, 1, 1],
        "refer_reason": ["", "", "low confidence 0.60 < 0.80",
                         "low confidence 0.55 < 0.80"]}).to_csv(tmp_path / "p.csv",
                                                                     index=False)
    from histoclass.report import write_report

    ev = evaluate_files([tmp_path / "p.csv"], bootstrap=0)
    write_outputs(ev, tmp_path / "ev")
    page = write_report(ev, tmp_path / "ev" / "report.html").read_text()
    assert "The --refer-risk rule kept 0.500 of the images with error 0.000" in page
    got = json.loads((tmp_path / "ev" / "calibration.json").read_text())
    # confidences 0.9, 0.8 right and 0.6, 0.55 wrong, each in its own of 15 bins
    assert got["ece"] == pytest.approx((0.1 + 0.2 + 0.6 + 0.55) / 4)
    assert got["brier"] == pytest.approx((0.02 + 0.08 + 0.72 + 0.605) / 4)
    assert (got["coverage"], got["selective_error"], got["bins"]) == (0.5, 0.0, 15)
    assert got["ci95"] is None and got["ci_note"] == "n/a: bootstrap 0"
    # accept conf >= t for t = 0.9, 0.8, 0.6, 0.55: errors 0/1, 0/2, 1/3, 2/4
    curve = got["risk_coverage"]
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["selective_error"] == pytest.approx([0, 0, 1 / 3, 0.5])
    assert curve["aurc"] == pytest.approx((1 / 3 + 0.5) / 4)
    assert curve["aurc_oracle"] == pytest.approx(curve["aurc"])  # the errors are already last
    assert not got["calibrated"] and got["ece_before"] is None


def test_recovered_raw_is_empty_where_a_probability_underflowed():
    # T = 0.5 sharpened the raw (1/4, 3/4)-ish row: raw = sqrt(p) renormalised
    got = cal.recovered(np.array([[0.0, 1.0], [0.25, 0.75]]), 0.5)
    r = np.sqrt([0.25, 0.75])
    assert np.isnan(got[0]).all() and got[1] == pytest.approx(r / r.sum())
    # T > 1 softens: an exact 0 was already 0 before it
    assert cal.recovered(np.array([[0.0, 1.0]]), 2.0)[0] == pytest.approx([0.0, 1.0])


def test_folds_with_and_without_a_temperature_pool_into_one_before(tmp_path):
    import json

    import pandas as pd

    from histoclass.evaluate import evaluate_files, write_outputs

    def fold(name, p, raw=None):
        frame = pd.DataFrame({"path": [f"{name}{i}.png" for i in range(2)],
                              "patient_id": [f"{name}a", f"{name}b"], "magnification": "40X",
                              "label": ["malignant", "benign"], "split": "test",
                              "p_malignant": p, "pred": "", "confidence": [max(q, 1 - q)
                                                                           for q in p]})
        if raw is not None:
            frame["raw.p_malignant"] = raw
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        return tmp_path / f"{name}.csv"

    # fold a: T = 2 (raw 0.9/0.1 -> 0.75/0.25); fold b: T = 1, no raw columns (raw = p)
    files = [fold("a", [0.75, 0.25], [0.9, 0.1]), fold("b", [0.6, 0.4])]
    write_outputs(evaluate_files(files, bootstrap=0), tmp_path / "ev")
    got = json.loads((tmp_path / "ev" / "calibration.json").read_text())
    # every top label is right: ECE = mean(1 - confidence)
    assert got["ece_before"] == pytest.approx((0.1 + 0.1 + 0.4 + 0.4) / 4)
    assert got["ece"] == pytest.approx((0.25 + 0.25 + 0.4 + 0.4) / 4)
    assert got["before_rows_unknown"] == 0


def test_risk_coverage_ties_move_together_and_the_oracle_is_the_floor():
    # two confidence levels, one error in each: the curve has two points, not four
    curve = cal.risk_coverage([0.9, 0.9, 0.6, 0.6], [True, False, True, False])
    assert curve["threshold"] == [0.9, 0.6] and curve["coverage"] == [0.5, 1.0]
    assert curve["aurc"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    # oracle: 2 right first (risk 0, 0), then 1/3, 2/4
    assert curve["aurc_oracle"] == pytest.approx((1 / 3 + 0.5) / 4)
    assert cal.risk_coverage([], []) is None


def test_evaluate_and_report_before_and_after_the_temperature(tmp_path):
    import json

    import pandas as pd

    from histoclass.evaluate import evaluate_files, write_outputs
    from histoclass.report import write_report

    # raw p 0.9 for 4 images, 2 right; after T = 2: sqrt-renormalised 0.75
    raw, after = 0.9, 0.75
    pd.DataFrame({
        "path": [f"{i}.png" for i in range(4)], "patient_id": ["a", "a", "b", "b"],
        "magnification": "40X", "label": ["malignant", "benign", "malignant", "benign"],
        "split": "test", "p_malignant": after, "raw.p_malignant": raw, "pred": "",
        "confidence": after}).to_csv(tmp_path / "p.csv", index=False)
    ev = evaluate_files([tmp_path / "p.csv"], bootstrap=0)
    write_outputs(ev, tmp_path / "ev")
    got = json.loads((tmp_path / "ev" / "calibration.json").read_text())
    assert got["calibrated"] and got["note"] is None
    assert (got["ece_before"], got["ece"]) == pytest.approx((0.4, 0.25))
    # Brier: half right (p_true = p), half wrong (p_true = 1 - p): mean of 2(1-p)^2 and 2p^2
    assert got["brier_before"] == pytest.approx((2 * 0.1 ** 2 + 2 * 0.9 ** 2) / 2)
    assert got["brier"] == pytest.approx((2 * 0.25 ** 2 + 2 * 0.75 ** 2) / 2)
    bins = got["reliability"]
    assert bins["before"]["count"][13] == 4 and bins["after"]["count"][11] == 4
    assert bins["before"]["accuracy"][13] == 0.5 and bins["after"]["confidence"][11] == 0.75
    page = write_report(ev, tmp_path / "ev" / "report.html").read_text()
    # confusion, ROC, reliability before and after, risk-coverage
    assert page.count("data:image/png;base64,") == 5
    assert "before the temperature (raw.p_ columns)" in page and "not calibrated" not in page
    assert "No image was referred for low confidence: the model carries no" in page


def test_a_temperature_at_the_edge_of_its_range_is_noted(caplog):
    # Every image right with margin: the NLL falls as T -> 0 without end, so T stops at the
    # lower bound exp(-4.6) (in floating point, earlier), and the record says the optimum
    # lies beyond it.
    z = np.array([[0.0, 3.0], [3.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    rec = cal.calibrate_logits(z, [1, 0, 1, 0])
    assert rec["temperature"] < 0.05
    assert "edge of the search range" in rec["calibration"]["note"]
    assert "optimum lies beyond" in caplog.text
    assert "note" not in cal.calibrate_logits(z, [1, 0, 0, 1])["calibration"]
