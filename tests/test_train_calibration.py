"""Training stores a temperature and a referral rule fitted on the validation split."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from histoclass import calibration as cal
from histoclass.models import read_checkpoint
from histoclass.train import TrainConfig, train
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

TINY = "test_efficientnet"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    path = synthetic_manifest(root)
    frame = pd.read_csv(path)
    for p in frame.loc[frame["split"] == "test", "path"]:
        os.remove(p)
    return path


def tiny(manifest: Path, out: Path, **kw) -> TrainConfig:
    base = {"model": TINY, "pretrained": False, "epochs": 2, "batch_size": 8, "image_size": 64,
            "workers": 0, "lr": 1e-2, "head_lr": 1e-2, "device": "cpu"}
    return TrainConfig(str(manifest), str(out), **{**base, **kw})


def _val_logits(best: Path, cfg: TrainConfig):
    import torch

    from histoclass.data.transforms import Preprocess
    from histoclass.models.checkpoint import build_model
    from histoclass.train.data import build_data
    from histoclass.train.distributed import setup
    from histoclass.train.epoch import collect_logits

    ckpt = read_checkpoint(best)
    model = build_model(ckpt["meta"])
    model.load_state_dict(ckpt["state_dict"])
    d = setup("cpu")
    data = build_data(cfg, d)
    data.make_datasets(Preprocess.from_dict(ckpt["meta"]["preprocess"]))
    with torch.no_grad():
        z, y = collect_logits(model, data.val_loader, d)
    return z.numpy(), y.numpy()


def test_train_stores_the_val_temperature_and_a_refused_rule(manifest, tmp_path):
    cfg = tiny(manifest, tmp_path / "run", refer_risk=0.01)
    meta = read_checkpoint(train(cfg))["meta"]
    z, y = _val_logits(tmp_path / "run" / "best.pt", cfg)
    assert len(y) == 8 and meta["calibration"]["images"] == 8
    assert meta["temperature"] == pytest.approx(cal.fit_temperature(z, y), rel=1e-3)
    assert meta["calibration"]["nll_after"] <= meta["calibration"]["nll_before"] + 1e-9
    # 8 images can never bound the error at 0.01 (even 0 errors need 230): no threshold
    rule = meta["refer_risk"]
    assert rule["threshold"] is None and "no confidence threshold" in rule["reason"]
    assert rule["alpha"] == 0.01 and rule["delta"] == 0.1


def test_train_calibrate_none_and_bad_risk(manifest, tmp_path):
    meta = read_checkpoint(train(tiny(manifest, tmp_path / "run", epochs=1,
                                      calibrate="none")))["meta"]
    assert meta["temperature"] == 1.0 and meta["refer_risk"] is None
    assert meta["calibration"]["reason"] == "calibration none"
    with pytest.raises(ValueError, match=r"--refer-risk 1.5: must be in \(0, 1\)"):
        train(tiny(manifest, tmp_path / "x", refer_risk=1.5))
    with pytest.raises(ValueError, match=r"--calibrate 'platt': choose one of temperature"):
        train(tiny(manifest, tmp_path / "x", calibrate="platt"))


def test_cli_train_refer_risk_then_predict_shows_confidence_and_reason(manifest, tmp_path):
    from typer.testing import CliRunner

    from histoclass.cli import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", str(manifest), "--out", str(run), "--model", TINY, "--no-pretrained",
        "--epochs", "3", "--batch-size", "8", "--image-size", "64", "--lr", "1e-2",
        "--head-lr", "1e-2", "--workers", "0", "--device", "cpu", "--refer-risk", "0.5"])
    assert res.exit_code == 0, res.output
    meta = read_checkpoint(run / "best.pt")["meta"]
    rule = meta["refer_risk"]
    assert rule["alpha"] == 0.5 and rule["delta"] == 0.1 and rule["images"] == 8
    images = sorted(str(p) for p in (Path(manifest).parent / "images").glob("*.png"))[:6]
    res = CliRunner().invoke(app, ["predict", str(run / "best.pt"), *images, "--out",
                                   str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert (frame["confidence"] >= 0.5).all()
    if meta["temperature"] != 1.0:
        assert "raw.p_malignant" in frame.columns
    if rule["threshold"] is None:  # 8 val images: a refusal is stated, never a fake rule
        assert "no confidence threshold" in rule["reason"] and "refer" not in frame.columns
    else:
        low = frame["confidence"] < rule["threshold"]
        assert frame["refer"].tolist() == low.astype(int).tolist()
        assert all(r.startswith("low confidence") for r in frame.loc[low, "refer_reason"])
