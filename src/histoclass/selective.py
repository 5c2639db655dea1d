"""``calibration.json`` of ``histoclass evaluate``: how calibrated the predicted probabilities
are on the evaluated (test) rows, before and after the model's temperature, and what
accepting only confident images does there (no torch).

From a predictions CSV:

* ECE (15 bins) and Brier of the probabilities as predicted (``p_...``, after the model's
  temperature) and, when the CSV has them, of its ``raw.p_...`` columns (before it: written
  whenever ``T != 1``). Without them the model applied no temperature, and the record says
  ``not calibrated`` instead of inventing a "before".
* The reliability bins of both (what the report draws).
* The risk-coverage curve of the top-label confidence and its AURC
  (:func:`histoclass.calibration.risk_coverage`), with the point the model's ``--refer-risk``
  rule chose: when some row was referred for low confidence, the coverage (the share of images
  kept) and selective error (the error among them) with patient-bootstrap 95% intervals
  (:func:`histoclass.metrics.bootstrap_ci`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from histoclass import calibration, evidence
from histoclass.metrics import bootstrap_ci, reliability, top_label

BINS = 15
CURVE_POINTS = 200  # the stored curve is thinned to at most this many points; AURC is exact
NOT_CALIBRATED = ("not calibrated: the predictions carry no raw.p_ columns, so the model "
                  "applied no temperature of its own (T = 1; an ensemble's members may apply "
                  "theirs); there is no 'before' to compare")


def _probs(frame: pd.DataFrame, prob_columns: list[str]) -> np.ndarray:
    p = frame[prob_columns].to_numpy(float)
    return np.column_stack([1 - p[:, 0], p[:, 0]]) if len(prob_columns) == 1 else p


def _before(frame: pd.DataFrame, prob_columns: list[str]) -> tuple[pd.DataFrame | None, int]:
    """The rows' probabilities before the temperature (``raw.p_``), or ``None`` when no file
    has them, and how many rows lack them. A file (fold) without the columns applied none
    (T = 1: its ``p_`` are its raw ones); an empty cell in a file that has them underflowed
    (:func:`histoclass.calibration.recovered`) and is left out of "before"."""
    raw = [f"raw.{c}" for c in prob_columns]
    if not all(c in frame.columns for c in raw):
        return None, 0
    out = frame[raw].apply(pd.to_numeric, errors="coerce")  # an empty cell is unknown
    by = frame["source"] if "source" in frame.columns else pd.Series(0, index=frame.index)
    untempered = out.isna().all(axis=1).groupby(by).transform("all").to_numpy()
    out.loc[untempered, :] = frame.loc[untempered, prob_columns].to_numpy(float)
    out.columns = prob_columns
    return out, int(out.isna().any(axis=1).sum())


def _bins(y: np.ndarray, p: np.ndarray) -> dict[str, list]:
    n, acc, conf = reliability(*top_label(y, p), BINS)
    clean = [None if not np.isfinite(v) else float(v) for v in (*acc, *conf)]
    return {"count": n.astype(int).tolist(), "accuracy": clean[:BINS], "confidence": clean[BINS:]}


def _thin(curve: dict[str, Any]) -> dict[str, Any]:
    keep = np.unique(np.linspace(0, len(curve["coverage"]) - 1, CURVE_POINTS).round().astype(int))
    return {**curve, **{k: [curve[k][i] for i in keep]
                        for k in ("threshold", "coverage", "selective_error")}}


def summary(frame: pd.DataFrame, prob_columns: list[str], settings: dict[str, Any]
            ) -> dict[str, Any] | None:
    """The ``calibration.json`` object for evaluated rows (with ``y``), or ``None`` for no
    rows. ``settings`` gives the evaluation's ``bootstrap`` replicates and ``seed``."""
    if len(frame) == 0:
        return None
    bootstrap, seed = settings.get("bootstrap", 1000), settings.get("seed", 0)
    y = frame["y"].to_numpy(int)
    p = _probs(frame, prob_columns)
    raw_frame, lost = _before(frame, prob_columns)
    raw = raw_frame is not None
    keep = raw_frame.notna().all(axis=1).to_numpy() if raw else None
    before = _probs(raw_frame[keep], prob_columns) if raw else None
    y_before = y[keep] if raw else None
    reasons = frame.get("refer_reason", pd.Series([""] * len(frame), index=frame.index))
    low = reasons.astype(str).str.contains("confidence ").to_numpy()

    def selective(f: pd.DataFrame) -> dict[str, float | None]:
        keep = ~f["_low"].to_numpy(bool)
        wrong = _probs(f, prob_columns).argmax(1) != f["y"].to_numpy(int)
        return {"coverage": float(keep.mean()) if len(f) else None,
                "selective_error": float(wrong[keep].mean()) if keep.any() else None}

    curve = calibration.risk_coverage(p.max(1), p.argmax(1) == y)
    out: dict[str, Any] = {
        "images": len(y), "bins": BINS, "calibrated": raw, "note": None if raw else NOT_CALIBRATED,
        "ece": calibration.ece(p, y, BINS), "brier": calibration.brier(p, y),
        "ece_before": calibration.ece(before, y_before, BINS) if raw else None,
        "brier_before": calibration.brier(before, y_before) if raw else None,
        "before_rows_unknown": lost,
        "reliability": {"after": _bins(y, p), "before": _bins(y_before, before) if raw
                        else None},
        "risk_coverage": _thin(curve),
        "referral_rule": "confidence below the model's refer_risk threshold" if low.any()
        else None}
    if low.any():
        work = frame.assign(_low=low)
        out.update(selective(work))
        note = evidence.ci_refusal(work) if bootstrap else "n/a: bootstrap 0"
        out["ci95"] = None if note else bootstrap_ci(selective, work, n=bootstrap, seed=seed)
        out["ci_note"] = note
    return out
