"""Split protocols over an image table, and the leakage audit.

* ``patient`` (default): patient-disjoint train/val/test, stratified by class at patient level.
* ``paper``: Kalati et al.'s protocol, image-level random 70/15/15 stratified by class and
  magnification. One patient's images land in several splits, which inflates accuracy; every
  row carries ``protocol=paper`` so reports can say so.
* ``kfold``: patient-grouped stratified k folds. Column ``fold`` is the fold a row is tested in;
  column ``split_fold<k>`` gives train/val/test for fold ``k``, with the validation patients
  carved from that fold's training patients. ``split`` repeats ``split_fold0``.

Images with identical content are linked: their patients are kept together, so a duplicate can
never sit on both sides of a patient-disjoint split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

log = logging.getLogger(__name__)

PROTOCOLS = ("patient", "paper", "kfold")
LEAK_NOTE = "protocol=paper: images are split at random, so patients leak between splits"


def link_groups(frame: pd.DataFrame) -> pd.Series:
    """Patient ids merged where two patients share an identical image (union-find)."""
    parent: dict[str, str] = {p: p for p in frame["patient_id"]}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, pats in frame.groupby("sha256")["patient_id"]:
        first, *rest = sorted(set(pats))
        for other in rest:
            a, b = find(first), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return frame["patient_id"].map(find)


def _patient_labels(frame: pd.DataFrame, groups: pd.Series) -> pd.Series:
    # A patient's class for stratification is its majority image label (BreakHis has one).
    return (
        frame.assign(_g=groups.values).groupby("_g")["label"]
        .agg(lambda s: s.value_counts().sort_index().idxmax())
    )


def _carve(labels: pd.Series, fractions: dict[str, float], rng: np.random.Generator) -> dict:
    """Assign each group to a split, class by class, sizes rounded from ``fractions``."""
    out: dict[str, str] = {}
    for _, ids in labels.groupby(labels, sort=True):
        order = list(rng.permutation(sorted(ids.index)))
        start = 0
        for name, frac in fractions.items():
            n = round(frac * len(order))
            if frac > 0 and n == 0 and len(order) - start > 1:
                n = 1  # a split asked for should see every class when there is a patient to spare
            for gid in order[start:start + n]:
                out[gid] = name
            start += n
        for gid in order[start:]:
            out[gid] = "train"
    return out


def _patient_split(frame, groups, val, test, seed) -> pd.Series:
    labels = _patient_labels(frame, groups)
    where = _carve(labels, {"test": test, "val": val}, np.random.default_rng(seed))
    return groups.map(where)


def _paper_split(frame, val, test, seed) -> pd.Series:
    idx = np.arange(len(frame))
    strata = frame["label"] + "|" + frame["magnification"]

    def cut(ix, size, rs):
        for key in (strata.iloc[ix], frame["label"].iloc[ix], None):
            try:
                return train_test_split(ix, test_size=size, random_state=rs, stratify=key)
            except ValueError:
                continue  # a stratum with one image: fall back to coarser stratification
        raise ValueError(f"cannot split {len(ix)} images into fractions {size}")

    rest, test_ix = cut(idx, test, seed)
    train_ix, val_ix = cut(rest, val / (1.0 - test), seed + 1)
    split = np.empty(len(frame), dtype=object)
    split[train_ix], split[val_ix], split[test_ix] = "train", "val", "test"
    return pd.Series(split, index=frame.index)


def _kfold_split(frame, groups, val, folds, seed) -> pd.DataFrame:
    n_groups = groups.nunique()
    if folds < 2 or folds > n_groups:
        raise ValueError(f"--folds {folds}: need 2 <= folds <= number of patients ({n_groups})")
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.empty(len(frame), dtype=int)
    for k, (_, test_ix) in enumerate(cv.split(frame, frame["label"], groups)):
        fold[test_ix] = k
    out = pd.DataFrame({"fold": fold}, index=frame.index)
    for k in range(folds):
        train_rows = fold != k
        labels = _patient_labels(frame[train_rows], groups[train_rows])
        where = _carve(labels, {"val": val}, np.random.default_rng(seed + 1 + k))
        col = groups.map(where).where(train_rows, "test")
        out[f"split_fold{k}"] = col
    out["split"] = out["split_fold0"]
    return out


def make_split(
    frame: pd.DataFrame,
    protocol: str = "patient",
    *,
    seed: int = 0,
    val: float = 0.15,
    test: float = 0.15,
    folds: int = 5,
    magnifications: list[str] | None = None,
) -> pd.DataFrame:
    """Add split columns to an image table (see the module docstring for the protocols).

    Args:
        frame: Table from :func:`histoclass.data.scan.scan`.
        protocol: One of ``patient``, ``paper``, ``kfold``.
        seed: Same seed and same input give the same split.
        val: Validation fraction (of all patients; for ``kfold`` of each fold's training ones).
        test: Test fraction (``patient`` and ``paper``).
        folds: Number of folds (``kfold``).
        magnifications: Keep only these magnifications, e.g. ``["40X"]``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    for name, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"--{name} {frac}: must be in [0, 1)")
    if val + test >= 1.0:
        raise ValueError(f"--val {val} + --test {test} leaves no training data")
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    if magnifications:
        wanted = [m.upper() if m.upper().endswith("X") else f"{m}X" for m in magnifications]
        known = sorted(set(frame["magnification"]) - {""})
        frame = frame[frame["magnification"].isin(wanted)].reset_index(drop=True)
        if frame.empty:
            raise ValueError(f"no image at magnification {wanted}; the data has {known}")
    groups = link_groups(frame)
    out = frame.copy()
    out["protocol"] = protocol
    if protocol == "patient":
        out["split"] = _patient_split(frame, groups, val, test, seed)
    elif protocol == "paper":
        log.warning(LEAK_NOTE)
        out["split"] = _paper_split(frame, val, test, seed)
    else:
        out = pd.concat([out, _kfold_split(frame, groups, val, folds, seed)], axis=1)
    return out


@dataclass
class AuditReport:
    """Patients and duplicate images found in more than one split of some split column."""

    leaking_patients: dict[str, list[str]]  # split column -> patient ids
    leaking_duplicates: dict[str, list[str]]  # split column -> sha256
    n_images: int
    n_patients: int
    columns: list[str]

    @property
    def clean(self) -> bool:
        """True when no patient and no duplicate image crosses splits."""
        return not any(self.leaking_patients.values()) and not any(
            self.leaking_duplicates.values()
        )


def split_columns(frame: pd.DataFrame) -> list[str]:
    """The columns holding train/val/test assignments (``split`` and per-fold ones)."""
    cols = sorted(c for c in frame.columns if c.startswith("split_fold"))
    return cols or (["split"] if "split" in frame.columns else [])


def audit(frame: pd.DataFrame) -> AuditReport:
    """Find patients and identical images that sit in more than one split."""
    cols = split_columns(frame)
    if not cols:
        raise ValueError(f"no split column; columns are {list(frame.columns)}")
    pats, dups = {}, {}
    for col in cols:
        part = frame[frame[col].astype(str).isin(["train", "val", "test"])]
        per_pat = part.groupby("patient_id")[col].nunique()
        pats[col] = sorted(per_pat[per_pat > 1].index)
        if "sha256" in part.columns:
            per_hash = part.groupby("sha256")[col].nunique()
            dups[col] = sorted(per_hash[per_hash > 1].index)
    return AuditReport(pats, dups, len(frame), frame["patient_id"].nunique(), cols)
