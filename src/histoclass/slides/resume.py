"""Resuming a slide run: ``run.json`` records what produced ``tiles.csv``; a rerun with the same
settings and model continues it, anything else is refused (or restarted on request).

The model is identified by its classes, rule, members and its probabilities on a bundled H&E
image, so changed weights are caught whatever the backend (PyTorch and ONNX FP32 agree within
:data:`PROBE_TOLERANCE`, so a run may resume on the other backend).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclass.models.classifier import Classifier
from histoclass.slides import outputs
from histoclass.slides.reader import SlideError

log = logging.getLogger(__name__)
PROBE_TOLERANCE = 1e-3  # torch and ONNX FP32 agree to ~1e-6; another model differs far more


def fingerprint(clf: Classifier) -> dict[str, Any]:
    """What identifies the model for resuming: classes, rule, members and its probabilities on
    a bundled H&E image (changed weights change them)."""
    from histoclass.data.images import load_rgb
    from histoclass.data.manifest import sample_path

    probe = sorted(sample_path("breakhis").glob("*.png"))[0]
    p = clf.predict_images([np.asarray(load_rgb(probe))]).proba[0]
    return {"classes": list(clf.classes), "method": clf.method, "members": clf.member_names,
            "probe": [round(float(v), 6) for v in p]}


def _same_run(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = [k for k in new if k != "model" and old.get(k) != new[k]]
    om, nm = old.get("model", {}), new["model"]
    changed += [f"model {k}" for k in ("classes", "method", "members") if om.get(k) != nm[k]]
    if len(om.get("probe", [])) != len(nm["probe"]) or not np.allclose(
            om.get("probe", []), nm["probe"], atol=PROBE_TOLERANCE):
        changed.append("model weights (other probabilities on the probe image)")
    return changed


def resume(folder: Path, record: dict[str, Any], columns: list[str], restart: bool
            ) -> pd.DataFrame:
    """Tiles already in ``tiles.csv`` from a run with the same settings (a torn last line from
    a killed run is cut off); raises :class:`SlideError` when the folder holds another run."""
    tiles, run_json = folder / "tiles.csv", folder / "run.json"
    if restart:
        tiles.unlink(missing_ok=True)
    if tiles.exists() and tiles.stat().st_size:
        old = json.loads(run_json.read_text()) if run_json.exists() else {}
        changed = _same_run(old, record) if old else ["run.json missing"]
        if changed:
            raise SlideError(f"{folder} holds tiles of another run ({'; '.join(changed)}); "
                             "pass --restart to score again, or choose another --out")
        raw = tiles.read_bytes()
        cut = raw.rfind(b"\n") + 1
        if cut < len(raw):
            log.warning("%s: dropping a torn last line (the run was interrupted)", tiles)
            with open(tiles, "r+b") as fh:
                fh.truncate(cut)
        done = pd.read_csv(tiles) if cut else pd.DataFrame(columns=columns)
        if list(done.columns) != columns:
            raise SlideError(f"{tiles}: columns {list(done.columns)} are not this run's "
                             f"{columns}; pass --restart")
        return done.drop_duplicates(["row", "col"])
    outputs.write_json(record, run_json)
    return pd.DataFrame(columns=columns)
