"""What an evaluation may claim from a predictions table, and what it must not.

* Rows the model gave no answer for (an ``error`` cell: a non-finite output) are not scored;
  they are counted and named, never silently dropped or turned into a class.
* Patient-level metrics need a patient id on every row. Predictions of a folder of files whose
  names do not parse have none: pooling them as one "patient" would print a patient accuracy
  of 0 or 1 with a zero-width interval. Without ids the patient metrics are ``None`` and the
  reason is :data:`NO_PATIENTS`; ``histoclass evaluate --groups CSV`` supplies ids.
* A patient-bootstrap interval needs patients to resample: at least :data:`CI_MIN_PATIENTS`
  patients of every class present (a patient's class is the most common label of its images).
  Below that, resampling a handful of patients gives intervals that look precise and are not.
* The report names where the rows came from (a folder of images, or a manifest split, its
  protocol and fold), not the ``--split`` option's value.

Pure pandas (no torch), so it sits beside :mod:`histoclass.metrics`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from histoclass.data.files import read_csv

log = logging.getLogger(__name__)

CI_MIN_PATIENTS = 5
NO_PATIENTS = "n/a: no patient ids; pass --groups CSV"
CI_RULE = (f"95% CIs resample patients; they are given only when every class present has at "
           f"least {CI_MIN_PATIENTS} patients")


def drop_errors(frame: pd.DataFrame, source: str) -> tuple[pd.DataFrame, int]:
    """The rows with an empty (or no) ``error`` cell, and how many rows had one."""
    if "error" not in frame.columns:
        return frame, 0
    bad = frame["error"].astype(str).str.strip() != ""
    if bad.any():
        first = frame.loc[bad, "path"].iloc[0]
        log.warning("%s: %d row(s) have no prediction (e.g. %s: %s); they are not evaluated",
                    source, int(bad.sum()), first, frame.loc[bad, "error"].iloc[0])
    return frame[~bad].reset_index(drop=True), int(bad.sum())


def probability_column(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """``frame[column]`` as floats, refusing anything that is not a number in ``[0, 1]`` (an
    empty cell, text, NaN) with the CSV line that holds it."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(float)
    bad = ~((values >= 0) & (values <= 1))  # also catches NaN from empty or non-numeric cells
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: column {column} row {row + 2} is {frame[column].iloc[row]!r};"
                         " probabilities must be numbers in [0, 1]")
    return values


def patients_known(frame: pd.DataFrame) -> bool:
    """True when every row has a patient id (patient-level metrics are then defined)."""
    return len(frame) > 0 and bool((frame["patient_id"].astype(str).str.strip() != "").all())


def _suffixes(path: str) -> list[str]:
    parts = Path(path).as_posix().split("/")
    return ["/".join(parts[-k:]) for k in range(1, len(parts) + 1)]


def attach_groups(frame: pd.DataFrame, groups: str | Path) -> pd.DataFrame:
    """``patient_id`` taken from a ``path,group`` CSV (it wins over ids in the predictions).

    A groups path matches a prediction's path when both resolve to the same file (relative
    groups paths are relative to the groups CSV, relative prediction paths to their CSV), or
    when it is a trailing part of it (``benign/a.png`` matches ``/data/benign/a.png``).
    Rows it does not cover keep their id, with a warning counting them.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a CSV with ``path`` and ``group`` columns.
    """
    table = read_csv(groups, "groups CSV")
    if not {"path", "group"} <= set(table.columns):
        raise ValueError(f"{groups}: a groups CSV needs columns path,group; has "
                         f"{list(table.columns)}")
    base = Path(groups).resolve().parent
    exact = {os.path.normpath(base / p): g for p, g in zip(table["path"], table["group"],
                                                           strict=True)}
    tails = {Path(p).as_posix().lstrip("./"): g for p, g in zip(table["path"], table["group"],
                                                                strict=True)}
    out, missing = [], 0
    for path, pid, src in zip(frame["path"], frame["patient_id"], frame["source"], strict=True):
        full = os.path.normpath(Path(src).resolve().parent / path)
        group = exact.get(full) or next((tails[t] for t in _suffixes(path) if t in tails), None)
        missing += group is None
        out.append(pid if group is None else group)
    if missing:
        log.warning("%s: no group for %d of %d prediction row(s); they keep their patient id "
                    "(if any)", groups, missing, len(frame))
    return frame.assign(patient_id=out)


def ci_refusal(frame: pd.DataFrame) -> str | None:
    """Why patient-bootstrap CIs cannot be given for these rows (``y`` holds the class), or
    ``None`` when they can (:data:`CI_RULE`)."""
    if not patients_known(frame):
        return NO_PATIENTS
    per_patient = frame.groupby("patient_id")["y"].agg(lambda s: s.value_counts().idxmax())
    counts = per_patient.value_counts()
    if counts.min() < CI_MIN_PATIENTS:
        shown = ", ".join(f"{n} of class {c}" for c, n in sorted(counts.items()))
        return (f"n/a: too few patients to resample ({shown}); a patient bootstrap needs at "
                f"least {CI_MIN_PATIENTS} patients of every class")
    return None


def describe_source(frame: pd.DataFrame) -> str:
    """Where the rows came from: a folder of images, or a manifest split (protocol, fold)."""
    splits = sorted(set(frame.get("split", pd.Series(dtype=str))) - {""})
    if not splits:
        paths = [str(Path(p).parent) for p in frame["path"]]
        where = os.path.commonpath(paths) if paths and all(os.path.isabs(p) for p in paths) \
            else "the given paths"
        return f"images given directly (no manifest split) under {where}"
    text = f"manifest split {', '.join(splits)}"
    protocols = sorted(set(frame.get("protocol", pd.Series(dtype=str))) - {""})
    if protocols:
        text += f" (protocol {', '.join(protocols)})"
    folds = sorted(set(frame.get("fold", pd.Series(dtype=str)).astype(str)) - {"", "nan"})
    if folds:
        text += f", fold{'s' if len(folds) > 1 else ''} {', '.join(folds)}"
    return text
