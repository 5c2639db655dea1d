"""The local engine survives dead worker processes: a new pool, the slides in flight retried one
at a time (resuming from their tiles), a slide that kills its worker every time failed after
RETRIES attempts with one line, and the other slide exactly as in an uninterrupted run."""

from __future__ import annotations

import json
from functools import partial

import pandas as pd
import pytest

pytest.importorskip("openslide", reason="SLIDE TESTS SKIPPED: the 'slides' extra is missing")

from histoclass.api import open_classifier
from histoclass.distributed import RETRIES
from histoclass.slides import SlideOptions, predict_slide
from histoclass.slides.engine import CRASH_ENV, run_slides
from slide_helpers import canvas, sample_images, tiny_member, write_slide

OPTS = SlideOptions(batch_size=4, workers=1)


def test_dead_workers_are_replaced_and_their_slides_retried(tmp_path, monkeypatch):
    imgs = sample_images(2)
    folder = tmp_path / "slides"
    folder.mkdir()
    for i, stem in enumerate("ab"):
        write_slide(folder / f"{stem}.tiff", canvas(800, 600, [(50 + 10 * i, 60, imgs[i])]))
    model = tiny_member(tmp_path / "m.pt")
    # the uninterrupted run of a, in this process (the workers run this very function)
    predict_slide(open_classifier(model, "torch", "cpu"), folder / "a.tiff", tmp_path / "plain",
                  OPTS)
    marker = tmp_path / "a_crashed"
    # a: its worker exits mid-slide once; b: every time (empty marker)
    monkeypatch.setenv(CRASH_ENV, f"a:{marker},b:")
    got = run_slides(partial(open_classifier, model, "torch", "cpu"), folder, tmp_path / "crash",
                     "local", workers=2, options=OPTS)
    by = got.set_index("slide")
    assert marker.exists()
    assert by.loc["a.tiff", "status"] == "done"
    assert by.loc["b.tiff", "status"] == "failed"
    assert by.loc["b.tiff", "reason"] == (
        f"the worker process died on all {RETRIES} attempts at this slide (crash or out of "
        "memory); rerun to resume")
    # a resumed after its kill(s) and was in flight at b's: as uninterrupted
    lo = pd.read_csv(tmp_path / "plain" / "a" / "tiles.csv").sort_values(["row", "col"])
    r = pd.read_csv(tmp_path / "crash" / "a" / "tiles.csv").sort_values(["row", "col"])
    assert list(r.columns) == list(lo.columns) and len(r) == len(lo) > 4  # > 1 batch
    num = [c for c in r.columns if r[c].dtype.kind == "f"]
    assert abs(r[num].to_numpy() - lo[num].to_numpy()).max() <= 1e-6
    assert (r.drop(columns=num).to_numpy() == lo.drop(columns=num).to_numpy()).all()
    s_lo, s_r = (json.loads((tmp_path / k / "a" / "summary.json").read_text())
                 for k in ("plain", "crash"))
    assert s_r["verdict"] == s_lo["verdict"] and s_r["tiles_scored"] == s_lo["tiles_scored"]
    assert s_r["top_k_mean_p_malignant"] == pytest.approx(s_lo["top_k_mean_p_malignant"], abs=1e-6)
    assert not (tmp_path / "crash" / "b" / "summary.json").exists()
