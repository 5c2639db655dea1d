"""``histoclass evaluate`` end to end, and the self-contained report.html."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.data.breakhis import parse_name
from histoclass.data.manifest import sample_path
from histoclass.data.splits import LEAK_NOTE
from histoclass.metrics import METRICS
from histoclass.report import fmt, thumbnail

KEYS = {*METRICS, "per_magnification", "ci95"}


def sample_preds(path: Path, protocol: str = "patient") -> Path:
    """Predictions over the bundled BreakHis sample, every other image wrong, plus a missing
    image (wrong) and an unlabelled row; members b0 and b1."""
    rows = []
    for i, img in enumerate(sorted(sample_path("breakhis").glob("*.png"))):
        name = parse_name(img.name)
        right = i % 2 == 0
        p = 0.8 if (name.label == "malignant") == right else 0.3
        rows.append([str(img), name.patient_id, name.magnification, name.label, p])
    rows.append(["missing/nowhere.png", "14-99999", "40X", "benign", 0.95])
    rows.append(["missing/unknown.png", "14-99998", "40X", "", 0.5])
    frame = pd.DataFrame(rows, columns=["path", "patient_id", "magnification", "label",
                                        "p_malignant"])
    frame.insert(4, "split", "test")
    frame.insert(5, "protocol", protocol)
    frame["pred"] = ["malignant" if p >= 0.5 else "benign" for p in frame["p_malignant"]]
    frame["member.b0.p_malignant"] = frame["p_malignant"]
    frame["member.b1.p_malignant"] = 1 - frame["p_malignant"]
    frame["disagreement"] = 0.5
    frame["refer"] = 0
    frame.to_csv(path, index=False)
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["evaluate", *args])
    return result.exit_code, result.output


def test_cli_end_to_end(tmp_path: Path) -> None:
    code, out = run(str(sample_preds(tmp_path / "preds.csv")), "--out", str(tmp_path / "ev"),
                    "--bootstrap", "50")
    assert code == 0, out
    images = sorted(sample_path("breakhis").glob("*.png"))
    n, right = len(images) + 1, (len(images) + 1) // 2  # images 0, 2, 4, ... right; missing wrong
    patients = {parse_name(p.name).patient_id for p in images}
    assert f"{n} images, {len(patients) + 1} patients, binary task" in out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics) == KEYS
    assert set(metrics["ci95"]) == set(METRICS)
    assert list(metrics["per_magnification"]) == ["40X", "200X", "400X"]
    assert all(set(m) == set(METRICS) for m in metrics["per_magnification"].values())
    assert metrics["accuracy"] == pytest.approx(right / n)
    members = json.loads((tmp_path / "ev" / "members.json").read_text())
    assert list(members) == ["b0", "b1", "ensemble"]
    assert members["b1"]["accuracy"] == pytest.approx(1 - right / n)  # b1 = 1 - ensemble

    page = (tmp_path / "ev" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    # confusion, ROC, reliability, risk-coverage; uncalibrated predictions say so
    assert page.count("data:image/png;base64,") == 4
    assert "not calibrated: the predictions carry no raw.p_ columns" in page
    assert "Risk-coverage" in page or "AURC" in page
    assert LEAK_NOTE not in page
    for key in METRICS:
        assert f"<b>{key}</b>" in page
    assert "Members and ensemble" in page and "Per magnification" in page
    # misclassified: the real images as JPEG thumbnails, the missing one a named placeholder
    thumbs = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page)
    assert len(thumbs) == n - right - 1
    img = Image.open(io.BytesIO(base64.b64decode(thumbs[0])))
    assert max(img.size) == 160
    assert "image unavailable: " in page and "missing/nowhere.png" in page
    assert "Referral" in page and f"0 of {n} images referred" in page


def test_paper_protocol_warning_is_the_first_line(tmp_path: Path) -> None:
    code, out = run(str(sample_preds(tmp_path / "p.csv", "paper")), "--out", str(tmp_path / "ev"),
                    "--bootstrap", "5")
    assert code == 0, out
    assert f"WARNING: {LEAK_NOTE}" in out
    page = (tmp_path / "ev" / "report.html").read_text()
    body = page.split("<body>", 1)[1].lstrip().splitlines()
    assert body[0] == f'<p class="leak">WARNING: {LEAK_NOTE}</p>'
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["leaks_patients"]


def test_cli_folds_and_seeded_ci(tmp_path: Path) -> None:
    a, b = sample_preds(tmp_path / "a.csv"), sample_preds(tmp_path / "b.csv")
    for out in ("one", "two"):
        code, text = run(str(a), str(b), "--out", str(tmp_path / out), "--bootstrap", "30",
                         "--seed", "7")
        assert code == 0, text
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert set(one) == KEYS
    assert one == json.loads((tmp_path / "two" / "metrics.json").read_text())
    folds = json.loads((tmp_path / "one" / "folds.json").read_text())
    assert len(folds["folds"]) == 2 and folds["std"]["accuracy"] == 0.0
    assert "mean ± std over 2 folds" in (tmp_path / "one" / "report.html").read_text()


def test_cli_error_without_probability_columns(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"path": ["a.png"], "patient_id": ["A"], "label": ["benign"]}).to_csv(bad)
    code, out = run(str(bad), "--out", str(tmp_path / "ev"))
    assert code == 2
    assert "error: " in out and "bad.csv: no probability columns" in out
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_thumbnail_placeholder_and_fmt(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    tag = thumbnail(tmp_path / "broken.png")
    assert tag.startswith('<div class="missing">image unavailable: ') and "broken.png" in tag
    ucsb = next(iter(sorted(sample_path("ucsb").rglob("*.jpg"))))
    assert thumbnail(ucsb, size=64).startswith('<img alt="" src="data:image/jpeg;base64,')
    assert (fmt(None), fmt(2 / 3)) == ("n/a", "0.667")


def test_relative_image_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    image = next(iter(sorted(sample_path("breakhis").glob("*.png"))))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(image.read_bytes())
    pd.DataFrame({"path": ["imgs/x.png", "imgs/y.png"], "patient_id": ["A", "B"],
                  "label": ["benign", "malignant"], "p_malignant": [0.9, 0.1]}).to_csv(
        tmp_path / "p.csv", index=False)
    code, out = run(str(tmp_path / "p.csv"), "--out", str(tmp_path / "ev"), "--bootstrap", "0")
    assert code == 0, out
    page = (tmp_path / "ev" / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 1
    assert f"image unavailable: {tmp_path / 'imgs' / 'y.png'}" in page


def test_report_with_one_class_shows_undefined_as_na(tmp_path: Path) -> None:
    pd.DataFrame({"path": ["a.png", "b.png"], "patient_id": ["A", "B"],
                  "label": ["malignant", "malignant"], "p_malignant": [0.2, 0.7]}).to_csv(
        tmp_path / "p.csv", index=False)
    code, out = run(str(tmp_path / "p.csv"), "--out", str(tmp_path / "ev"), "--bootstrap", "5")
    assert code == 0, out
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["roc_auc"] is None
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "<td><b>roc_auc</b></td><td>n/a</td><td>n/a</td>" in page
