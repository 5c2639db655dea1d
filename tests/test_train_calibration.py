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
