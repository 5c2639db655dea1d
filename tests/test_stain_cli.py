"""``histoclass stain`` on tiny temporary data sets: copies, manifest, target JSON, bad files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoclass import stain
from histoclass.cli import app
from histoclass.data import load_rgb
from histoclass.data.images import to_array
from histoclass.data.manifest import sample_path

runner = CliRunner()


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """Two BreakHis images, a corrupt file and an all-white image in class folders."""
    src = sorted(sample_path("breakhis").glob("*.png"))
    root = tmp_path / "data"
    (root / "benign").mkdir(parents=True)
    (root / "malignant" / "deep").mkdir(parents=True)
    shutil.copy(src[0], root / "benign" / src[0].name)
    shutil.copy(src[3], root / "malignant" / "deep" / src[3].name)
    (root / "benign" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (60, 40), (255, 255, 255)).save(root / "malignant" / "blank.png")
    return root


def _run(*args: str):
    return runner.invoke(app, ["stain", *args])


def test_stain_writes_copies_manifest_and_target(data, tmp_path):
    target = sorted(sample_path("breakhis").glob("*.png"))[1]
    out = tmp_path / "out"
    res = _run(str(data), "--method", "vahadane", "--target", str(target), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "corrupt.png" in res.output and "skipped 1 file" in res.output
    assert "blank.png" in res.output and "passed through unchanged: 1" in res.output

    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    rel = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    rel.remove("benign/corrupt.png")
    assert sorted(manifest["path"]) == rel  # same relative paths, corrupt one left out
    assert set(manifest["source_path"]) == {str((data / r).resolve()) for r in rel}
    norm = stain.load(out / "stain_target.json")
    assert norm.key == stain.fit("vahadane", to_array(load_rgb(target))).key
    for row in manifest.itertuples():
        original = to_array(load_rgb(row.source_path))
        np.testing.assert_array_equal(to_array(load_rgb(out / row.path)), norm(original))
    assert (out / "manifest.skipped.csv").read_text().count("corrupt.png") == 1


def test_manifest_input_keeps_its_columns_and_json_target_reproduces(data, tmp_path):
    files = sorted(p for p in data.rglob("*.png") if p.name != "corrupt.png")
    table = pd.DataFrame({
        "path": [p.relative_to(data).as_posix() for p in files],
        "label": ["benign" if "benign" in p.parts else "malignant" for p in files],
        "patient_id": [f"p{i}" for i in range(len(files))],
        "split": ["train", "test", "val"][: len(files)], "extra": ["x", "y", "z"][: len(files)],
    })
    table.to_csv(data / "m.csv", index=False)
    target = files[0]
    first, second = tmp_path / "a", tmp_path / "b"
    level = logging.getLogger("histoclass.stain").level
    res = _run(str(data / "m.csv"), "--method", "macenko", "--target", str(target),
               "--out", str(first), "--workers", "1")
    assert res.exit_code == 0, res.output
    assert logging.getLogger("histoclass.stain").level == level  # in-process run restores it
    out = pd.read_csv(first / "manifest.csv", dtype=str)
    assert list(out.columns) == ["path", "source_path", "label", "patient_id", "split", "extra"]
    assert list(out["extra"]) == list(table["extra"]) and list(out["split"]) == list(table["split"])
    assert all((first / p).is_file() for p in out["path"])

    res = _run(str(data / "m.csv"), "--method", "macenko", "--target",
               str(first / "stain_target.json"), "--out", str(second))
    assert res.exit_code == 0, res.output
    for p in out["path"]:
        assert (first / p).read_bytes() == (second / p).read_bytes()


def test_stain_refuses_bad_options(data, tmp_path):
    target = str(next(data.rglob("SOB_*.png")))
    res = _run(str(data), "--method", "ruifrok", "--target", target, "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "unknown stain method 'ruifrok'" in res.output
    assert "reinhard, macenko, vahadane" in res.output
    res = _run(str(data), "--target", target, "--out", str(data / "normalized"))
    assert res.exit_code == 2 and "inside the input folder" in res.output
    res = _run(str(data), "--target", str(data / "benign" / "corrupt.png"), "--out",
               str(tmp_path / "o"))
    assert res.exit_code == 2 and "corrupt.png" in res.output
    res = _run(str(data), "--target", target, "--target", str(data / "malignant" / "blank.png"),
               "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "target image 1 has 0.0% tissue" in res.output
    assert "blank.png" in res.output
