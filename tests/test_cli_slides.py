"""``histoclass slides`` end to end on the local engine: two slides and one bad file -> the run
manifest's statuses and the per-slide folders; a rerun skips what is done; ``histoclass slide``'s
per-slide options reach every slide."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

pytest.importorskip("openslide", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")

from histoclass.cli import app
from slide_helpers import canvas, sample_images, tiny_member, write_slide

FILES = ("tiles.csv", "heatmap.png", "heatmap.npy", "slide.geojson", "summary.json", "mask.png",
         "thumbnail.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_slides")
    imgs = sample_images(2)
    folder = root / "slides"
    folder.mkdir()
    write_slide(folder / "a.tiff", canvas(800, 600, [(50, 50, imgs[0])]))
    write_slide(folder / "b.tiff", canvas(800, 600, [(60, 80, imgs[1])]))
    (folder / "c.tiff").write_bytes(b"not a slide at all")
    return root, folder, tiny_member(root / "m.pt")


def slides(model, folder, out, *extra):
    return CliRunner().invoke(app, ["slides", str(model), str(folder), "--out", str(out),
                                    "--workers", "2", "--batch-size", "8", *extra])


def test_slides_cli_statuses_folders_and_rerun(setup):
    root, folder, model = setup
    out = root / "out"
    res = slides(model, folder, out)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "slides.csv").set_index("slide")
    assert list(table.loc[["a.tiff", "b.tiff", "c.tiff"], "status"]) == ["done", "done",
                                                                          "failed"]
    reason = table.loc["c.tiff", "reason"]
    assert "\n" not in reason and "not" in reason.lower()
    assert (table.loc[["a.tiff", "b.tiff"], "tiles"] > 0).all()
    for stem in ("a", "b"):
        assert all((out / stem / f).is_file() for f in FILES), stem
        assert len(pd.read_csv(out / stem / "tiles.csv")) > 0
    assert not (out / "c").exists()
    assert "(2 done, 1 failed)" in res.output and f"{folder / 'c.tiff'}: failed" in res.output

    before = {s: (out / s / "tiles.csv").stat().st_mtime_ns for s in ("a", "b")}
    again = slides(model, folder, out)
    assert again.exit_code == 0, again.output
    table = pd.read_csv(out / "slides.csv").set_index("slide")
    assert list(table.loc[["a.tiff", "b.tiff", "c.tiff"], "status"]) == ["skipped", "skipped",
                                                                          "failed"]
    assert {s: (out / s / "tiles.csv").stat().st_mtime_ns for s in ("a", "b")} == before
    assert "(2 skipped, 1 failed)" in again.output


def test_slide_options_are_forwarded_and_restart_scores_again(setup):
    root, _, model = setup
    pd.DataFrame({"path": ["slides/a.tiff"]}).to_csv(root / "a.csv", index=False)
    out = root / "opts"
    res = slides(model, root / "a.csv", out, "--top-k", "1", "--min-tissue", "0.9",
                 "--explain-top", "1", "--readers", "1")
    assert res.exit_code == 0, res.output
    s = json.loads((out / "a" / "summary.json").read_text())
    tiles = pd.read_csv(out / "a" / "tiles.csv")
    assert s["top_k"] == 1 and s["top_k_mean_p_malignant"] == pytest.approx(
        tiles["p_malignant"].max())
    assert s["tissue"]["min_tissue"] == 0.9 and (tiles["tissue"] >= 0.9).all() and len(tiles)
    assert any((out / "a" / "top").iterdir())  # --explain-top 1 wrote the top tile's figures
    before = (out / "a" / "summary.json").stat().st_mtime_ns
    again = slides(model, root / "a.csv", out, "--top-k", "1", "--restart")
    assert again.exit_code == 0, again.output
    assert list(pd.read_csv(out / "slides.csv")["status"]) == ["done"]
    assert (out / "a" / "summary.json").stat().st_mtime_ns > before
