"""``histoclass predict --engine ray``: a folder of field images scored on two Ray actors gives the
local run's CSV and skip list exactly (same rows, same order, same bad-file report)."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from typer.testing import CliRunner

pytest.importorskip("ray", reason="RAY TESTS SKIPPED: the 'ray' extra is missing")

import ray

from conftest import breakhis_name, write_image
from helpers_predict import make_member
from histoclass.cli import app
from histoclass.distributed import chunks


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_chunks_are_contiguous_and_cover_every_row_once():
    assert [list(r) for r in chunks(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(r) for r in chunks(2, 4)] == [[0], [1]]


def test_ray_csv_equals_local_csv(local_ray, tmp_path, caplog):
    model = make_member(tmp_path / "m.pt", size=32, seed=1)
    images = tmp_path / "images"
    for i in range(6):  # BreakHis names, so patient/magnification/label columns are filled
        write_image(images / breakhis_name("B" if i % 2 else "M", "A" if i % 2 else "DC", "14",
                                           f"{1000 + i}", "40", i + 1), seed=i)
    # sorts sixth of seven, inside the second chunk (rows 4-6): the chunk offsets matter
    (images / "SOB_M_DC-14-1003-40-999.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "notes.txt").write_text("not an image")
    runs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine / "pred.csv"
        with caplog.at_level(logging.INFO, logger="histoclass.distributed"):
            res = CliRunner().invoke(app, ["predict", str(model), str(images), "--out", str(out),
                                           "--engine", engine, "--workers", "2",
                                           "--batch-size", "2"])
        assert res.exit_code == 0, res.output
        assert "skipped 2 input(s)" in res.output and "6 image(s) predicted" in res.output
        runs[engine] = (pd.read_csv(out, dtype=str, keep_default_na=False),
                        pd.read_csv(out.with_name("pred.skipped.csv"), dtype=str))
    assert "scored 7 image(s) in 2 chunk(s) on Ray" in caplog.text  # the actors did score
    (local, local_bad), (got, got_bad) = runs["local"], runs["ray"]
    pd.testing.assert_frame_equal(got, local)
    pd.testing.assert_frame_equal(got_bad, local_bad)
    assert list(local["path"]) == sorted(str(p) for p in images.glob("SOB_*-40-00?.png"))
    # the folder walk's left-outs first, then the undecodable files in input order
    assert list(local_bad["path"]) == [str(images / "notes.txt"),
                                       str(images / "SOB_M_DC-14-1003-40-999.png")]
    assert local_bad.set_index("path").loc[str(images / "SOB_M_DC-14-1003-40-999.png"),
                                           "reason"].startswith("corrupt or truncated image")
    assert set(local["patient_id"]) == {f"14-{1000 + i}" for i in range(6)}
    assert local["p_malignant"].astype(float).nunique() == 6  # outputs depend on the image


def test_workers_beyond_the_cluster_are_capped_not_left_waiting(caplog):
    from histoclass.distributed import placeable

    with caplog.at_level(logging.WARNING, "histoclass"):
        assert placeable({"CPU": 2.0}, 4) == 2
    assert "holds 2 worker(s) of 1 CPU and 0 GPU(s) (it has 2 CPU, 0 GPU); starting 2, not 4" \
        in caplog.text
    assert placeable({"CPU": 8.0, "GPU": 1.0}, 4, 0.5) == 2
    assert placeable({"CPU": 8.0, "GPU": 2.0}, 2, 1.0) == 2
    with pytest.raises(ValueError, match=r"has 2 CPU\(s\) and 0 GPU\(s\): no room for one worker "
                       r"of 1 CPU and 1 GPU\(s\); lower --gpus-per-worker"):
        placeable({"CPU": 2.0}, 1, 1.0)
