"""Any backbone: extra constructor arguments on `train`, hub and local-dir sources, presets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.models import load_checkpoint, read_checkpoint
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

RUN = ["--no-pretrained", "--epochs", "1", "--batch-size", "8", "--image-size", "64",
       "--workers", "0", "--device", "cpu", "--cache-dir", "off"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return synthetic_manifest(tmp_path_factory.mktemp("bb"), n_train=8, n_val=4, n_test=2)


def test_model_arg_is_stored_and_rebuilt_by_predict(manifest, tmp_path):
    # test_vit is built for 160 px: at 64 px only dynamic_img_size=true lets it run, so a
    # rebuild that dropped the stored argument would fail in predict.
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(out), "--model",
                                   "test_vit", "--model-arg", "dynamic_img_size=true", *RUN])
    assert res.exit_code == 0, res.output
    meta = read_checkpoint(out / "best.pt")["meta"]
    assert meta["model_args"] == {"dynamic_img_size": True}
    assert meta["config"]["model_args"] == {"dynamic_img_size": True}
    model, _ = load_checkpoint(out / "best.pt")
    assert model.dynamic_img_size
    images = pd.read_csv(manifest)["path"].tolist()[:2]
    res = CliRunner().invoke(app, ["predict", str(out / "best.pt"), *images, "--out",
                                   str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    probs = pd.read_csv(tmp_path / "p.csv")
    assert len(probs) == 2


def test_bad_model_arg_is_one_line(manifest, tmp_path):
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(tmp_path / "r"),
                                   "--model", "test_vit", "--model-arg", "act_layer=Evil", *RUN])
    assert res.exit_code == 2
    assert "act_layer='Evil' is not an allowed class" in res.output
    assert "Traceback" not in res.output


def test_no_model_args_keeps_an_empty_record(manifest, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(out), "--model",
                                   "test_efficientnet", *RUN])
    assert res.exit_code == 0, res.output
    assert read_checkpoint(out / "best.pt")["meta"]["model_args"] == {}
    x = torch.randn(1, 3, 64, 64)
    assert load_checkpoint(out / "best.pt")[0](x).shape == (1, 2)
