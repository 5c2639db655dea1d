"""Issue 12, data side: patients from BreakHis-derived names, ungrouped data refused, pixel
duplicates, contradictory CSVs, split values, symlinks and odd entries, umask, CSV errors,
float TIFFs."""

from __future__ import annotations

import os
import stat

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import write_image
from histoclass.cli import app
from histoclass.data import make_split, read_manifest, scan, write_manifest
from histoclass.data.breakhis import parse_name
from histoclass.data.images import load_rgb
from histoclass.data.scan import ScanError
from histoclass.data.splits import audit

runner = CliRunner()


# -- item 2: BreakHis-derived names, and data without groups -----------------------------------
@pytest.mark.parametrize(("name", "patient", "mag"), [
    ("SOB_B_A_14-22549AB_0.png", "14-22549", ""),
    ("SOB_M_DC-14-2523-40-010_crop3.png", "14-2523", "40X"),
    ("SOB_M_DC_14-12312_2.png", "14-12312", ""),
    ("tile_SOB_M_LC-14-15570-100-003 (1).png", "14-15570", "100X"),
])
def test_breakhis_derived_names_give_the_patient(name, patient, mag):
    n = parse_name(name)
    assert n is not None and n.derived
    assert (n.patient_id, n.magnification) == (patient, mag)


def test_crops_of_few_patients_split_by_patient(tmp_path):
    root = tmp_path / "crops"
    slides = [("B", "A", "22549AB"), ("B", "F", "21998CD"), ("B", "PT", "29315EF"),
              ("M", "DC", "2523"), ("M", "LC", "15570"), ("M", "MC", "19979")]
    seed = 0
    for cls, code, slide in slides:
        for k in range(4):
            seed += 1
            write_image(root / f"SOB_{cls}_{code}_14-{slide}_{k}.png", seed)
    result = scan(root)
    assert result.frame["patient_id"].nunique() == 6  # not 24 one-image "patients"
    assert result.ungrouped == 0 and not result.grouping_warnings()


def test_split_warns_and_audit_refuses_ungrouped_images(tmp_path):
    data = tmp_path / "d"
    for i in range(4):
        write_image(data / "benign" / f"img{i}.png", i)
        write_image(data / "malignant" / f"SOB_M_xx{i}.png", 10 + i)  # BreakHis-like, no id
    res = runner.invoke(app, ["split", str(data), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "WARNING: 4 BreakHis-like file name(s) (SOB_...)" in res.output
    assert "no patient ids for any of the 8 images" in res.output
    manifest = str(tmp_path / "s" / "manifest.csv")
    res = runner.invoke(app, ["audit", manifest])
    assert res.exit_code == 1
    assert "no patient ids for 8 of 8 images: leakage cannot be checked; pass --groups" \
        in res.output
    res = runner.invoke(app, ["audit", manifest, "--allow-ungrouped"])
    assert res.exit_code == 0 and "clean" in res.output and "no patient ids" in res.output


def test_groups_csv_makes_the_same_images_auditable(tmp_path):
    data = tmp_path / "d"
    for i in range(4):
        write_image(data / "benign" / f"img{i}.png", i)
    pd.DataFrame({"path": [f"benign/img{i}.png" for i in range(4)],
                  "group": ["p1", "p1", "p2", "p2"]}).to_csv(tmp_path / "g.csv", index=False)
    res = runner.invoke(app, ["split", str(data), "--out", str(tmp_path / "s"),
                              "--groups", str(tmp_path / "g.csv")])
    assert res.exit_code == 0 and "WARNING" not in res.output, res.output
    assert runner.invoke(app, ["audit", str(tmp_path / "s" / "manifest.csv")]).exit_code == 0


# -- item 3: pixel-identical copies with other bytes ---------------------------------------------
def test_resaved_copy_is_a_duplicate_and_audit_names_it(tmp_path):
    data = tmp_path / "d"
    src = write_image(data / "benign" / "SOB_B_A-14-22549AB-40-001.png", 1)
    copy = data / "malignant" / "SOB_M_DC-14-2523-40-001.png"
    copy.parent.mkdir(parents=True)
    Image.open(src).save(copy, compress_level=0)  # same pixels, other bytes
    write_image(data / "benign" / "SOB_B_F-14-21998CD-40-001.png", 2)
    write_image(data / "malignant" / "SOB_M_LC-14-15570-40-001.png", 3)
    assert src.read_bytes() != copy.read_bytes()
    result = scan(data)
    assert result.duplicates == [sorted([str(src.resolve()), str(copy.resolve())])]
    split = make_split(result.frame, "patient", val=0.0, test=0.5, seed=0)
    pair = split["path"].isin(result.duplicates[0])
    assert split.loc[pair, "split"].nunique() == 1  # linked: kept in one split
    split.loc[pair, "split"] = ["train", "test"]  # a hand-edited leak
    path = write_manifest(split, tmp_path / "m.csv")
    res = runner.invoke(app, ["audit", str(path)])
    assert res.exit_code == 1 and "duplicate image (same pixels) across splits" in res.output
    old = write_manifest(split.drop(columns=["pixel_sha256"]), tmp_path / "old.csv")
    res = runner.invoke(app, ["audit", str(old), "--allow-ungrouped"])
    assert "no pixel_sha256 column" in res.output  # an old manifest: said, not assumed clean


# -- item 4: contradictory CSV rows ----------------------------------------------------------
def _csv(tmp_path, rows):
    for p, *_ in rows:
        if not (tmp_path / p).exists():
            write_image(tmp_path / p, hash(p) % 1000)
    frame = pd.DataFrame(rows, columns=["path", "label", "subtype"])
    frame.to_csv(tmp_path / "in.csv", index=False)
    return tmp_path / "in.csv"


def test_contradictory_csv_rows_are_errors_naming_the_lines(tmp_path):
    with pytest.raises(ScanError, match=r"a\.png is listed with different labels \(line 2 "
                                         r"benign, line 3 malignant\)"):
        scan(_csv(tmp_path, [("a.png", "benign", ""), ("a.png", "malignant", "")]))
    with pytest.raises(ScanError, match=r"line 2: label malignant contradicts subtype adenosis"):
        scan(_csv(tmp_path, [("b.png", "malignant", "adenosis")]))
    with pytest.raises(ScanError, match=r"line 2: label benign but the file name "
                                         r"SOB_M_DC-14-2523-40-001\.png says malignant"):
        scan(_csv(tmp_path, [("SOB_M_DC-14-2523-40-001.png", "benign", "")]))
    kept = scan(_csv(tmp_path, [("c.png", "benign", ""), ("c.png", "benign", "")])).frame
    assert len(kept) == 1  # same label twice: kept once, with a warning


# -- item 5: split values --------------------------------------------------------------------
def test_split_values_are_validated_naming_the_rows(tmp_path):
    frame = make_split(scan(_ucsb()).frame, "kfold", folds=2)
    good = write_manifest(frame, tmp_path / "good.csv")
    assert len(read_manifest(good)) == len(frame)
    for col, values in (("split", ["Train", "train ", ""]), ("split_fold1", ["TEST"])):
        bad = frame.copy()
        bad.loc[: len(values) - 1, col] = values
        path = write_manifest(bad, tmp_path / f"bad_{col}.csv")
        with pytest.raises(ValueError, match=rf"column {col} must be one of train, val, test "
                                             r"\(exactly\); found line 2 "):
            read_manifest(path)
        res = runner.invoke(app, ["audit", str(path)])
        assert res.exit_code == 2 and "line 2" in res.output
        with pytest.raises(ValueError, match="must be one of"):
            audit(bad)


def _ucsb():
    from histoclass.data.manifest import sample_path

    return sample_path("ucsb")


# -- item 10: symlinks and odd entries ---------------------------------------------------------
def test_symlinked_folders_are_followed_and_odd_entries_listed(tmp_path):
    data, elsewhere = tmp_path / "d", tmp_path / "elsewhere"
    for i in range(2):
        write_image(data / "benign" / f"b{i}.png", i)
        write_image(elsewhere / f"m{i}.png", 10 + i)
    (data / "malignant").symlink_to(elsewhere, target_is_directory=True)
    (data / "benign" / "loop").symlink_to(data, target_is_directory=True)
    (data / "benign" / "gone.png").symlink_to(tmp_path / "nothing.png")
    os.mkfifo(data / "benign" / "pipe.png")
    (data / "benign" / "folder.png").mkdir()
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(data / "benign" / "anim.png", save_all=True, append_images=frames[1:])
    (data / "benign" / "slide.svs").write_bytes(b"II*\x00 a TIFF slide, not read")
    (data / "benign" / "SHA256SUMS").write_text("not data")
    result = scan(data)
    assert sorted(p.rsplit("/", 1)[-1] for p in result.frame["path"]) == ["b0.png", "b1.png",
                                                                          "m0.png", "m1.png"]
    reasons = {os.path.basename(p): why for p, why in result.skipped}
    assert reasons["gone.png"] == "dangling symlink"
    assert reasons["pipe.png"] == "not a regular file (FIFO)"
    assert reasons["folder.png"] == "empty folder"
    assert reasons["loop"].startswith("symlink loop")
    assert reasons["anim.png"].startswith("multi-frame image (2 frames")
    assert reasons["slide.svs"].startswith("TIFF image with suffix '.svs': not read")
    assert "SHA256SUMS" not in reasons  # not an image by content: not data
    from histoclass.predict import expand_inputs

    info, skipped = expand_inputs([data])  # predict and explain: the same walk
    assert len(info) == 5  # the 4 images and anim.png (refused when decoded)
    names = {os.path.basename(p) for p, _ in skipped}
    assert {"gone.png", "pipe.png", "folder.png", "loop"} <= names


# -- item 13: the umask -------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    import torch

    from histoclass.models.checkpoint import atomic_save

    old = os.umask(umask)
    try:
        files = [write_manifest(pd.DataFrame({"a": [1]}), tmp_path / "m.csv"),
                 atomic_save({"x": torch.zeros(1)}, tmp_path / "c.pt")]
    finally:
        os.umask(old)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


# -- item 15: CSV errors name the file; float TIFFs ------------------------------------------
@pytest.mark.parametrize("content", [b"", b"path,label\n\xff\xfe,benign\n"])
def test_empty_or_non_utf8_csv_errors_name_the_file(tmp_path, content):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    why = "empty file" if not content else "not UTF-8"
    with pytest.raises(ValueError, match=rf"{bad}: {why}"):
        scan(bad)
    with pytest.raises(ValueError, match=rf"{bad}: {why}"):
        read_manifest(bad)
    res = runner.invoke(app, ["evaluate", str(bad), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and str(bad) in res.output


def test_float_tiff_in_0_1_is_scaled_not_black(tmp_path):
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    rgb = np.asarray(load_rgb(tmp_path / "f.tif"))
    assert rgb.max() == 255 and rgb.min() == 0 and abs(rgb.mean() - 127.5) < 2
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(tmp_path / "n.tif")
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_rgb(tmp_path / "n.tif")

