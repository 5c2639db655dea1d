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
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from histoclass.data.fixed import held_out_groups, keep_classes

log = logging.getLogger(__name__)

PROTOCOLS = ("patient", "paper", "kfold")
LEAK_NOTE = "protocol=paper: images are split at random, so patients leak between splits"


# Two images are duplicates when their bytes or their decoded pixels are equal (a re-saved copy
# has other bytes); manifests written before pixel hashes have no pixel_sha256 column.
HASHES = ("sha256", "pixel_sha256")
SPLITS = ("train", "val", "test")


def _linked(values: pd.Series, frame: pd.DataFrame) -> pd.Series:
    """Each value mapped to one representative, values of rows sharing a hash merged
    (union-find)."""
    parent: dict[str, str] = {v: v for v in values}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for col in HASHES:
        if col not in frame.columns:
            continue
        for key, vals in values.groupby(frame[col].astype(str)):
            if key == "":  # not computed
                continue
            first, *rest = sorted(set(vals))
            for other in rest:
                a, b = find(first), find(other)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return values.map(find)


def link_groups(frame: pd.DataFrame) -> pd.Series:
    """Patient ids merged where two patients share an identical image (same bytes or same
    pixels)."""
    return _linked(frame["patient_id"], frame)


def duplicate_groups(frame: pd.DataFrame) -> list[list[str]]:
    """Paths of images with the same bytes or the same pixels, one sorted list per group."""
    rep = _linked(frame["path"].astype(str), frame)
    groups = [sorted(g) for _, g in frame["path"].groupby(rep.values) if len(g) > 1]
    return sorted(groups)


def check_split_values(frame: pd.DataFrame, source: str = "manifest") -> None:
    """Raise ``ValueError`` naming the rows (CSV line numbers) of any split column holding a
    value other than ``train``, ``val``, ``test`` (``Train``, ``train `` and empty cells
    included: such rows would silently drop out of every split)."""
    cols = ["split"] if "split" in frame.columns else []
    for col in cols + [c for c in split_columns(frame) if c != "split"]:  # k-fold: split too
        values = frame[col].astype(str)
        bad = ~values.isin(SPLITS)
        if bad.any():
            lines = [f"line {i + 2} {v!r}" for i, v in zip(np.flatnonzero(bad), values[bad],
                                                             strict=True)]
            shown = ", ".join(lines[:8]) + (f", ... ({len(lines)} rows)" if len(lines) > 8
                                            else "")
            raise ValueError(f"{source}: column {col} must be one of {', '.join(SPLITS)} "
                             f"(exactly); found {shown}")


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
    classes: list[str] | None = None,
    test_patients: list[str] | None = None,
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
        classes: Keep only these BreakHis subtypes (codes ``TA`` or names), e.g. eva's 4.
        test_patients: ``patient`` protocol: these patients (``patient_id`` or BreakHis
            ``slide_id``, all slides of the patient) are the test split, replacing ``test``;
            validation patients are carved from the others (see :mod:`histoclass.data.fixed`).
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
    if classes:
        frame = keep_classes(frame, classes)
    if test_patients and protocol != "patient":
        raise ValueError(f"--test-patients works with --protocol patient, not {protocol!r}")
    groups = link_groups(frame)
    out = frame.copy()
    out["protocol"] = protocol
    if test_patients:
        held = held_out_groups(frame, groups, test_patients)
        rest = ~groups.isin(held)
        labels = _patient_labels(frame[rest], groups[rest])
        where = _carve(labels, {"val": val}, np.random.default_rng(seed))
        out["split"] = groups.map(where).where(rest, "test")
    elif protocol == "patient":
        out["split"] = _patient_split(frame, groups, val, test, seed)
    elif protocol == "paper":
        log.warning(LEAK_NOTE)
        out["split"] = _paper_split(frame, val, test, seed)
    else:
        out = pd.concat([out, _kfold_split(frame, groups, val, folds, seed)], axis=1)
    return out


@dataclass
class AuditReport:
    """Patients and duplicate images found in more than one split of some split column, and
    what could not be checked."""

    leaking_patients: dict[str, list[str]]  # split column -> patient ids
    leaking_duplicates: dict[str, list[str]]  # split column -> sha256
    n_images: int
    n_patients: int
    columns: list[str]
    leaking_pixel_duplicates: dict[str, list[str]] = field(default_factory=dict)  # pixel hash
    ungrouped: int = 0  # images without a patient id: their leakage cannot be checked
    pixels_checked: bool = True  # False for manifests written before pixel hashes

    @property
    def clean(self) -> bool:
        """True when no patient and no duplicate image crosses splits."""
        return not any(self.leaking_patients.values()) and not any(
            self.leaking_duplicates.values()
        ) and not any(self.leaking_pixel_duplicates.values())


def split_columns(frame: pd.DataFrame) -> list[str]:
    """The columns holding train/val/test assignments (``split`` and per-fold ones)."""
    cols = sorted(c for c in frame.columns if c.startswith("split_fold"))
    return cols or (["split"] if "split" in frame.columns else [])


def ungrouped_rows(frame: pd.DataFrame) -> pd.Series:
    """Rows without a patient id (their own group). Manifests older than the
    ``group_source`` column: rows whose patient id is their own file path (that is what a scan
    without a key wrote)."""
    if "group_source" in frame.columns:
        return frame["group_source"].astype(str) == "none"
    stems = frame["path"].astype(str).str.rsplit(".", n=1).str[0]
    pats = frame["patient_id"].astype(str)
    return pd.Series([s.endswith(p) for s, p in zip(stems, pats, strict=True)], index=frame.index)


def audit(frame: pd.DataFrame) -> AuditReport:
    """Find patients and identical images (same bytes or same pixels) that sit in more than one
    split, and count the images whose leakage cannot be checked (no patient id)."""
    cols = split_columns(frame)
    if not cols:
        raise ValueError(f"no split column; columns are {list(frame.columns)}")
    check_split_values(frame)
    found: dict[str, dict[str, list[str]]] = {"patient_id": {}, **{h: {} for h in HASHES}}
    for col in cols:
        for key, out in found.items():
            if key in frame.columns:
                part = frame[frame[key].astype(str) != ""]
                per = part.groupby(key)[col].nunique()
                out[col] = sorted(per[per > 1].index)
    pixels = "pixel_sha256" in frame.columns and bool((frame["pixel_sha256"] != "").all())
    return AuditReport(found["patient_id"], found["sha256"], len(frame),
                       frame["patient_id"].nunique(), cols, found["pixel_sha256"],
                       int(ungrouped_rows(frame).sum()), pixels)
