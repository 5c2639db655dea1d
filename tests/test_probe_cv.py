"""``--probe-select cv``: a linear probe's C chosen by patient-disjoint inner CV over train +
val, refitted on both; temperature and referral fitted on the out-of-fold logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.models import load_checkpoint, preprocess_of
from histoclass.models.checkpoint import file_sha256
from histoclass.train import TrainConfig, train
from histoclass.train.features import FeatureCache, setting_key, weights_sha256
from histoclass.train.probe import ABSENT_LOGIT, C_GRID, cv_probe, fit_logreg, inner_folds
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

BASE = {"model": "test_efficientnet", "pretrained": False, "batch_size": 8, "image_size": 64,
        "workers": 0, "device": "cpu", "cache_dir": None, "head": "linear"}


def test_inner_folds_never_split_a_patient_and_hold_out_every_row_once():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(9), 4)
    rng.shuffle(groups)  # rows of a patient scattered through the table
    y = (groups % 2).astype(int)
    folds = inner_folds(y, groups)
    assert len(folds) == 3
    held = np.concatenate([te for _, te in folds])
    assert sorted(held.tolist()) == list(range(len(y)))
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
    with pytest.raises(ValueError, match=r"1 patient.*at least 2"):
        inner_folds(y, np.zeros(len(y), int))


def test_oof_logits_are_out_of_fold_and_the_head_is_refitted_on_all_rows():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(8), 5)
    y = (groups % 2).astype(int)
    x = rng.normal(0, 1, (len(y), 6)) + y[:, None] * 0.8
    got = cv_probe(x, y, groups, select="balanced_accuracy", balanced=False, grid=C_GRID)
    assert got["C"] in C_GRID and got["oof"].shape == (len(y), 2)
    assert got["inner"]["folds"] == 3 and got["inner"]["patients"] == 8
    for tr, te in inner_folds(y, groups):  # each held-out row: a probe that never saw it
        lr, scaler = fit_logreg(x[tr], y[tr], got["C"], False)
        z = scaler.transform(x[te]) @ lr.coef_[0] + lr.intercept_[0]
        assert np.allclose(got["oof"][te], np.stack([-z / 2, z / 2], 1), atol=1e-10)
    lr, scaler = fit_logreg(x, y, got["C"], False)
    assert np.allclose(got["coef"], lr.coef_) and np.allclose(got["mean"], x.mean(0))


def test_a_fold_without_a_class_to_learn_predicts_only_what_it_saw():
    # Patients 0 and 1 are the only malignant ones: a fold holding both out trains on benign
    # rows alone, and its held-out rows get the absent logit for malignant (errors, counted).
    x = np.arange(12, dtype=float)[:, None]
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    got = cv_probe(x, y, groups, select="balanced_accuracy", balanced=False, grid=(1.0,))
    for tr, te in inner_folds(y, groups):
        if len(set(y[tr])) == 1:
            assert (got["oof"][te, 1] == ABSENT_LOGIT).all() and (got["oof"][te, 0] == 0).all()


@pytest.fixture(scope="module")
def one_class_val(tmp_path_factory) -> Path:
    """Train 16 images (3 patients: the val split's malignant one moved there), val 4 images
    of one benign patient: the val split alone cannot choose C."""
    root = tmp_path_factory.mktemp("cv")
    man = synthetic_manifest(root, n_train=12, n_val=8, n_test=4)
    frame = pd.read_csv(man, dtype=str, keep_default_na=False)
    val_mal = (frame["split"] == "val") & (frame["label"] == "malignant")
    frame.loc[val_mal, "split"] = "train"
    frame.to_csv(man, index=False)
    return man


def test_cv_member_is_refitted_on_train_and_val_and_calibrated_out_of_fold(
        one_class_val, tmp_path):
    best = train(TrainConfig(str(one_class_val), str(tmp_path / "cv"), probe_select="cv",
                             feature_cache=str(tmp_path / "fc"), refer_risk=0.3, **BASE))
    model, meta = load_checkpoint(best)
    lin = meta["linear"]
    assert lin["probe_select"] == "cv" and lin["trained_on"] == ["train", "val"]
    assert lin["chosen_on"].startswith("out-of-fold logits of train + val")
    assert meta["calibration"]["fitted_on"] == lin["chosen_on"]
    assert meta["calibration"]["images"] == 20 and meta["temperature"] > 0
    assert meta["refer_risk"]["alpha"] == 0.3 and meta["refer_risk"]["images"] == 20
    # The saved classifier is the probe refitted on every train + val embedding.
    frame = pd.read_csv(one_class_val, dtype=str, keep_default_na=False)
    rows = frame[frame["split"] != "test"]
    key = setting_key(meta["timm_name"], meta["model_args"], weights_sha256(model),
                      preprocess_of(meta), "", "cls", meta["input"])
    cache = FeatureCache(Path(lin["features"]["cache"]), key)
    x = np.stack([cache.get(file_sha256(p)) for p in rows["path"]])
    y = (rows["label"] == "malignant").to_numpy(int)
    lr, scaler = fit_logreg(x, y, lin["C"], False)
    z = scaler.transform(x) @ lr.coef_[0] + lr.intercept_[0]
    with torch.no_grad():
        got = model.get_classifier()(torch.from_numpy(x)).double().numpy()
    assert np.allclose(got, np.stack([-z / 2, z / 2], 1), atol=1e-6)


def test_val_member_now_carries_a_temperature_fitted_on_val(one_class_val, tmp_path):
    best = train(TrainConfig(str(one_class_val), str(tmp_path / "val"),
                             feature_cache=str(tmp_path / "fc"), **BASE))
    meta = load_checkpoint(best)[1]
    assert meta["linear"]["trained_on"] == ["train"]
    assert meta["calibration"]["fitted_on"] == "val split"
    assert meta["calibration"]["images"] == 4  # the benign val patient's 4 images


def test_cli_refusals(one_class_val, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(one_class_val), "--model", "test_efficientnet",
                              "--no-pretrained", "--out", str(tmp_path / "x"),
                              "--probe-select", "cv"])
    assert res.exit_code != 0
    assert "--probe-select cv: chooses a linear probe's C; it needs --head linear" in res.output
    assert "Traceback" not in res.output
    frame = pd.read_csv(one_class_val, dtype=str, keep_default_na=False)
    frame["patient_id"] = "one"
    man = tmp_path / "one.csv"
    frame.to_csv(man, index=False)
    with pytest.raises(ValueError, match="train \\+ val hold 1 patient"):
        train(TrainConfig(str(man), str(tmp_path / "y"), probe_select="cv",
                          feature_cache=str(tmp_path / "fc"), **BASE))


def test_fitted_ensembles_refuse_members_trained_on_val(one_class_val, tmp_path):
    from histoclass.train.ensembles import fit_ensemble

    cv = train(TrainConfig(str(one_class_val), str(tmp_path / "cv"), probe_select="cv",
                           feature_cache=str(tmp_path / "fc"), **BASE))
    val = train(TrainConfig(str(one_class_val), str(tmp_path / "val"),
                            feature_cache=str(tmp_path / "fc"), **BASE))
    with pytest.raises(ValueError, match=r"trained on the validation split \(--probe-select "
                                         r"cv\).*use --method soft or hard"):
        fit_ensemble([cv, val], "stack", manifest=one_class_val, device="cpu", workers=0)
    soft = fit_ensemble([cv, val], "soft", manifest=one_class_val, device="cpu", workers=0)
    assert soft.method == "soft"
    # soft still works but fits no temperature on in-sample outputs, and says why
    assert soft.temperature == 1.0 and "trained on the validation split" in \
        soft.calibration["reason"]
