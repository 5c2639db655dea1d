"""Many slides on the local process pool and on a local Ray: manifest, failures, rerun, a killed
worker retried. tiles.csv is compared per tile: same rows, probabilities within 1e-6."""

from __future__ import annotations

from functools import partial

import pandas as pd
import pytest

pytest.importorskip("openslide", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")
pytest.importorskip("ray", reason="RAY TESTS SKIPPED: the 'ray' extra is missing")

import ray

from histoclass.api import open_classifier
from histoclass.slides import SlideOptions
from histoclass.slides.engine import CRASH_ENV, run_slides
from slide_helpers import canvas, sample_images, tiny_member, write_slide

OPTS = SlideOptions(batch_size=8, workers=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    imgs = sample_images(2)
    folder = root / "slides"
    folder.mkdir()
    write_slide(folder / "a.tiff", canvas(800, 600, [(50, 50, imgs[0])]))
    write_slide(folder / "b.tiff", canvas(800, 600, [(60, 80, imgs[1])]))
    (folder / "c.tiff").write_bytes(b"not a slide at all")
    opener = partial(open_classifier, tiny_member(root / "m.pt"), "torch", "cpu")
    marker = root / "crashed"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {CRASH_ENV: f"b:{marker}"}})
    yield root, folder, opener, marker
    ray.shutdown()


def test_ray_matches_local_fails_one_reruns_nothing_and_survives_a_killed_worker(setup):
    root, folder, opener, marker = setup
    local = run_slides(opener, folder, root / "local", "local", workers=2, options=OPTS)
    got = run_slides(opener, folder, root / "ray", "ray", workers=2, options=OPTS)
    assert marker.exists()  # the worker scoring b.tiff exited mid-slide, once, and was retried
    for table in (local, got):
        by = table.set_index("slide")
        assert list(by.loc[["a.tiff", "b.tiff"], "status"]) == ["done", "done"]
        assert by.loc["c.tiff", "status"] == "failed"
        assert "not" in by.loc["c.tiff", "reason"].lower() and "\n" not in by.loc["c.tiff",
                                                                                "reason"]
        assert (by.loc[["a.tiff", "b.tiff"], "tiles"] > 0).all()
    assert got.set_index("slide").loc["a.tiff", "worker"].startswith("ray:")
    for stem in ("a", "b"):  # the same tiles and probabilities (1e-6), b resumed after the kill
        r = pd.read_csv(root / "ray" / stem / "tiles.csv").sort_values(["row", "col"])
        lo = pd.read_csv(root / "local" / stem / "tiles.csv").sort_values(["row", "col"])
        assert list(r.columns) == list(lo.columns) and len(r) == len(lo) > 0
        num = [c for c in r.columns if r[c].dtype.kind == "f"]
        assert (r[num].to_numpy() - lo[num].to_numpy()).__abs__().max() <= 1e-6
        assert (r.drop(columns=num).to_numpy() == lo.drop(columns=num).to_numpy()).all()
    assert list(local["tiles"].iloc[:2]) == list(got["tiles"].iloc[:2])
    before = (root / "ray" / "a" / "tiles.csv").stat().st_mtime_ns
    again = run_slides(opener, folder, root / "ray", "ray", workers=2, options=OPTS)
    by = again.set_index("slide")
    assert list(by.loc[["a.tiff", "b.tiff"], "status"]) == ["skipped", "skipped"]
    assert by.loc["c.tiff", "status"] == "failed"  # a failed slide is tried again
    assert (root / "ray" / "a" / "tiles.csv").stat().st_mtime_ns == before


def test_csv_of_slides_and_bad_engine(setup, tmp_path):
    root, folder, opener, _ = setup
    pd.DataFrame({"path": ["slides/a.tiff"], "patient_id": ["P1"]}).to_csv(
        root / "list.csv", index=False)
    table = run_slides(opener, root / "list.csv", tmp_path, "local", options=OPTS)
    assert list(table["status"]) == ["done"] and list(table["patient_id"]) == ["P1"]
    with pytest.raises(ValueError, match="unknown engine 'dask'; choose one of local, ray"):
        run_slides(opener, folder, tmp_path, "dask")
