"""``calibration.json`` of ``histoclass evaluate``: how calibrated the predicted probabilities
are on the evaluated (test) rows, and what the stated-risk referral rule did there (no torch).

From a predictions CSV (written with ``confidence``/``refer_reason`` columns, so by a model
that carries its calibration): ECE (15 bins) and Brier of the probabilities as predicted (after
the model's temperature), and, when some row was referred for low confidence, the coverage (the
share of images kept) and selective error (the error among them) with patient-bootstrap 95%
intervals (:func:`histoclass.metrics.bootstrap_ci`). The uncalibrated ("before") numbers are in
the checkpoint's ``calibration`` (validation): a CSV holds calibrated probabilities only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from histoclass import calibration, evidence
from histoclass.metrics import bootstrap_ci

BINS = 15


def _probs(frame: pd.DataFrame, prob_columns: list[str]) -> np.ndarray:
    p = frame[prob_columns].to_numpy(float)
    return np.column_stack([1 - p[:, 0], p[:, 0]]) if len(prob_columns) == 1 else p


def summary(frame: pd.DataFrame, prob_columns: list[str], settings: dict[str, Any]
            ) -> dict[str, Any] | None:
    """The ``calibration.json`` object for evaluated rows (with ``y``), or ``None`` when the
    predictions carry no ``confidence`` column (written before calibration existed).
    ``settings`` gives the evaluation's ``bootstrap`` replicates and ``seed``."""
    if "confidence" not in frame.columns:
        return None
    bootstrap, seed = settings.get("bootstrap", 1000), settings.get("seed", 0)
    y = frame["y"].to_numpy(int)
    p = _probs(frame, prob_columns)
    reasons = frame.get("refer_reason", pd.Series([""] * len(frame), index=frame.index))
    low = reasons.astype(str).str.contains("confidence ").to_numpy()

    def selective(f: pd.DataFrame) -> dict[str, float | None]:
        keep = ~f["_low"].to_numpy(bool)
        wrong = _probs(f, prob_columns).argmax(1) != f["y"].to_numpy(int)
        return {"coverage": float(keep.mean()) if len(f) else None,
                "selective_error": float(wrong[keep].mean()) if keep.any() else None}

    out: dict[str, Any] = {"images": len(y), "bins": BINS,
                           "ece": calibration.ece(p, y, BINS), "brier": calibration.brier(p, y),
                           "referral_rule": "confidence below the model's refer_risk threshold"
                           if low.any() else None}
    if low.any():
        work = frame.assign(_low=low)
        out.update(selective(work))
        note = evidence.ci_refusal(work) if bootstrap else "n/a: bootstrap 0"
        out["ci95"] = None if note else bootstrap_ci(selective, work, n=bootstrap, seed=seed)
        out["ci_note"] = note
    return out
