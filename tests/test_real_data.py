"""The data layer on real H&E images: ../shared/data when present, the bundled sample always."""

import hashlib
from pathlib import Path

import pandas as pd

from conftest import shared_data
from histoclass.data import audit, make_split, scan
from histoclass.data.breakhis import parse_name
from histoclass.data.manifest import sample_path


def test_breakhis_sample_names_hashes_and_patients():
    root = shared_data("breakhis-sample")
    result = scan(root)
    frame = result.frame
    sums = dict(line.split()[::-1] for line in (root / "SHA256SUMS").read_text().splitlines())
    sums = {Path(k).name: v for k, v in sums.items()}
    assert not result.skipped
    assert len(frame) == len(list((root / "images").glob("*.png")))
    for path, sha in zip(frame["path"], frame["sha256"], strict=True):
        assert sums[Path(path).name] == sha
    expected = {parse_name(p.name).patient_id for p in (root / "images").glob("*.png")}
    assert set(frame["patient_id"]) == expected
    # slides 14-19979 and 14-19979C are one patient
    assert frame.loc[frame["slide_id"].isin(["19979", "19979C"]), "patient_id"].nunique() == 1
    assert (frame[["width", "height"]] == [700, 460]).all().all()


def test_ucsb_manifest_is_split_by_group():
    root = shared_data("ucsb-breast")
    table = pd.read_csv(root / "manifest.csv")
    frame = scan(root / "manifest.csv").frame
    assert sorted(frame["patient_id"].unique()) == sorted(table["group"].unique())
    assert frame["sha256"].tolist() == table.sort_values("path")["sha256"].tolist()
    out = make_split(frame, "kfold", folds=3)
    assert audit(out).clean


def test_bundled_sample_is_real_and_grouped():
    frame = scan(sample_path()).frame
    assert set(frame["label"]) == {"benign", "malignant"}
    ucsb = frame[frame["path"].str.contains("/ucsb/")]
    groups = pd.read_csv(sample_path("ucsb") / "groups.csv")
    assert ucsb["patient_id"].nunique() == groups["group"].nunique()
    for path, sha in zip(frame["path"], frame["sha256"], strict=True):
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha
    assert audit(make_split(frame, "patient")).clean
