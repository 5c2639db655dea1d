"""Training: overfitting a clear synthetic task, resume, DDP, errors, sampling and metrics."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.models import read_checkpoint
from histoclass.train import NonFiniteLossError, TrainConfig, train, train_all
from histoclass.train.data import EpochSampler, class_weights
from histoclass.train.epoch import better, lr_factor, metrics
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

# The sampling and metric helpers, under the one name the tests below use.
tu = SimpleNamespace(EpochSampler=EpochSampler, class_weights=class_weights, better=better,
                     lr_factor=lr_factor, metrics=metrics)
TINY = "test_efficientnet"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """16 train / 8 val images; the 4 test rows' files are deleted (training must not read them)."""
    root = tmp_path_factory.mktemp("synthetic")
    path = synthetic_manifest(root)
    frame = pd.read_csv(path)
    for p in frame.loc[frame["split"] == "test", "path"]:
        os.remove(p)
    return path


def tiny(manifest: Path, out: Path, **kw) -> TrainConfig:
    base = {"model": TINY, "pretrained": False, "epochs": 1, "batch_size": 8, "image_size": 64,
            "workers": 0, "lr": 1e-2, "head_lr": 1e-2, "device": "cpu"}
    return TrainConfig(str(manifest), str(out), **{**base, **kw})


def test_overfits_clear_task_and_writes_run_folder(manifest, tmp_path):
    best = train(tiny(manifest, tmp_path / "run", epochs=6))
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(hist) == 6
    assert hist["train_accuracy"].max() == 1.0
    assert hist["val_balanced_accuracy"].max() == 1.0
    for name in ("best.pt", "last.pt", "curves.png", "config.yaml", "done"):
        assert (tmp_path / "run" / name).is_file(), name
    meta = read_checkpoint(best)["meta"]
    assert meta["metrics"]["balanced_accuracy"] == 1.0
    assert meta["preprocess"]["input_size"] == [64, 64]
    assert meta["classes"] == ["benign", "malignant"] and meta["task"] == "binary"
    assert meta["config"]["epochs"] == 6
    assert read_checkpoint(tmp_path / "run" / "last.pt")["meta"]["train_state"]["epoch"] == 6
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["epochs"] == 6 and config["resolved"]["preprocess"]["input_size"] == [64, 64]
    assert config["resolved"]["train_images"] == 16 and config["resolved"]["freeze_bn"] is False


def test_resume_equals_uninterrupted_run(manifest, tmp_path):
    train(tiny(manifest, tmp_path / "a", epochs=2))
    train(tiny(manifest, tmp_path / "b", epochs=1))
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(manifest, tmp_path / "b", epochs=2))
    train(tiny(manifest, tmp_path / "b", epochs=2, resume=True))
    a = read_checkpoint(tmp_path / "a" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "last.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["meta"]["history"][1]["train_loss"] == b["meta"]["history"][1]["train_loss"]


def test_resume_needs_last_and_same_settings(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"last\.pt does not exist"):
        train(tiny(manifest, tmp_path / "none", resume=True))
    train(tiny(manifest, tmp_path / "r"))
    with pytest.raises(ValueError, match=r"other settings.*seed 0 -> 5"):
        train(tiny(manifest, tmp_path / "r", epochs=2, seed=5, resume=True))


def test_frozen_batchnorm_keeps_statistics_and_affine(manifest, tmp_path):
    from histoclass.models import create_model

    torch.manual_seed(0)  # train() seeds the same way before creating the model
    init = create_model(TINY, 2, pretrained=False).state_dict()
    train(tiny(manifest, tmp_path / "f", freeze_bn=True))
    after = read_checkpoint(tmp_path / "f" / "last.pt")["state_dict"]
    bn = [k for k in init if k.startswith("bn1.")]
    assert bn and all(torch.equal(init[k], after[k]) for k in bn)
    assert not torch.equal(init["conv_stem.weight"], after["conv_stem.weight"])


def test_nan_loss_stops_with_clear_message(manifest, tmp_path, monkeypatch):
    import histoclass.models as models

    create = models.create_model

    def poisoned(*args, **kwargs):
        model = create(*args, **kwargs)
        model.register_forward_hook(lambda m, i, out: out * float("nan"))
        return model

    monkeypatch.setattr(models, "create_model", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1, batch 1"):
        train(tiny(manifest, tmp_path / "nan"))


def test_subtype_task_and_missing_subtypes(manifest, tmp_path):
    best = train(tiny(manifest, tmp_path / "sub", task="subtype"))
    meta = read_checkpoint(best)["meta"]
    assert meta["num_classes"] == 8 and meta["task"] == "subtype"
    frame = pd.read_csv(manifest)
    frame.loc[[0, 2, 3], "subtype"] = ""
    bad = tmp_path / "nosub.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"3 train row\(s\) have no subtype"):
        train(tiny(bad, tmp_path / "sub2", task="subtype"))


def test_options_warmup_cosine_sampler_smoothing(manifest, tmp_path):
    train(tiny(manifest, tmp_path / "o", epochs=2, warmup_epochs=1, schedule="cosine",
               balance="sampler", label_smoothing=0.1, select="auc", cache_dir=None,
               hed_jitter=0.05, color_jitter=0.1))
    hist = pd.read_csv(tmp_path / "o" / "history.csv")
    assert len(hist) == 2 and hist["lr"].iloc[-1] < 1e-2


def test_bad_settings_name_valid_choices(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"--balance 'oversample': choose one of none, weights"):
        train(tiny(manifest, tmp_path / "x", balance="oversample"))
    with pytest.raises(ValueError, match=r"--magnification 100X: no such images.*40X"):
        train(tiny(manifest, tmp_path / "x", magnification="100"))


def test_stain_normalised_training(manifest, tmp_path):
    target = pd.read_csv(manifest)["path"][0]
    best = train(tiny(manifest, tmp_path / "s", stain="reinhard", stain_target=target,
                      hed_jitter=0.05, color_jitter=0.1))
    assert read_checkpoint(best)["meta"]["stain"]["method"] == "reinhard"


def test_train_all_skips_finished_runs(manifest, tmp_path):
    base = tiny(manifest, tmp_path / "all")
    assert train_all(base, [TINY]) == {TINY: "trained"}
    assert (tmp_path / "all" / TINY / "best.pt").is_file()
    status = train_all(base, ["nonexistent_net", TINY])
    assert status[TINY] == "skipped (finished)"
    assert status["nonexistent_net"].startswith("failed: unknown model 'nonexistent_net'")
    result = CliRunner().invoke(app, ["train-all", str(manifest), "--out", str(tmp_path / "all"),
                                      "--models", f"{TINY},nonexistent_net", "--no-pretrained",
                                      "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 1
    assert f"{TINY}: skipped (finished)" in result.output
    assert "nonexistent_net: failed: unknown model" in result.output


def test_train_help_works():
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--resume" in result.output


def test_ddp_two_processes_gloo(manifest, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "histoclass", "train", str(manifest), "--out", str(out),
           "--model", TINY, "--no-pretrained", "--epochs", "1", "--batch-size", "4",
           "--image-size", "64", "--workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 1 and math.isfinite(hist["val_loss"][0])


def test_epoch_sampler_shards_and_balances():
    a = tu.EpochSampler(10, seed=3, rank=0, world=2)
    b = tu.EpochSampler(10, seed=3, rank=1, world=2)
    assert sorted(list(a) + list(b)) == list(range(10))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    odd = tu.EpochSampler(5, seed=0, rank=1, world=2)
    assert len(list(odd)) == len(odd) == 3
    targets = [0] * 10 + [1] * 90
    w = tu.class_weights(targets, 2)
    assert w.tolist() == pytest.approx([5.0, 100 / 180])
    s = tu.EpochSampler(100, seed=0, weights=w[targets].tolist())
    minority = sum(targets[i] == 0 for i in s)
    assert 35 <= minority <= 65  # ~50 of 100 instead of 10


def test_metrics_and_selection_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    m = tu.metrics(logits, y)
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5
    # p(malignant) ranks: class-1 items (0.95, 0.27) vs class-0 (0.12, 0.73): 3 of 4 pairs right
    assert m["auc"] == 0.75
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item())
    assert tu.metrics(logits[:2], torch.tensor([0, 0]))["auc"] is None
    best = {"balanced_accuracy": 0.8, "loss": 0.5, "auc": 0.9}
    assert tu.better({"balanced_accuracy": 0.8, "loss": 0.4, "auc": 0.9}, best, "balanced_accuracy")
    assert not tu.better({"balanced_accuracy": 0.7, "loss": 0.1, "auc": 0.9}, best,
                         "balanced_accuracy")
    assert tu.better({"balanced_accuracy": 0.1, "loss": 0.1, "auc": 0.9}, best, "loss")
    assert tu.lr_factor("cosine", 0, 10) == 1.0 and tu.lr_factor("cosine", 5, 10) == 0.5
    assert tu.lr_factor("cosine", 10, 10) == 0.0 and tu.lr_factor("constant", 7, 10) == 1.0
