"""``histoclass run`` and ``histoclass demo`` end to end on the bundled real H&E sample."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.metrics import METRICS
from histoclass.pipeline import RunConfig, run

FAST = {"epochs": 1, "batch_size": 8, "image_size": 64, "pretrained": False, "workers": 0,
        "cache_dir": None}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(
        data="sample:ucsb", out=str(out), members=["test_efficientnet", "test_efficientnet_gn"],
        split={"protocol": "patient", "seed": 0, "val": 0.3, "test": 0.3}, train=FAST,
        ensembles=[{"name": "soft", "method": "soft"}, {"name": "hard", "method": "hard"},
                   {"name": "stack", "method": "stack"}, {"name": "concat", "method": "concat"}],
        evaluate={"bootstrap": 20},
    )
    return cfg, run(cfg)


def test_run_trains_fits_predicts_and_evaluates(finished):
    cfg, summary = finished
    out = cfg.out
    assert summary["model"].tolist() == ["test_efficientnet", "test_efficientnet_gn", "soft",
                                         "hard", "stack", "concat"]
    assert summary["kind"].tolist() == ["member"] * 2 + ["ensemble"] * 4
    manifest = pd.read_csv(f"{out}/manifest.csv")
    for name in summary["model"]:
        preds = pd.read_csv(f"{out}/preds/{name}.csv")
        # only the test split is predicted, all of it
        assert sorted(preds["path"]) == sorted(manifest.loc[manifest["split"] == "test", "path"])
        metrics = json.loads(Path(f"{out}/eval/{name}/metrics.json").read_text())
        assert set(metrics) == set(METRICS) | {"per_magnification", "ci95"}
        assert "<html" in Path(f"{out}/eval/{name}/report.html").read_text()
    assert "| soft | ensemble |" in Path(f"{out}/summary.md").read_text()


def test_run_resumes_without_redoing_work(finished):
    cfg, summary = finished
    stamps = {p: p.stat().st_mtime_ns for p in
              Path(cfg.out).rglob("*.pt")}
    again = run(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    pd.testing.assert_frame_equal(again, summary)


def test_paper_protocol_summary_says_patients_leak(tmp_path):
    cfg = RunConfig(data="sample:ucsb", out=str(tmp_path), members=["test_efficientnet"],
                    split={"protocol": "paper", "seed": 0}, train=FAST, evaluate={"bootstrap": 0})
    run(cfg)
    assert (tmp_path / "summary.md").read_text().startswith("**protocol=paper: images are split")
    report = (tmp_path / "eval/test_efficientnet/report.html").read_text()
    assert "patients leak between splits" in report


def test_config_file_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": "sample", "out": "x", "epoch": 3}))
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2 and "unknown key(s) ['epoch']" in res.output


def test_shipped_configs_are_valid():
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        cfg = RunConfig.from_yaml(path)
        assert cfg.members and cfg.split["protocol"] in ("patient", "paper", "kfold"), path


def test_demo_runs_end_to_end(tmp_path):
    res = CliRunner().invoke(app, [
        "demo", "--out", str(tmp_path), "--members", "test_efficientnet,test_efficientnet_gn",
        "--epochs", "1", "--image-size", "64", "--no-pretrained"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and (tmp_path / "eval" / "soft" / "report.html").is_file()


def test_stain_comparison_variants_train_and_tabulate(tmp_path):
    """The stain-comparison config's shape: one model, four preprocessing variants, one split."""
    from histoclass.data.manifest import sample_path
    from histoclass.models.checkpoint import read_checkpoint

    target = str(sorted(sample_path("ucsb").rglob("*.jpg"))[0])
    cfg = RunConfig(
        data="sample:ucsb", out=str(tmp_path), train=FAST, evaluate={"bootstrap": 0},
        split={"protocol": "patient", "seed": 0, "val": 0.3, "test": 0.3},
        members=[{"name": "none", "model": "test_efficientnet"},
                 {"name": "macenko", "model": "test_efficientnet", "stain": "macenko",
                  "stain_target": target},
                 {"name": "vahadane", "model": "test_efficientnet", "stain": "vahadane",
                  "stain_target": target},
                 {"name": "hed", "model": "test_efficientnet", "hed_jitter": 0.05}])
    summary = run(cfg)
    assert summary["model"].tolist() == ["none", "macenko", "vahadane", "hed"]
    methods = {n: (read_checkpoint(tmp_path / "members" / n / "best.pt")["meta"]["stain"] or {})
               .get("method") for n in summary["model"]}
    assert methods == {"none": None, "macenko": "macenko", "vahadane": "vahadane", "hed": None}
    assert summary["accuracy"].notna().all()
