"""An ensemble's own temperature and ``--refer-risk`` rule: fitted on its combined validation
probabilities, stored in the ensemble file, applied at predict time, in the ONNX graph and in
a published folder; hand-computed on members with known, constant outputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers_predict import make_member, sample_manifest, train_member
from histoclass.calibration import clopper_pearson_upper
from histoclass.cli import app
from histoclass.data import make_split, scan, write_manifest
from histoclass.data.manifest import sample_path
from histoclass.models.ensemble import load_model_file
from histoclass.predict import predict_manifest
from histoclass.train import fit_ensemble

# Both members say p(benign) = 0.9 for every image. The val split below holds 9 benign and 3
# malignant images, so the top label is right on 3/4 of them: the NLL-optimal calibrated
# confidence is 0.75, i.e. softmax(log(p) / T) with 9 ** (1 / T) = 3, T = ln 9 / ln 3 = 2.
CONSTANT = [math.log(0.9), math.log(0.1)]


@pytest.fixture(scope="module")
def constant(tmp_path_factory):
    root = tmp_path_factory.mktemp("enscal")
    frame = make_split(scan(sample_path("ucsb")).frame, "patient", val=0.3, test=0.3, seed=0)
    val = frame["patient_id"].isin(["ytma10_010704", "ytma55_030603"])
    test = frame["patient_id"] == "ytma12_010804"
    frame["split"] = np.where(val, "val", np.where(test, "test", "train"))
    assert frame.loc[val, "label"].value_counts().to_dict() == {"benign": 9, "malignant": 3}
    manifest = write_manifest(frame, root / "manifest.csv")
    members = [make_member(root / f"m{i}.pt", size=32, seed=i, bias=CONSTANT) for i in range(2)]
    return manifest, members, root


def test_soft_temperature_and_threshold_by_hand(constant, tmp_path):
    manifest, members, _ = constant
    upper = clopper_pearson_upper(3, 12, 0.1)  # 3 errors among 12 accepted images
    ens = fit_ensemble(members, "soft", manifest, refer_risk=upper + 0.01, refer_delta=0.1)
    assert ens.temperature == pytest.approx(2.0, abs=1e-4)
    c = ens.calibration
    assert c["fitted_on"] == "val split: 12 image(s)" and c["images"] == 12
    assert c["ece_before"] == pytest.approx(0.15, abs=1e-5)  # confidence 0.9, accuracy 0.75
    assert c["ece_after"] == pytest.approx(0.0, abs=1e-4)
    rule = ens.refer_risk
    assert rule["threshold"] == pytest.approx(0.75, abs=1e-4)
    assert rule["upper"] == pytest.approx(upper) and rule["val_coverage"] == 1.0
    back = load_model_file(ens.save(tmp_path / "soft.pt"))
    assert (back.temperature, back.refer_risk) == (ens.temperature, rule)
    frame = predict_manifest(back, manifest, "test").frame
    assert frame["p_malignant"].to_numpy() == pytest.approx(0.25, abs=1e-4)
    assert frame["raw.p_malignant"].to_numpy() == pytest.approx(0.1, abs=1e-4)
    assert frame.filter(like="member.").iloc[:, 0].to_numpy() == pytest.approx(0.1, abs=1e-5)
    # below the bound no threshold attains it: no rule, and the reason is kept
    strict = fit_ensemble(members, "soft", manifest, refer_risk=upper - 0.01)
    assert strict.refer_risk["threshold"] is None
    assert "no confidence threshold bounds the error" in strict.refer_risk["reason"]


def test_a_small_temperature_keeps_the_raw_probabilities_recoverable(constant, tmp_path):
    from histoclass.models.ensemble import Ensemble, load_member

    _, members, _ = constant
    loaded = [load_member(m, f"m{i}") for i, m in enumerate(members)]
    # T = 0.01 takes p(malignant) 0.1 to 1 / (1 + 9 ** 100), about 1e-95: float32 would round
    # it to 0 and lose the raw 0.1; the PyTorch path keeps float64
    path = Ensemble(loaded, "soft", member_paths=members, temperature=0.01).save(tmp_path / "e")
    images = [str(p) for p in sorted(sample_path("ucsb").rglob("*.jpg"))[:2]]
    from histoclass.predict import predict_paths

    frame = predict_paths(load_model_file(path), images).frame
    assert (frame["p_malignant"] > 0).all() and (frame["p_malignant"] < 1e-90).all()
    assert frame["raw.p_malignant"].to_numpy() == pytest.approx(0.1, abs=1e-6)


def test_soft_without_a_usable_val_split_still_works_and_says_why(constant, tmp_path):
    manifest, members, _ = constant
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    none = tmp_path / "noval.csv"
    frame.assign(split=frame["split"].replace("val", "train")).to_csv(none, index=False)
    ens = fit_ensemble(members, "soft", none)
    assert ens.temperature == 1.0 and "no validation rows" in ens.calibration["reason"]
    with pytest.raises(ValueError, match="no validation rows"):
        fit_ensemble(members, "soft", none, refer_risk=0.1)
    quiet = fit_ensemble(members, "soft", manifest, calibrate="none")
    assert quiet.calibration["reason"] == "calibration none" and quiet.temperature == 1.0


def test_hard_fits_no_temperature_but_states_a_rule_on_vote_share(constant):
    manifest, members, _ = constant
    ens = fit_ensemble(members, "hard", manifest, refer_risk=0.6)
    assert ens.temperature == 1.0 and "vote share" in ens.calibration["reason"]
    assert ens.refer_risk["threshold"] == pytest.approx((2 + 1e-3 * 0.9) / (2 + 1e-3))


@pytest.mark.parametrize("method", ["stack", "concat"])
def test_fitted_methods_calibrate_on_the_stop_rows(constant, method):
    manifest, members, _ = constant
    ens = fit_ensemble(members, method, manifest)
    assert ens.calibration["images"] == ens.fit["stop_rows"]
    assert ens.calibration["fitted_on"].startswith("val stop rows")
    assert f"{ens.fit['fit_rows']})" in ens.calibration["fitted_on"]


def test_cli_options_line_and_refusals(constant, tmp_path):
    manifest, members, _ = constant
    runner = CliRunner()
    out = tmp_path / "e.pt"
    res = runner.invoke(app, ["ensemble", *map(str, members), "--method", "soft", "--manifest",
                              str(manifest), "--refer-risk", "0.49", "--out", str(out),
                              "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "temperature 2.000 fitted on val split: 12 image(s)" in res.output
    assert "refer below confidence 0.750" in res.output
    res = runner.invoke(app, ["ensemble", *map(str, members), "--method", "soft",
                              "--out", str(tmp_path / "n.pt")])
    assert res.exit_code == 0, res.output
    assert "not fitted (no --manifest" in res.output
    res = runner.invoke(app, ["ensemble", *map(str, members), "--method", "soft",
                              "--refer-risk", "0.1", "--out", str(tmp_path / "r.pt")])
    assert res.exit_code == 2 and "--refer-risk is chosen on a validation split" in res.output
    res = runner.invoke(app, ["ensemble", *map(str, members), "--method", "soft", "--manifest",
                              str(manifest), "--calibrate", "platt", "--out",
                              str(tmp_path / "p.pt")])
    assert res.exit_code == 2 and "platt" in res.output


def test_malicious_temperature_is_an_error_naming_the_file(constant, tmp_path):
    import torch

    from histoclass.models import CheckpointError

    manifest, members, _ = constant
    path = fit_ensemble(members, "soft", manifest).save(tmp_path / "e.pt")
    obj = torch.load(path, weights_only=True)
    for bad in (float("nan"), -1.0, "2"):
        torch.save({**obj, "temperature": bad}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=r"bad\.pt: ensemble temperature"):
            load_model_file(tmp_path / "bad.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("enscal-real")
    manifest = sample_manifest(root)
    members = [train_member(manifest, root / f"r{s}" / "best.pt", seed=s, steps=3 + s)
               for s in range(2)]
    return manifest, members, root


@pytest.mark.parametrize("method", ["soft", "concat"])
def test_onnx_graph_carries_the_ensemble_temperature(trained, method, tmp_path):
    import onnx

    from histoclass.deploy.runtime import OnnxClassifier

    manifest, members, _ = trained
    path = fit_ensemble(members, method, manifest, refer_risk=0.4).save(tmp_path / "e.pt")
    ens = load_model_file(path)
    assert abs(ens.temperature - 1.0) > 1e-3  # a real rescaling to carry
    res = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "e.onnx")])
    assert res.exit_code == 0, res.output
    meta = {p.key: p.value for p in onnx.load(tmp_path / "e.onnx").metadata_props}
    assert float(meta["temperature"]) == pytest.approx(ens.temperature)
    assert meta["temperature_in_graph"] == "true"
    assert meta["confidence_threshold"] == str(ens.confidence_threshold).replace("None", "null")
    frame = pd.read_csv(manifest)
    paths = list(frame["path"])
    got = predict_manifest(OnnxClassifier(tmp_path / "e.onnx"), manifest, "test").frame
    ref = predict_manifest(ens, manifest, "test").frame
    assert len(paths) and np.abs(got["p_malignant"] - ref["p_malignant"]).max() < 1e-4
    assert np.abs(got["raw.p_malignant"] - ref["raw.p_malignant"]).max() < 1e-4


def test_published_ensemble_keeps_its_calibration(trained, tmp_path):
    from histoclass.deploy.publish import publish

    manifest, members, _ = trained
    path = fit_ensemble(members, "soft", manifest, refer_risk=0.4).save(tmp_path / "e.pt")
    ens = load_model_file(path)
    publish(path, tmp_path / "pub")
    back = load_model_file(f"local-dir:{tmp_path / 'pub'}")
    assert back.temperature == pytest.approx(ens.temperature)
    assert back.refer_risk == ens.refer_risk and back.calibration == ens.calibration
    a = predict_manifest(ens, manifest, "test").frame
    b = predict_manifest(back, manifest, "test").frame
    assert np.abs(a["p_malignant"] - b["p_malignant"]).max() < 1e-6
