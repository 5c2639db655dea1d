"""Issue 12, runs: resume only the same run, nothing lost or overwritten, write failures as one
line without debris, unreadable images before the first epoch, configs checked before work,
packaging, offline demo."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import tomllib
import yaml
from typer.testing import CliRunner

from helpers_predict import make_member, sample_manifest
from histoclass.cli import app
from histoclass.data.manifest import sample_path
from histoclass.train import TrainConfig, train
from honest_helpers import tmpfs
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = sorted(sample_path("breakhis").glob("*.png"))


def tiny(manifest, out, **kw) -> TrainConfig:
    base = {"model": "test_efficientnet", "pretrained": False, "epochs": 1, "batch_size": 8,
            "image_size": 32, "workers": 0, "device": "cpu"}
    return TrainConfig(str(manifest), str(out), **{**base, **kw})


# -- item 7 ------------------------------------------------------------------------------------
def test_resume_refuses_any_changed_result_setting(tmp_path):
    manifest = synthetic_manifest(tmp_path / "d", n_train=4, n_val=2, n_test=0)
    train(tiny(manifest, tmp_path / "r"))
    for change, key in (({"select": "auc"}, "select"), ({"hed_jitter": 0.05}, "hed_jitter"),
                        ({"color_jitter": 0.1}, "color_jitter"),
                        ({"freeze_bn": True}, "freeze_bn")):
        with pytest.raises(ValueError, match=rf"other settings than .*last\.pt: .*{key} "):
            train(tiny(manifest, tmp_path / "r", epochs=2, resume=True, **change))
    frame = pd.read_csv(manifest)
    frame.iloc[::-1].to_csv(manifest, index=False)  # same path, other content
    with pytest.raises(ValueError, match=r"manifest_sha256 '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        train(tiny(manifest, tmp_path / "r", epochs=2, resume=True))
    frame.to_csv(manifest, index=False)
    train(tiny(manifest, tmp_path / "r", epochs=2, resume=True, workers=1))  # free: continues


# -- item 14 -----------------------------------------------------------------------------------
def test_unreadable_image_after_split_stops_before_the_first_epoch(tmp_path):
    manifest = synthetic_manifest(tmp_path / "d", n_train=4, n_val=2, n_test=0)
    victim = pd.read_csv(manifest)["path"].iloc[1]
    Path(victim).write_bytes(b"\x89PNG\r\n\x1a\n gone bad")
    res = runner.invoke(app, ["train", str(manifest), "--out", str(tmp_path / "r"), "--model",
                              "test_efficientnet", "--no-pretrained", "--epochs", "1",
                              "--image-size", "32", "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 2 and "1 of 6 train/val image(s) cannot be read" in res.output
    assert victim in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r" / "last.pt").exists()


# -- item 11 -----------------------------------------------------------------------------------
def test_skip_lists_are_named_after_the_output_and_inputs_are_never_overwritten(tmp_path):
    model = make_member(tmp_path / "m.pt", size=32)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "o"
    for name in ("a.csv", "skipped.csv"):  # two runs into one folder; the old skip-list name
        res = runner.invoke(app, ["predict", str(model), str(SAMPLE[0]), str(bad), "--out",
                                  str(out / name), "--workers", "0"])
        assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out / "skipped.csv")) == 1  # the predictions, not a skip list
    for stem in ("a", "skipped"):
        assert pd.read_csv(out / f"{stem}.skipped.csv")["path"].tolist() == [str(bad)]
    for target, why in ((model, "is also an input"), (SAMPLE[0], "is also an input"),
                        (out / "x.skipped.csv", "lists the inputs it left out")):
        res = runner.invoke(app, ["predict", str(model), str(SAMPLE[0]), "--out", str(target)])
        assert res.exit_code == 2 and why in res.output
    assert model.stat().st_size > 1000


# -- item 12 -----------------------------------------------------------------------------------
def _commands(tmp_path, dest):
    manifest = sample_manifest(tmp_path)
    model = make_member(tmp_path / "m.pt", size=32)
    return {
        "split": ["split", "sample:ucsb", "--out", str(dest / "s")],
        "predict": ["predict", str(model), str(SAMPLE[0]), "--out", str(dest / "p.csv")],
        "train": ["train", str(manifest), "--out", str(dest / "t"), "--model",
                  "test_efficientnet", "--no-pretrained", "--epochs", "1", "--image-size", "32",
                  "--workers", "0"],
        "export": ["export", str(model), "--out", str(dest / "m.onnx"), "--no-check"],
        "explain": ["explain", str(model), str(SAMPLE[0]), "--out", str(dest / "cams")],
        "ensemble": ["ensemble", str(model), str(model), "--method", "soft", "--out",
                     str(dest / "e.pt")],
        "stain": ["stain", "sample:breakhis", "--method", "reinhard", "--target", str(SAMPLE[0]),
                  "--out", str(dest / "st")],
        "evaluate": ["evaluate", str(tmp_path / "none.csv"), "--out", str(dest / "ev")],
    }


def test_read_only_output_is_one_line_naming_the_path(tmp_path):
    with tmpfs(tmp_path / "ro", readonly=True) as ro:
        for name, args in _commands(tmp_path, ro).items():
            res = runner.invoke(app, args)
            assert res.exit_code == 2, (name, res.output)
            assert "Traceback" not in res.output, name
            assert res.exception is None or isinstance(res.exception, SystemExit), name
            if name != "evaluate":  # evaluate's missing input is found first
                assert f"cannot write {ro}" in res.output and "Read-only file system" in \
                    res.output, (name, res.output)


def test_full_disk_leaves_no_debris(tmp_path):
    # 8 KiB: smaller than any manifest of the 46-image sample, whatever its install path
    with tmpfs(tmp_path / "full", size="8k") as full:
        res = runner.invoke(app, ["split", "sample", "--out", str(full / "s")])
        assert res.exit_code == 2 and "No space left on device" in res.output, res.output
        assert f"cannot write {full / 's' / 'manifest.csv'}" in res.output
        model = make_member(tmp_path / "m.pt", size=32)
        res = runner.invoke(app, ["ensemble", str(model), str(model), "--method", "soft",
                                  "--out", str(full / "e.pt")])
        assert res.exit_code in (0, 2)
        res = runner.invoke(app, ["export", str(model), "--out", str(full / "m.onnx"),
                                  "--no-check"])
        assert res.exit_code == 2 and "No space left on device" in res.output, res.output
        left = [p.name for p in full.rglob("*") if p.is_file()]
        assert not [n for n in left if n.endswith(".tmp")] and "m.onnx" not in left, left


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path):
    manifest = synthetic_manifest(tmp_path / "d", n_train=2, n_val=2, n_test=0)
    run = tmp_path / "r"
    run.mkdir()
    stale = [run / ".best.pt.x1y2.tmp", run / "cache" / "ab" / ".ab12.npy.q.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    train(tiny(manifest, run))
    assert not any(p.exists() for p in stale)


# -- item 16 -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"train": {"epoch": 1}}, "train: unknown key(s) epoch; valid keys: amp, balance"),
    ({"train": {"epochs": "1"}}, "train: epochs = '1' (str) must be int"),
    ({"members": [{"name": "a", "lr": "x"}]}, "members[0]: lr = 'x' (str) must be float"),
    ({"members": ["v2-b0"], "train": {"schedule": "linear"}},
     "member v2-b0: --schedule 'linear': choose one of constant, cosine"),
    ({"ensembles": [{"name": "s", "method": "soft", "seeds": 1}]},
     "ensembles[0]: unknown key(s) seeds"),
    ({"ensembles": [{"name": "s", "method": "mean"}]}, "needs a name and a method, one of soft"),
    ({"split": {"protocol": "patient", "vall": 0.2}}, "split: unknown key(s) vall"),
    ({"evaluate": {"bootstrap": 1.5}}, "evaluate: bootstrap = 1.5 (float) must be int"),
])
def test_run_config_is_checked_before_any_work(tmp_path, change, message):
    out = tmp_path / "out"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": "sample", "out": str(out), **change}))
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not out.exists()  # nothing scanned, split or written


# -- item 17 -----------------------------------------------------------------------------------
def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for v in project["optional-dependencies"].values()
                                       for s in v]
    from packaging.requirements import Requirement

    return {Requirement(s).name.lower().replace("_", "-") for s in specs}


def test_every_direct_import_is_declared():
    dists = importlib.metadata.packages_distributions()
    declared, missing = _declared(), {}
    for path in (ROOT / "src" / "histoclass").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and \
                not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("histoclass", "__future__"):
                    continue
                found = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not found & declared:
                    missing[top] = path.name
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_gradio_bound_admits_only_versions_with_what_app_passes():
    import inspect

    import gradio
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(Requirement(s) for s in project["optional-dependencies"]["demo"]
                if s.startswith("gradio"))
    assert not spec.specifier.contains("5.49.1") and spec.specifier.contains("6.0.0")
    assert Version(gradio.__version__) in spec.specifier
    app_files = sorted((ROOT / "src" / "histoclass" / "app").glob("*.py"))
    tree = ast.parse("\n".join(p.read_text() for p in app_files))
    passed = {k.arg for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "attr", "") == "launch" for k in n.keywords}
    accepted = set(inspect.signature(gradio.Blocks.launch).parameters)
    assert "footer_links" in passed and passed <= accepted, passed - accepted


# -- item 19 -----------------------------------------------------------------------------------
def test_offline_demo_fails_in_seconds_naming_the_demo_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--out", str(out), "--members", "v1-b0"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and "cannot reach the Hugging Face hub" in line
    assert "--no-pretrained" in line and "--weights-dir DIR" in line and "--weights " not in line
    assert not out.exists()  # no partial run folder


def test_a_run_folder_with_other_settings_is_not_resumed_unless_forced(tmp_path):
    from histoclass.pipeline import RunConfig, run

    fast = {"epochs": 1, "batch_size": 8, "image_size": 32, "pretrained": False, "workers": 0,
            "cache_dir": None}
    cfg = RunConfig(data="sample:ucsb", out=str(tmp_path / "r"), members=["test_efficientnet"],
                    split={"protocol": "patient", "seed": 0, "val": 0.3, "test": 0.3},
                    train=fast, evaluate={"bootstrap": 0})
    run(cfg)
    other = RunConfig(**{**cfg.__dict__, "train": {**fast, "epochs": 2}})
    with pytest.raises(ValueError, match=r"holds a run with other settings \(train .*'epochs': 1"
                                         r".*'epochs': 2.*--force"):
        run(other)
    broken = RunConfig(**{**other.__dict__, "data": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="no such file or folder"):
        run(broken, force=True)  # starts afresh: the old run's outputs are gone first
    assert not (tmp_path / "r" / "members").exists()
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["epochs"] == 2
