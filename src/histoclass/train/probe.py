"""The linear probe's mathematics (``histoclass train --head linear``; no data, no files).

A scikit-learn ``LogisticRegression`` (lbfgs, L2; multinomial for more than two classes, the
single logistic of scikit-learn's binary case for two) on *standardised* embeddings, for every
``C`` of a log grid (:data:`C_GRID`), and the fold of ``standardise -> logistic`` into timm's
classifier layer (:func:`fold_probe`). ``C`` is chosen either on the validation split
(:func:`fit_probe`, ``--probe-select val``) or by patient-disjoint inner cross-validation over
train + val (:func:`cv_probe`, ``--probe-select cv``).

``--probe-select cv`` is for validation splits too small to choose on. With a handful of
validation images (UCSB's 40 images in 3 folds leave 6, sometimes all of one class) the
validation score of every ``C`` is nearly the same number and the ``C`` it picks is noise: on
those folds ``--probe-select val`` chose ``C`` from 0.003 to 31.6. :func:`cv_probe` pools the
train and val rows and cuts inner folds that never split a patient (scikit-learn's
``StratifiedGroupKFold``, seeded, so a rerun cuts the same folds); each ``C`` is scored by the
run's ``--select`` on the pooled out-of-fold logits (ties as in :func:`fit_probe`), and the head
kept is refitted on all of train + val with that ``C``. The out-of-fold logits of that ``C`` are
held-out scores for every row, so the temperature and the referral threshold are fitted on them
(optimistic only by the choice of ``C``, as on val), and they are the member's stored
validation metrics. The val rows are training rows of such a member (``meta["linear"]
["trained_on"]``), so an ensemble's validation outputs of it are in-sample.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from histoclass.train.epoch import better, metrics

log = logging.getLogger(__name__)
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))  # 1e-4 .. 1e2, half a decade apart
MAX_ITER = 2000

ABSENT_LOGIT = -30.0  # classes without train images: softmax weight ~1e-13 of a present class


def probe_logits(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Logits of a fitted logistic regression, shaped as the folded classifier gives them:
    ``[N, K]``, and for a binary model (one row) ``[-z/2, +z/2]``, whose softmax is
    ``sigmoid(z)``."""
    z = x @ np.asarray(coef, np.float64).T + np.asarray(intercept, np.float64)
    return np.concatenate([-z / 2, z / 2], axis=1) if z.shape[1] == 1 else z


def expand_probe(coef: np.ndarray, intercept: np.ndarray, present: list[int], k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A probe fitted on the ``present`` classes only, as ``k`` output rows: the present ones
    in their places (a binary probe as ``[-w/2, +w/2]``), the others weight 0 and bias
    :data:`ABSENT_LOGIT`. All classes present: ``coef``/``intercept`` unchanged."""
    coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
    if len(present) == k:
        return coef, intercept
    if coef.shape[0] == 1:
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate(
            [-intercept / 2, intercept / 2])
    full_coef = np.zeros((k, coef.shape[1]))
    full_bias = np.full(k, ABSENT_LOGIT)
    full_coef[present], full_bias[present] = coef, intercept
    return full_coef, full_bias


def fold_probe(classifier: nn.Module, coef: np.ndarray, intercept: np.ndarray,
               mean: np.ndarray, scale: np.ndarray) -> None:
    """Write ``standardise -> logistic regression`` into ``classifier`` (an ``nn.Linear``).

    Raises:
        ValueError: ``classifier`` is not a linear layer with a bias of the right shape.
    """
    coef = np.asarray(coef, np.float64) / np.asarray(scale, np.float64)
    bias = np.asarray(intercept, np.float64) - coef @ np.asarray(mean, np.float64)
    if coef.shape[0] == 1:  # binary: softmax([-z/2, z/2]) = sigmoid(z)
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    if (not isinstance(classifier, nn.Linear) or classifier.bias is None
            or tuple(classifier.weight.shape) != coef.shape):
        raise ValueError(f"cannot fold a {coef.shape[0]}x{coef.shape[1]} linear probe into "
                         f"{type(classifier).__name__} {getattr(classifier, 'weight', None)!r}"
                         " (need nn.Linear with a bias, same shape)")
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(coef))
        classifier.bias.copy_(torch.from_numpy(bias))


def standard_scaler(x: np.ndarray):
    """scikit-learn's ``StandardScaler`` fitted on ``x``."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(x)


def fit_logreg(x: np.ndarray, y: np.ndarray, c: float, balanced: bool, scaler=None):
    """``(LogisticRegression, StandardScaler)`` fitted on standardised ``x`` (the scaler is
    fitted on ``x`` unless given): lbfgs, L2, ``C = c``, :data:`MAX_ITER` iterations."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    scaler = scaler if scaler is not None else standard_scaler(x)
    with warnings.catch_warnings():  # convergence is checked and reported for the C kept
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER,
                                class_weight="balanced" if balanced else None)
        lr.fit(scaler.transform(x), y)
    return lr, scaler


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              *, select: str = "balanced_accuracy", balanced: bool = False,
              grid: tuple[float, ...] = C_GRID) -> dict[str, Any]:
    """Standardise, fit a logistic regression per ``C`` on train, choose ``C`` on validation.

    Returns:
        ``coef`` (``[K, D]``, ``K`` = 1 for two classes), ``intercept``, ``mean``, ``scale``
        (the train standardisation), ``C``, ``scores`` (validation metrics per ``C``),
        ``converged`` (lbfgs stopped before ``MAX_ITER`` at the chosen ``C``).
    """
    scaler = standard_scaler(x_train)
    xv = scaler.transform(x_val)
    yv = torch.as_tensor(y_val)
    fits, scores, best = {}, [], None
    for c in grid:
        lr, _ = fit_logreg(x_train, y_train, c, balanced, scaler)
        val = metrics(torch.from_numpy(probe_logits(lr.coef_, lr.intercept_, xv)), yv)
        scores.append({"C": c, **val})
        fits[c] = lr
        if best is None or better(val, best[1], select):  # strict: ties keep the smaller C
            best = (c, val)
    c = best[0]
    lr = fits[c]
    return {"coef": lr.coef_, "intercept": lr.intercept_, "mean": scaler.mean_,
            "scale": scaler.scale_, "C": c, "scores": scores,
            "converged": bool(np.max(lr.n_iter_) < MAX_ITER)}



INNER_FOLDS = 3


def inner_folds(y: np.ndarray, groups: np.ndarray, seed: int = 0
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-disjoint, class-stratified inner folds of the pooled rows.

    A class may be missing from a fold's training part (all its patients held out): that
    fold's probe gives it :data:`ABSENT_LOGIT`, so the out-of-fold
    score counts those images as errors rather than hiding them.

    Raises:
        ValueError: Fewer than two patients.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    patients = len(set(groups.tolist()))
    if patients < 2:
        raise ValueError(f"--probe-select cv: train + val hold {patients} patient(s); patient-"
                         "disjoint inner folds need at least 2 (use --probe-select val)")
    n = min(INNER_FOLDS, patients)
    with np.errstate(all="ignore"):
        folds = list(StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
                     .split(np.zeros(len(y)), y, groups))
    return folds


def _logits(lr, xs: np.ndarray, present: np.ndarray, k: int) -> np.ndarray:
    """``[N, k]`` logits of a probe fitted on the ``present`` classes only (absent ones get
    :data:`ABSENT_LOGIT`)."""
    coef, bias = expand_probe(lr.coef_, lr.intercept_, present.tolist(), k)
    return probe_logits(coef, bias, xs)


def cv_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, select: str,
             balanced: bool, grid: tuple[float, ...], seed: int = 0) -> dict[str, Any]:
    """Choose ``C`` by inner CV on the pooled rows, refit on all of them.

    Args:
        x: ``[N, D]`` embeddings of train + val.
        y: ``N`` class indices ``0..K-1`` (all ``K`` present).
        groups: ``N`` patient ids.
        select: The run's ``--select`` score.
        balanced: ``class_weight="balanced"``.
        grid: The ``C`` values tried.
        seed: Seeds the inner folds.

    Returns:
        What :func:`fit_probe` returns, plus ``oof`` (``[N, K]``
        out-of-fold logits at the chosen ``C``) and ``inner`` (how the folds were cut).
    """
    k = int(y.max()) + 1
    folds = inner_folds(y, groups, seed)
    yt = torch.as_tensor(y)
    scores, best = [], None
    for c in grid:
        oof = np.zeros((len(y), k))
        for tr, te in folds:
            seen = np.unique(y[tr])
            if len(seen) < 2:  # one class to learn: it is the only answer
                oof[te] = ABSENT_LOGIT
                oof[te, seen[0]] = 0.0
                continue
            lr, scaler = fit_logreg(x[tr], y[tr], c, balanced)
            oof[te] = _logits(lr, scaler.transform(x[te]), seen, k)
        val = metrics(torch.from_numpy(oof), yt)
        scores.append({"C": c, **val})
        if best is None or better(val, best[1], select):
            best = (c, val, oof)
    c, _, oof = best
    lr, scaler = fit_logreg(x, y, c, balanced)
    inner = {"method": "StratifiedGroupKFold (patient-disjoint), shuffled", "seed": seed,
             "folds": len(folds), "patients": len(set(groups.tolist())), "images": len(y),
             "held_out_patients": [len(set(groups[te].tolist())) for _, te in folds]}
    log.info("linear probe: C=%g chosen by %d-fold patient-disjoint inner CV over train + val "
             "(%d images, %d patients); refitted on all of them", c, len(folds), len(y),
             inner["patients"])
    return {"coef": lr.coef_, "intercept": lr.intercept_, "mean": scaler.mean_,
            "scale": scaler.scale_, "C": c, "scores": scores, "oof": oof, "inner": inner,
            "converged": bool(np.max(lr.n_iter_) < lr.max_iter)}
