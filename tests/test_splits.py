"""Split protocols, determinism and the leakage audit."""

import pandas as pd
import pytest

from histoclass.data.manifest import read_manifest, select, split_table, write_manifest
from histoclass.data.scan import scan
from histoclass.data.splits import audit, link_groups, make_split


@pytest.fixture
def frame(official_tree):
    return scan(official_tree).frame


def _patients(frame, col="split"):
    return {s: set(frame.loc[frame[col] == s, "patient_id"]) for s in ("train", "val", "test")}


def test_patient_split_is_disjoint_and_stratified(frame):
    out = make_split(frame, "patient", seed=3)
    pats = _patients(out)
    assert not (pats["train"] & pats["val"] or pats["train"] & pats["test"]
                or pats["val"] & pats["test"])
    for split in ("val", "test"):  # every split sees both classes
        assert set(out.loc[out["split"] == split, "label"]) == {"benign", "malignant"}
    assert audit(out).clean
    # the DC/LC patient and the suffixed slides each sit in exactly one split
    assert out.loc[out["patient_id"] == "14-13412", "split"].nunique() == 1
    assert out.loc[out["patient_id"] == "14-22549", "split"].nunique() == 1


def test_duplicates_link_their_patients(frame):
    groups = link_groups(frame)
    dup_sha = frame.loc[frame.duplicated("sha256", keep=False), "sha256"].iloc[0]
    linked = groups[frame["sha256"] == dup_sha].unique()
    assert len(linked) == 1
    out = make_split(frame, "patient", seed=0)
    assert out.loc[out["sha256"] == dup_sha, "split"].nunique() == 1
    assert not audit(out).leaking_duplicates["split"]


def test_paper_split_leaks_and_audit_names_patients(frame):
    out = make_split(frame, "paper", seed=0)
    assert (out["protocol"] == "paper").all()
    counts = out["split"].value_counts()
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    assert abs(counts["test"] / len(out) - 0.15) < 0.03
    report = audit(out)
    assert not report.clean
    by_split = _patients(out)
    expected = sorted((by_split["train"] & by_split["test"]) | (by_split["train"] & by_split["val"])
                      | (by_split["val"] & by_split["test"]))
    assert report.leaking_patients["split"] == expected and expected


def test_kfold_folds_are_patient_disjoint(frame):
    out = make_split(frame, "kfold", folds=4, seed=1)
    assert sorted(out["fold"].unique()) == [0, 1, 2, 3]
    assert audit(out).clean and audit(out).columns == [f"split_fold{k}" for k in range(4)]
    for k in range(4):
        col = out[f"split_fold{k}"]
        assert ((col == "test") == (out["fold"] == k)).all()
        assert (col == "val").any() and (col == "train").any()
    assert (out["split"] == out["split_fold0"]).all()
    # every patient is tested exactly once
    assert out.groupby("patient_id")["fold"].nunique().eq(1).all()


def test_too_many_folds(frame):
    with pytest.raises(ValueError, match=r"--folds 99: need 2 <= folds <= number of patients"):
        make_split(frame, "kfold", folds=99)


def test_same_seed_same_bytes(frame, tmp_path):
    a = write_manifest(make_split(frame, "patient", seed=7), tmp_path / "a.csv").read_bytes()
    b = write_manifest(make_split(frame.sample(frac=1, random_state=1), "patient", seed=7),
                       tmp_path / "b.csv").read_bytes()
    c = write_manifest(make_split(frame, "patient", seed=8), tmp_path / "c.csv").read_bytes()
    assert a == b
    assert a != c


def test_magnification_filter(frame):
    out = make_split(frame, "patient", magnifications=["40x", "400"])
    assert set(out["magnification"]) == {"40X", "400X"}
    with pytest.raises(ValueError, match=r"no image at magnification \['1000X'\]"):
        make_split(frame, "patient", magnifications=["1000X"])


def test_bad_arguments(frame):
    with pytest.raises(ValueError, match=r"unknown protocol 'random'; choose one of patient"):
        make_split(frame, "random")
    with pytest.raises(ValueError, match=r"--val 0.6 \+ --test 0.5 leaves no training data"):
        make_split(frame, "patient", val=0.6, test=0.5)


def test_manifest_round_trip_and_select(frame, tmp_path):
    out = make_split(frame, "kfold", folds=3)
    path = write_manifest(out, tmp_path / "m.csv")
    back = read_manifest(path)
    assert back["path"].tolist() == out["path"].tolist()
    assert back["fold"].astype(int).tolist() == out["fold"].tolist()
    assert len(select(back, "test", fold=2)) == int((out["fold"] == 2).sum())
    with pytest.raises(ValueError, match=r"fold 5 not in manifest; it has folds \['0', '1', '2'\]"):
        select(back, "test", fold=5)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        select(back, "dev")


def test_relative_manifest_paths_resolve_against_manifest(tmp_path):
    (tmp_path / "m").mkdir()
    pd.DataFrame({"path": ["img/a.png"], "label": ["benign"], "patient_id": ["p"],
                  "split": ["train"]}).to_csv(tmp_path / "m" / "x.csv", index=False)
    assert read_manifest(tmp_path / "m" / "x.csv")["path"][0] == str(tmp_path / "m" / "img/a.png")


def test_split_table_counts(frame):
    out = make_split(frame, "patient")
    table = split_table(out).set_index("split")
    assert table["images"].sum() == len(out)
    assert table.loc["test", "patients"] == out.loc[out["split"] == "test", "patient_id"].nunique()
    assert (table[["40X", "100X", "200X", "400X"]].sum(axis=1) == table["images"]).all()
