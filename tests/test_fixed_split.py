"""Published splits: fixed test patients (``--test-patients``) and a subtype subset
(``--classes``)."""

import logging

import pytest
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.data.fixed import parse_ids, subtype_names
from histoclass.data.manifest import read_manifest
from histoclass.data.scan import scan
from histoclass.data.splits import audit, make_split


@pytest.fixture
def frame(official_tree):
    return scan(official_tree).frame


def test_parse_ids_lists_commas_and_files(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("# eva val\n16184CD\n2523  # a comment\n\n")
    assert parse_ids(["3909, 16716", str(f), "3909"]) == ["3909", "16716", "16184CD", "2523"]
    assert parse_ids(None) == []


def test_subtype_codes_and_names():
    assert subtype_names(["TA", "mc", "fibroadenoma", "Ductal Carcinoma"]) == [
        "tubular_adenoma", "mucinous_carcinoma", "fibroadenoma", "ductal_carcinoma"]
    with pytest.raises(ValueError, match=r"--classes 'XX'.*A, F, PT, TA, DC, LC, MC, PC"):
        subtype_names(["XX"])


def test_classes_keep_only_those_subtypes(frame):
    out = make_split(frame, "patient", classes=["F", "DC"], test=0.3, val=0.3)
    assert set(out["subtype"]) == {"fibroadenoma", "ductal_carcinoma"}
    assert len(out) == frame["subtype"].isin(["fibroadenoma", "ductal_carcinoma"]).sum()
    with pytest.raises(ValueError, match="no image of subtype"):
        make_split(frame[frame["subtype"] != "tubular_adenoma"], "patient", classes=["TA"])


def test_test_patients_by_slide_id_hold_out_the_whole_patient(frame, caplog):
    # 22549AB names one slide; its patient 14-22549 has other slides (CD, G): all held out
    with caplog.at_level(logging.WARNING):
        out = make_split(frame, "patient", test_patients=["22549AB", "14-2523"], val=0.3)
    test = out[out["split"] == "test"]
    # 14-2523 shares an identical image with 14-21998 (the fixture's duplicate): linked
    assert set(test["patient_id"]) == {"14-22549", "14-2523", "14-21998"}
    assert (out.loc[out["patient_id"] == "14-22549", "split"] == "test").all()
    # named: slide 22549AB and patient 14-2523; the rest is their patients' other slides and
    # the linked patient: 2 x 4 magnifications x 2 images each for 22549CD/G, 8 for 21998CD
    n_named = ((out["slide_id"] == "22549AB") | (out["patient_id"] == "14-2523")).sum()
    extra = len(test) - n_named
    assert extra == 16 + 8 and f"{extra} more image(s) held out" in caplog.text
    assert {"train", "val", "test"} <= set(out["split"])
    assert audit(out).clean


def test_test_patients_must_exist_and_need_the_patient_protocol(frame):
    with pytest.raises(ValueError, match=r"1 id\(s\) match no image.*: 99999X"):
        make_split(frame, "patient", test_patients=["2523", "99999X"])
    with pytest.raises(ValueError, match="--test-patients works with --protocol patient"):
        make_split(frame, "kfold", test_patients=["2523"])


def test_cli_split_with_fixed_patients_and_classes(official_tree, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("21998CD\n")
    res = CliRunner().invoke(app, ["split", str(official_tree), "--out", str(tmp_path / "s"),
                                   "--classes", "F,DC", "--test-patients", str(ids),
                                   "-m", "40X"])
    assert res.exit_code == 0, res.output
    out = read_manifest(tmp_path / "s" / "manifest.csv")
    assert set(out["subtype"]) == {"fibroadenoma", "ductal_carcinoma"}
    assert set(out.loc[out["split"] == "test", "patient_id"]) == {"14-21998"}
    res = CliRunner().invoke(app, ["split", str(official_tree), "--out", str(tmp_path / "t"),
                                   "--classes", "ZZ"])
    assert res.exit_code == 2 and "--classes 'ZZ'" in res.output
