"""Issue 12, evaluation side: no patient-level number without patient ids, CIs only with enough
patients, the real source named, every value from data escaped in the report."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers_predict import make_member
from histoclass.cli import app
from histoclass.data.manifest import sample_path
from histoclass.evaluate import evaluate_files

runner = CliRunner()


@pytest.fixture(scope="module")
def folder_preds(tmp_path_factory):
    """``histoclass predict FOLDER`` on class folders of files whose names hold no patient."""
    root = tmp_path_factory.mktemp("noids")
    for label in ("benign", "malignant"):
        for i, p in enumerate(sorted((sample_path("ucsb") / label).glob("*.jpg"))[:6]):
            (root / "imgs" / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / "imgs" / label / f"scan_{i}.jpg")
    model = make_member(root / "m.pt", size=32, bias=[0.0, 0.3], zero=False)
    out = root / "preds.csv"
    res = runner.invoke(app, ["predict", str(model), str(root / "imgs"), "--out", str(out),
                              "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(out, keep_default_na=False)["patient_id"]) == {""}
    return root, out


def test_no_patient_ids_means_no_patient_numbers(folder_preds, tmp_path):
    _, preds = folder_preds
    res = runner.invoke(app, ["evaluate", str(preds), "--out", str(tmp_path / "e"),
                              "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["patient_accuracy"] is None and metrics["patient_recognition_rate"] is None
    assert all(v is None for v in metrics["ci95"].values())  # no patients: nothing to resample
    assert metrics["accuracy"] is not None
    assert "patient_accuracy         n/a: no patient ids; pass --groups CSV" in res.output
    assert "[0.000, 0.000]" not in res.output and "[1.000, 1.000]" not in res.output
    page = (tmp_path / "e" / "report.html").read_text()
    assert "n/a: no patient ids; pass --groups CSV" in page
    assert "images given directly (no manifest split)" in page and "split test" not in page


def test_groups_csv_gives_patients_and_cis_need_five_per_class(folder_preds, tmp_path):
    root, preds = folder_preds
    rows = pd.read_csv(preds, keep_default_na=False)
    # two images per patient: 3 patients per class -> patient metrics, but no CI (3 < 5)
    groups = [f"{lab}-{i // 2}" for lab, i in zip(rows["label"], range(len(rows)), strict=True)]
    pd.DataFrame({"path": rows["path"], "group": groups}).to_csv(root / "g3.csv", index=False)
    ev = evaluate_files([preds], bootstrap=50, groups=root / "g3.csv")
    assert ev.meta["patients"] == 6 and ev.metrics["patient_accuracy"] is not None
    assert ev.metrics["ci95"]["accuracy"] is None
    assert "too few patients to resample (3 of class 0, 3 of class 1)" in ev.meta["ci_note"]
    # one image per patient, relative paths matched by their tail: 6 per class -> CIs
    rel = ["/".join(p.split("/")[-2:]) for p in rows["path"]]
    pd.DataFrame({"path": rel, "group": [f"p{i}" for i in range(len(rows))]}).to_csv(
        root / "g6.csv", index=False)
    res = runner.invoke(app, ["evaluate", str(preds), "--out", str(tmp_path / "e"),
                              "--bootstrap", "50", "--groups", str(root / "g6.csv")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["ci95"]["accuracy"] is not None and metrics["patient_accuracy"] is not None
    assert "12 images, 12 patients" in res.output


def test_report_names_manifest_split_protocol_and_fold(tmp_path):
    frame = pd.DataFrame({"path": [f"i{i}.png" for i in range(4)], "patient_id": list("ABCD"),
                          "label": ["benign", "malignant"] * 2, "split": "test",
                          "protocol": "kfold", "fold": "3", "p_malignant": [0.2, 0.9, 0.4, 0.6]})
    frame.to_csv(tmp_path / "p.csv", index=False)
    ev = evaluate_files([tmp_path / "p.csv"], bootstrap=0)
    assert ev.meta["source"] == "manifest split test (protocol kfold), fold 3"


def test_rows_with_a_model_error_are_counted_not_scored(tmp_path):
    frame = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "patient_id": ["A", "B", "C"],
                          "label": ["benign", "malignant", "benign"],
                          "p_malignant": [0.1, 0.9, None], "pred": ["benign", "malignant", ""],
                          "error": ["", "", "non-finite model output (NaN or inf)"]})
    frame.to_csv(tmp_path / "p.csv", index=False)
    res = runner.invoke(app, ["evaluate", str(tmp_path / "p.csv"), "--out",
                              str(tmp_path / "e"), "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert "2 images" in res.output and "1 row(s) have no prediction" in res.output
    assert "1 row(s) have no prediction" in (tmp_path / "e" / "report.html").read_text()


# -- item 18 -----------------------------------------------------------------------------------
def test_report_escapes_every_value_from_data(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    frame = pd.DataFrame({"path": ["<b>a</b>.png", "b.png"], "patient_id": ["<i>A</i>", "B"],
                          "label": [evil, "other"], f"p_{evil}": [0.8, 0.3],
                          "p_other": [0.2, 0.7], "split": ["<script>x</script>"] * 2})
    frame.to_csv(tmp_path / "p.csv", index=False)
    res = runner.invoke(app, ["evaluate", str(tmp_path / "p.csv"), "--out",
                              str(tmp_path / "e"), "--bootstrap", "0", "--split", "all"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "e" / "report.html").read_text()
    for raw in (evil, "<script>x</script>", "<b>a</b>", "<i>A</i>"):
        assert raw not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
