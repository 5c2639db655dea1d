"""Scanning the four accepted layouts, with bad files and duplicates."""

import pandas as pd
import pytest

from conftest import SLIDES, write_image
from histoclass.data.scan import ScanError, scan


def test_official_tree(official_tree):
    result = scan(official_tree)
    frame = result.frame
    # 16 slides x 4 magnifications x 2 images + 1 duplicate copy; the corrupt file is skipped.
    assert len(frame) == len(SLIDES) * 4 * 2 + 1
    assert [p.rsplit("/", 1)[-1] for p, _ in result.skipped] == ["SOB_B_A-14-22549AB-40-009.png"]
    assert "corrupt or truncated" in result.skipped[0][1]
    assert set(frame["magnification"]) == {"40X", "100X", "200X", "400X"}
    assert frame.loc[frame["slide_id"].str.startswith("22549"), "patient_id"].unique().tolist() \
        == ["14-22549"]
    assert set(frame.loc[frame["patient_id"] == "14-13412", "subtype"]) == {
        "ductal_carcinoma", "lobular_carcinoma"}
    assert frame["patient_id"].nunique() == 13  # 16 slides - 2 (3 slides of 14-22549) - 1 (DC/LC)
    assert len(result.duplicates) == 1 and len(result.duplicates[0]) == 2
    assert "1 skipped" in result.summary() and "2 in 1 duplicate groups" in result.summary()


def test_class_folders_of_breakhis_names(class_folder_tree):
    frame = scan(class_folder_tree).frame
    assert len(frame) == len(SLIDES) * 2
    assert set(frame["label"]) == {"benign", "malignant"}
    assert frame["subtype"].ne("").all()  # subtype comes from the name, not the folder


def test_subtype_folders_with_other_names_and_groups_csv(tmp_path):
    root = tmp_path / "d"
    for i in range(3):
        write_image(root / "fibroadenoma" / f"img{i}.png", i)
        write_image(root / "lobular_carcinoma" / f"x{i}.png", 10 + i)
    pd.DataFrame({"path": ["fibroadenoma/img0.png", "fibroadenoma/img1.png"],
                  "group": ["p1", "p1"]}).to_csv(root / "groups.csv", index=False)
    frame = scan(root).frame.set_index(frame_key := "path")
    by_name = {p.rsplit("/", 1)[-1]: r for p, r in frame.iterrows()}
    assert frame_key == "path"
    assert by_name["img0.png"]["patient_id"] == by_name["img1.png"]["patient_id"] == "p1"
    assert by_name["img2.png"]["patient_id"] == "fibroadenoma/img2"  # its own group
    assert (by_name["x0.png"]["label"], by_name["x0.png"]["subtype"]) == (
        "malignant", "lobular_carcinoma")


def test_unknown_name_without_class_folder_is_skipped_by_name(tmp_path):
    write_image(tmp_path / "benign" / "a.png", 1)
    write_image(tmp_path / "misc" / "mystery.png", 2)
    result = scan(tmp_path)
    assert len(result.frame) == 1
    (path, reason), = result.skipped
    assert path.endswith("mystery.png") and reason.startswith("unknown file name")


def test_csv_input_keeps_groups_and_resolves_relative_paths(tmp_path):
    for i in range(4):
        write_image(tmp_path / "imgs" / f"{i}.png", i)
    pd.DataFrame({"path": [f"imgs/{i}.png" for i in range(4)],
                  "label": ["benign", "malignant", "Benign", "tumour"],
                  "group": ["g1", "g1", "g2", "g3"]}).to_csv(tmp_path / "t.csv", index=False)
    result = scan(tmp_path / "t.csv")
    assert result.frame["patient_id"].tolist() == ["g1", "g1", "g2"]
    assert result.frame["path"].str.startswith(str(tmp_path)).all()
    assert result.skipped[0][1] == "label 'tumour' is not one of ['benign', 'malignant']"


def test_csv_without_label_column(tmp_path):
    (tmp_path / "t.csv").write_text("path,group\na.png,g\n")
    with pytest.raises(ScanError, match=r"missing column\(s\) \['label'\]"):
        scan(tmp_path / "t.csv")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match=r"empty: no images found \(looked for .*\.png"):
        scan(tmp_path / "empty")


def test_missing_input(tmp_path):
    with pytest.raises(ScanError, match="nothing: no such file or folder"):
        scan(tmp_path / "nothing")


def test_only_bad_images(tmp_path):
    (tmp_path / "benign").mkdir()
    (tmp_path / "benign" / "a.png").write_text("not a png")
    with pytest.raises(ScanError, match=r"none of the 1 image file\(s\) could be read"):
        scan(tmp_path)
