"""Classification metrics, patient-level aggregation and the patient cluster bootstrap.

Pure numpy/scikit-learn (no torch), so evaluation runs anywhere the predictions CSV is.

Conventions:
* Binary task: ``y_true`` is 1 for malignant (the positive class), ``p`` is P(malignant) and an
  image is called malignant when ``p >= threshold``.
* A metric whose denominator is zero (ROC-AUC with one class present, precision with no positive
  calls, ...) is *undefined*: it is returned as ``None`` with a logged warning, never 0 or NaN.
* ECE uses 15 equal-width bins over the top-label confidence, bins closed on the right
  ``(lo, hi]``. The binary task is scored as a 2-class problem: top label malignant when
  ``p >= 0.5`` and confidence ``max(p, 1 - p)``, whatever the decision threshold, because ECE
  judges the probabilities, not the operating point.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

log = logging.getLogger(__name__)

IMAGE_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1",
                 "roc_auc", "mcc", "ece")
PATIENT_METRICS = ("patient_recognition_rate", "patient_accuracy")
METRICS = IMAGE_METRICS + PATIENT_METRICS
ECE_BINS = 15


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence undefined-metric warnings (bootstrap replicates would repeat them 1000 times)."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _ratio(num: float, den: float, name: str, why: str) -> float | None:
    if den == 0:
        log.warning("%s is undefined (%s); reporting null", name, why)
        return None
    return float(num / den)


def mcc_from_confusion(cm: np.ndarray) -> float | None:
    """Matthews correlation (Gorodkin's K-class form; equals the binary MCC for 2x2)."""
    cm = np.asarray(cm, dtype=float)
    t, p, c, s = cm.sum(axis=1), cm.sum(axis=0), np.trace(cm), cm.sum()
    den = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return _ratio(c * s - t @ p, den, "mcc", "all true labels or all predictions are one class")


def auc(y_true: np.ndarray, score: np.ndarray, name: str = "roc_auc") -> float | None:
    """ROC-AUC (share of positive/negative pairs ranked right, ties count half)."""
    y_true = np.asarray(y_true).astype(bool)
    if y_true.all() or not y_true.any():
        log.warning("%s is undefined (only one class present); reporting null", name)
        return None
    return float(roc_auc_score(y_true, score))


def _bins(correct: np.ndarray, confidence: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width bin, closed on the right: image count, sum of correct, sum of confidence."""
    correct, confidence = np.asarray(correct, float), np.asarray(confidence, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    return (np.bincount(idx, minlength=n_bins), np.bincount(idx, correct, n_bins),
            np.bincount(idx, confidence, n_bins))


def top_label(y_true: Sequence[int], p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether the top label is right, and its probability, per image.

    ``p`` is P(malignant) (binary: top label malignant when ``p >= 0.5``, confidence
    ``max(p, 1 - p)``) or an ``(n, K)`` probability matrix (argmax, its probability).
    """
    y, p = np.asarray(y_true, int), np.asarray(p, float)
    if p.ndim == 1:
        top = (p >= 0.5).astype(int)
        return top == y, np.where(top == 1, p, 1 - p)
    top = p.argmax(axis=1)
    return top == y, p[np.arange(len(y)), top]


def reliability(correct: np.ndarray, confidence: np.ndarray,
                n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram data: per bin, image count, accuracy and mean confidence (NaN when
    the bin is empty)."""
    n, right, conf = _bins(correct, confidence, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n, right / n, conf / n


def ece(correct: np.ndarray, confidence: np.ndarray, n_bins: int = ECE_BINS) -> float | None:
    """Expected calibration error: sum over bins of ``n_b / N * |accuracy_b - confidence_b|``.

    Args:
        correct: 1 where the top label is right.
        confidence: Probability of the top label, in ``[0, 1]``.
        n_bins: Equal-width bins over ``[0, 1]``, closed on the right.
    """
    if len(correct) == 0:
        log.warning("ece is undefined (no images); reporting null")
        return None
    _, right, conf = _bins(correct, confidence, n_bins)
    # per bin |sum(correct) - sum(confidence)| = n_b * |accuracy_b - confidence_b|
    return float(np.abs(right - conf).sum() / len(correct))


def _check(y: np.ndarray, p: np.ndarray, k: int) -> None:
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    bad = sorted(set(np.unique(y).tolist()) - set(range(k)))
    if bad:
        raise ValueError(f"labels must be class indices 0..{k - 1} (binary: 1 = malignant), "
                         f"got {bad}")


def binary_metrics(y_true: Sequence[int], p_malignant: Sequence[float],
                   threshold: float = 0.5) -> dict[str, float | None]:
    """Image-level metrics of the binary task; malignant (1) is the positive class.

    Returns:
        ``accuracy, balanced_accuracy, precision, recall, specificity, f1, roc_auc, mcc, ece``.
    """
    y, p = np.asarray(y_true), np.asarray(p_malignant, float)
    _check(y, p, 2)
    y = y.astype(bool)
    pred = p >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    recall = _ratio(tp, tp + fn, "recall", "no malignant images")
    spec = _ratio(tn, tn + fp, "specificity", "no benign images")
    return {
        "accuracy": _ratio(tp + tn, len(y), "accuracy", "no images"),
        "balanced_accuracy": None if recall is None or spec is None else (recall + spec) / 2,
        "precision": _ratio(tp, tp + fp, "precision", "no image called malignant"),
        "recall": recall,
        "specificity": spec,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, "f1", "no malignant images or calls"),
        "roc_auc": auc(y, p),
        "mcc": mcc_from_confusion(np.array([[tn, fp], [fn, tp]])),
        "ece": ece(*top_label(y, p)),
    }


def _macro(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


def multiclass_metrics(y_true_idx: Sequence[int], probs: np.ndarray) -> dict[str, float | None]:
    """Image-level metrics of a K-class task (argmax decision), macro-averaged.

    Macro precision, recall, F1 and specificity average one-vs-rest scores over the classes
    present in ``y_true``; a present class that is never predicted has precision 0 (it earned
    none). ROC-AUC is the one-vs-rest macro average over those classes. Balanced accuracy equals
    macro recall.
    """
    y, probs = np.asarray(y_true_idx), np.asarray(probs, float)
    if probs.ndim != 2:
        raise ValueError(f"probs must be an (n, K) matrix, got shape {probs.shape}")
    k = probs.shape[1]
    _check(y, probs, k)
    y = y.astype(int)
    pred = probs.argmax(axis=1)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    present = [c for c in range(k) if cm[c].sum() > 0]
    prec, rec, f1, spec, aucs = [], [], [], [], []
    with quiet():  # per-class gaps are summarised by the macro value's own warning below
        for c in present:
            tp, fn, fp = cm[c, c], cm[c].sum() - cm[c, c], cm[:, c].sum() - cm[c, c]
            tn = len(y) - tp - fn - fp
            prec.append(tp / (tp + fp) if tp + fp else 0.0)
            rec.append(tp / (tp + fn))
            f1.append(2 * tp / (2 * tp + fp + fn))
            spec.append(_ratio(tn, tn + fp, "specificity", "one class present"))
            aucs.append(auc(y == c, probs[:, c]))
    if len(present) < 2:
        log.warning("specificity, roc_auc are undefined (only %d class present); reporting null",
                    len(present))
    return {
        "accuracy": _ratio(np.trace(cm), len(y), "accuracy", "no images"),
        "balanced_accuracy": _macro(rec),
        "precision": _macro(prec),
        "recall": _macro(rec),
        "specificity": _macro(spec),
        "f1": _macro(f1),
        "roc_auc": _macro(aucs),
        "mcc": mcc_from_confusion(cm),
        "ece": ece(*top_label(y, probs)),
    }


def _per_patient(patient_ids: Sequence) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(np.asarray(patient_ids, dtype=object))
    return codes, len(uniques)


def patient_recognition_rate(patient_ids: Sequence, correct: Sequence[bool]) -> float | None:
    """Spanhol et al.'s patient recognition rate: the mean over patients of the share of each
    patient's images classified correctly."""
    codes, n = _per_patient(patient_ids)
    if n == 0:
        log.warning("patient_recognition_rate is undefined (no patients); reporting null")
        return None
    right = np.bincount(codes, np.asarray(correct, float), n)
    return float(np.mean(right / np.bincount(codes, minlength=n)))


def patient_accuracy(patient_ids: Sequence, y_true: Sequence[int], p: np.ndarray,
                     threshold: float = 0.5) -> float | None:
    """Share of patients diagnosed right by one decision each, made from the mean probability.

    Args:
        patient_ids: Patient of each image.
        y_true: True class of each image (1 = malignant for the binary task, else class index).
            A patient whose images disagree is judged against their most common label.
        p: P(malignant) per image (binary), or an ``(n, K)`` probability matrix (argmax).
        threshold: Decision threshold on the mean P(malignant) (binary only).
    """
    codes, n = _per_patient(patient_ids)
    if n == 0:
        log.warning("patient_accuracy is undefined (no patients); reporting null")
        return None
    y, p = np.asarray(y_true, int), np.asarray(p, float)
    counts = np.bincount(codes, minlength=n)
    k = p.shape[1] if p.ndim == 2 else 2
    votes = np.zeros((n, k))
    np.add.at(votes, (codes, y), 1)
    truth = votes.argmax(axis=1)  # most common label; ties go to the lower class index
    if p.ndim == 1:
        decision = (np.bincount(codes, p, n) / counts >= threshold).astype(int)
    else:
        mean = np.stack([np.bincount(codes, p[:, c], n) for c in range(k)], axis=1)
        decision = mean.argmax(axis=1)
    return float(np.mean(decision == truth))


def bootstrap_ci(fn: Callable[[pd.DataFrame], dict[str, float | None]], frame: pd.DataFrame,
                 by: str = "patient_id", n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile confidence intervals from a cluster bootstrap over ``by`` (patients).

    Each replicate draws as many patients as there are, with replacement, and takes all their
    images; a patient drawn twice counts as two patients (``by`` is renumbered per draw), so
    patient-level metrics see the resampled patient count.

    Args:
        fn: Metrics of a frame, ``{name: value or None}``.
        frame: One row per image, with column ``by``.
        by: Cluster column.
        n: Replicates.
        seed: Same seed, same intervals.
        level: Coverage of the interval.

    Returns:
        ``{name: [lo, hi]}``; ``None`` where the metric was undefined in every replicate.
    """
    if n < 1:
        raise ValueError(f"bootstrap replicates must be >= 1, got {n}")
    codes, n_groups = _per_patient(frame[by])
    rows = [np.flatnonzero(codes == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    with quiet():
        for _ in range(n):
            picked = rng.integers(0, n_groups, n_groups)
            idx = np.concatenate([rows[g] for g in picked])
            sample = frame.iloc[idx].copy()
            sample[by] = np.repeat(np.arange(n_groups), [len(rows[g]) for g in picked])
            for name, value in fn(sample).items():
                draws.setdefault(name, [])
                if value is not None:
                    draws[name].append(value)
    alpha = (1 - level) / 2 * 100
    out: dict[str, list[float] | None] = {}
    for name, values in draws.items():
        if len(values) < n:
            log.info("%s undefined in %d of %d bootstrap replicates", name, n - len(values), n)
        lo_hi = np.percentile(values, [alpha, 100 - alpha]) if values else None
        out[name] = None if lo_hi is None else [float(lo_hi[0]), float(lo_hi[1])]
    return out
