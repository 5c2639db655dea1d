"""Predictions CSV -> metrics: image and patient level, per magnification, patient-bootstrap
95% intervals, k-fold mean and standard deviation, ensemble members, referral, calibration.

Reads only CSVs (no torch). ``metrics.json`` holds exactly the keys in
:data:`histoclass.metrics.METRICS` plus ``per_magnification`` and ``ci95``; everything else
(folds, members, referral, run details) goes to separate JSON files. Decisions are remade
from the probabilities (``p >= threshold``, or argmax); the CSV's ``pred`` column is not read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histoclass import evidence, selective
from histoclass.data.breakhis import LABELS, MAGNIFICATIONS, SUBTYPES
from histoclass.data.manifest import leaks_patients, read_table
from histoclass.metrics import (
    METRICS,
    binary_metrics,
    bootstrap_ci,
    multiclass_metrics,
    patient_accuracy,
    patient_recognition_rate,
    quiet,
)

log = logging.getLogger(__name__)

REQUIRED = ("path", "patient_id")
MEMBER = re.compile(r"^member\.(?P<name>.+)\.(?P<column>p_[^.]+)$")


@dataclass(frozen=True)
class Task:
    """What a predictions CSV predicts: ``binary`` (``p_malignant``) or ``subtype`` (``p_<c>``)."""

    kind: str
    classes: tuple[str, ...]
    prob_columns: tuple[str, ...]
    label_column: str


def detect_task(columns: Sequence[str], source: str = "predictions") -> Task:
    """Task, classes and probability columns from a predictions CSV's header.

    Any ``p_<class>`` column other than ``p_benign``/``p_malignant`` makes it the subtype task
    (true class in column ``subtype`` when present, else ``label``); otherwise ``p_malignant``
    makes it the binary task (``p_benign`` is then redundant and ignored).
    """
    probs = [c for c in columns if c.startswith("p_")]
    other = [c for c in probs if c not in ("p_benign", "p_malignant")]
    if other:
        names = [c[2:] for c in other]
        if set(names) <= set(SUBTYPES):
            names = [s for s in SUBTYPES if s in names]
        label = "subtype" if "subtype" in columns else "label"
        return Task("subtype", tuple(names), tuple(f"p_{n}" for n in names), label)
    if "p_malignant" in probs:
        return Task("binary", LABELS, ("p_malignant",), "label")
    raise ValueError(
        f"{source}: no probability columns; expected p_malignant (binary task) or one "
        f"p_<class> column per class (subtype task), found columns {list(columns)}"
    )


def read_predictions(path: str | Path, split: str = "test") -> tuple[pd.DataFrame, Task]:
    """Read one predictions CSV: the labelled rows of one split, probabilities as floats.

    Args:
        path: CSV written by ``histoclass predict``.
        split: Keep rows whose ``split`` is this (``all`` keeps every row; rows of a CSV with an
            empty or no ``split`` column are all kept).

    Returns:
        The rows (column ``y`` holds the true class index) and the task.
    """
    path = Path(path)
    frame = read_table(path, REQUIRED, "predictions file", "predictions CSV")
    task = detect_task(list(frame.columns), str(path))
    frame, errors = evidence.drop_errors(frame, str(path))  # NaN outputs: counted, not scored
    for col in ("magnification", "protocol", "split", task.label_column):
        if col not in frame.columns:
            frame[col] = ""
    if split != "all" and (frame["split"] != "").any():
        if not (frame["split"] == split).any():
            raise ValueError(f"{path}: no rows with split {split!r}; it has splits "
                             f"{sorted(set(frame['split']))} (or pass split 'all')")
        frame = frame[frame["split"] == split]
    truth = frame[task.label_column].str.strip().str.lower()
    if (truth == "").any():
        log.warning("%s: skipping %d row(s) with no %s", path, int((truth == "").sum()),
                    task.label_column)
    frame, truth = frame[truth != ""].reset_index(drop=True), truth[truth != ""]
    unknown = sorted(set(truth) - set(task.classes))
    if unknown:
        raise ValueError(f"{path}: unknown {task.label_column} value(s) {unknown}; "
                         f"valid: {', '.join(task.classes)}")
    frame["y"] = [task.classes.index(t) for t in truth]
    for col in [*task.prob_columns, *(c for c in frame.columns if MEMBER.match(c))]:
        frame[col] = evidence.probability_column(frame, col, str(path))
    frame["source"] = str(path)
    frame.attrs["errors"] = errors
    return frame, task


def probabilities(frame: pd.DataFrame, task: Task, prefix: str = "") -> np.ndarray:
    """P(malignant) per row (binary) or the ``(n, K)`` class probabilities (subtype)."""
    if task.kind == "binary":
        return frame[prefix + "p_malignant"].to_numpy(float)
    return frame[[prefix + c for c in task.prob_columns]].to_numpy(float)


def predicted(p: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted class index: ``p >= threshold`` (binary) or argmax (subtype)."""
    return (p >= threshold).astype(int) if p.ndim == 1 else p.argmax(axis=1)


def metric_set(frame: pd.DataFrame, task: Task, threshold: float = 0.5, prefix: str = "",
               context: str = "") -> dict[str, float | None]:
    """The 11 metrics of :data:`~histoclass.metrics.METRICS` for some rows (or one member)."""
    y, p = frame["y"].to_numpy(int), probabilities(frame, task, prefix)
    with quiet():  # one warning naming the subset, below, instead of one per metric
        out = binary_metrics(y, p, threshold) if task.kind == "binary" else \
            multiclass_metrics(y, p)
        known = evidence.patients_known(frame)  # no ids: no patient number, not one "patient"
        out["patient_recognition_rate"] = patient_recognition_rate(
            frame["patient_id"], predicted(p, threshold) == y) if known else None
        out["patient_accuracy"] = patient_accuracy(frame["patient_id"], y, p,
                                                   threshold) if known else None
    nulls = [k for k, v in out.items() if v is None]
    if nulls and context:
        log.warning("%s: undefined metric(s) reported as null: %s", context, ", ".join(nulls))
    return out


def magnifications(frame: pd.DataFrame) -> list[str]:
    """Magnifications present, in BreakHis order then any others; empty ones are left out."""
    present = set(frame["magnification"]) - {""}
    return [m for m in MAGNIFICATIONS if m in present] + sorted(present - set(MAGNIFICATIONS))


def evaluate_frame(frame: pd.DataFrame, task: Task, threshold: float = 0.5,
                   bootstrap: int = 1000, seed: int = 0, context: str = "all images") -> dict:
    """``metrics.json`` for one set of predictions: pooled, per magnification, and ``ci95``
    from a patient cluster bootstrap (``bootstrap=0`` gives null intervals)."""
    out: dict = metric_set(frame, task, threshold, context=context)
    out["per_magnification"] = {mag: metric_set(frame[frame["magnification"] == mag], task,
                                                threshold, context=f"{context}, {mag}")
                                for mag in magnifications(frame)}
    out["ci95"] = bootstrap_ci(lambda f: metric_set(f, task, threshold), frame, n=bootstrap,
                               seed=seed) if bootstrap else dict.fromkeys(METRICS)
    return out


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if v is not None]
    mean = float(np.mean(kept)) if kept else None
    return mean, float(np.std(kept, ddof=1)) if len(kept) > 1 else None


def summarize_folds(folds: list[dict], names: Sequence[str]) -> dict:
    """``folds.json``: each fold's metrics, and their mean and sample standard deviation
    (ddof=1) over the folds where a metric is defined."""
    summary: dict = {"folds": [{"fold": n, **{k: v for k, v in f.items() if k != "ci95"}}
                               for n, f in zip(names, folds, strict=True)]}
    summary["mean"], summary["std"] = {}, {}
    for key in METRICS:
        summary["mean"][key], summary["std"][key] = _mean_std([f[key] for f in folds])
    mags = {m: None for f in folds for m in f["per_magnification"]}
    summary["per_magnification_mean"] = {
        m: {k: _mean_std([f["per_magnification"].get(m, {}).get(k) for f in folds])[0]
            for k in METRICS} for m in mags
    }
    return summary


@dataclass
class Evaluation:
    """Everything ``evaluate`` found; ``frame`` pools the labelled rows of all folds."""

    metrics: dict
    frame: pd.DataFrame
    task: Task
    threshold: float
    folds: dict | None = None
    members: dict = field(default_factory=dict)
    referral: dict | None = None
    meta: dict = field(default_factory=dict)
    calibration: dict | None = None  # calibration.json (:func:`histoclass.selective.summary`)


def member_names(frame: pd.DataFrame) -> list[str]:
    """Ensemble member names from ``member.<name>.p_<class>`` columns, in column order."""
    return list(dict.fromkeys(m["name"] for c in frame.columns if (m := MEMBER.match(c))))


def referral(frame: pd.DataFrame, task: Task, threshold: float,
             refer_threshold: float | None) -> dict | None:
    """Images referred to a pathologist (``disagreement > refer_threshold``, else the ``refer``
    column) and the metrics on the images the ensemble keeps."""
    if refer_threshold is not None:
        if "disagreement" not in frame.columns:
            raise ValueError("refer threshold given but the predictions have no disagreement "
                             "column (only ensembles write one)")
        refer = pd.to_numeric(frame["disagreement"], errors="coerce").to_numpy(float) > \
            refer_threshold
    elif "refer" in frame.columns and (frame["refer"] != "").any():
        refer = frame["refer"].isin(["1", "1.0", "true", "True"]).to_numpy()
    else:
        return None
    return {"refer_threshold": refer_threshold, "images": len(frame),
            "referred": int(refer.sum()), "referral_rate": float(refer.mean()),
            "retained": metric_set(frame[~refer], task, threshold, context="retained images")}


def evaluate_files(paths: Sequence[str | Path], threshold: float = 0.5, bootstrap: int = 1000,
                   seed: int = 0, split: str = "test", fold_column: str | None = None,
                   refer_threshold: float | None = None,
                   groups: str | Path | None = None) -> Evaluation:
    """Evaluate one predictions CSV, or several (one per fold: mean and std over folds).

    Args:
        paths: Predictions CSVs; two or more are taken as the folds of a k-fold run.
        threshold: Decision threshold on P(malignant) (binary task).
        bootstrap: Patient bootstrap replicates for ``ci95`` (0: none).
        seed: Bootstrap seed.
        split: Rows to evaluate (``all`` for every row).
        fold_column: With one CSV, split it into folds by this column.
        refer_threshold: Disagreement above which an ensemble refers an image.
        groups: ``path,group`` CSV giving patient ids (see :func:`histoclass.evidence`).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    parts = [read_predictions(p, split) for p in paths]
    errors = sum(f.attrs.get("errors", 0) for f, _ in parts)
    if groups is not None:
        parts = [(evidence.attach_groups(f, groups), t) for f, t in parts]
    tasks = {task for _, task in parts}
    if len(tasks) > 1:
        found = [(str(p), t.kind, t.classes) for p, (_, t) in zip(paths, parts, strict=True)]
        raise ValueError(f"predictions files disagree on the task or classes: {found}")
    task = parts[0][1]
    frames, names = [f for f, _ in parts], [str(p) for p in paths]
    if fold_column is not None:
        if len(frames) != 1 or fold_column not in frames[0].columns:
            raise ValueError(f"fold column {fold_column!r} needs exactly one predictions file "
                             f"that has it; got {names}")
        by_fold = frames[0].groupby(fold_column, sort=True)
        names, frames = [f"{fold_column}={k}" for k, _ in by_fold], [g for _, g in by_fold]
    pooled = pd.concat(frames, ignore_index=True)
    if len(pooled) == 0:
        raise ValueError(f"no labelled predictions to evaluate in {names}")
    ci_note = evidence.ci_refusal(pooled) if bootstrap else "n/a: --bootstrap 0"
    metrics = evaluate_frame(pooled, task, threshold, 0 if ci_note else bootstrap, seed)
    folds = None
    if len(frames) > 1:
        per_fold = [evaluate_frame(f, task, threshold, 0, context=n)
                    for f, n in zip(frames, names, strict=True)]
        folds = summarize_folds(per_fold, names)
        # top level reports the fold mean; ci95 stays the bootstrap of the pooled out-of-fold rows
        metrics.update(folds["mean"])
        metrics["per_magnification"] = folds["per_magnification_mean"]
    known = evidence.patients_known(pooled)
    members = {n: metric_set(pooled, task, threshold, f"member.{n}.", f"member {n}")
               for n in member_names(pooled)}
    if members:  # the ensemble on the same pooled rows, for a like-for-like comparison
        members["ensemble"] = metric_set(pooled, task, threshold)
    meta = {"files": [str(p) for p in paths], "task": task.kind, "classes": list(task.classes),
            "threshold": threshold, "bootstrap": bootstrap, "seed": seed, "split": split,
            "images": len(pooled), "leaks_patients": bool(leaks_patients(pooled)),
            "patients": int(pooled["patient_id"].nunique()) if known else None,
            "patient_note": None if known else evidence.NO_PATIENTS, "ci_rule": evidence.CI_RULE,
            "ci_note": ci_note, "source": evidence.describe_source(pooled),
            "errors": errors, "groups": None if groups is None else str(groups)}
    return Evaluation(metrics, pooled, task, threshold, folds, members,
                      referral(pooled, task, threshold, refer_threshold), meta,
                      selective.summary(pooled, list(task.prob_columns), meta))


def write_json(obj: dict, path: Path) -> Path:
    """JSON with ``null`` for undefined values (NaN is refused: it is not JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    return path


def write_outputs(ev: Evaluation, out: str | Path) -> list[Path]:
    """Write ``<name>.json`` into ``out`` for each non-empty part (:mod:`histoclass.selective`)."""
    files = {"metrics": ev.metrics, "evaluation": ev.meta, "folds": ev.folds,
             "members": ev.members, "referral": ev.referral, "calibration": ev.calibration}
    return [write_json(obj, Path(out) / f"{name}.json") for name, obj in files.items() if obj]
