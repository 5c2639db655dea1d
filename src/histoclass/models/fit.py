"""Fitting what an ensemble learns, from members' outputs on the validation split only.

The caller passes validation rows only; test rows never reach these functions. Each fit keeps
part of the validation patients aside (:func:`inner_split`) to stop or select on, so nothing is
tuned on the rows it is scored on:

* ``weighted``: non-negative weights summing to 1 (a softmax over free parameters) minimising
  validation log-loss of the weighted mean, by Adam in float64. The log-loss of a mixture is
  convex in the weights and there are only M-1 free values, so it is fitted on all validation
  rows without early stopping.
* ``stack``: scikit-learn ``LogisticRegression``; the inverse regularisation ``C`` is picked by
  log-loss on the inner stopping patients, then refitted on all validation rows. Coefficients
  are stored as plain lists (no pickle).
* ``concat``: :func:`histoclass.models.concat.fit_head`, early-stopped on the stopping patients.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
STACK_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


def inner_split(groups: Sequence[str], targets: Sequence[int], frac: float = 0.3, seed: int = 0
                ) -> tuple[list[int], list[int], str]:
    """Split validation rows into fitting and stopping parts, patient-grouped and seeded.

    Patients are assigned class by class (a patient's class is its majority target). When the
    validation split has too few patients for both parts to see every class, it falls back to a
    stratified image-level split (and says so): the stopping signal is then optimistic, but test
    rows are still never used.

    Returns:
        ``(fit_rows, stop_rows, how)`` with ``how`` ``patient`` or ``image``.
    """
    groups, targets = np.asarray(groups, dtype=object), np.asarray(targets)
    rng = np.random.default_rng(seed)
    pats = sorted(set(groups))
    label = {p: np.bincount(targets[groups == p]).argmax() for p in pats}
    stop_pats: set[str] = set()
    for c in sorted(set(label.values())):
        members = [p for p in pats if label[p] == c]
        n = len(members)
        k = min(max(round(frac * n), 1 if n >= 2 else 0), n - 1)
        stop_pats.update(rng.permutation(members)[:k].tolist())
    stop = [i for i, g in enumerate(groups) if g in stop_pats]
    fit = [i for i, g in enumerate(groups) if g not in stop_pats]
    classes = set(targets.tolist())
    if set(targets[fit].tolist()) == classes and stop and len(set(targets[stop].tolist())) > 1:
        return fit, stop, "patient"
    log.warning("validation has too few patients (%d) for a patient-grouped inner split; "
                "using an image-level stratified one", len(pats))
    order = rng.permutation(len(targets))
    stop = []
    for c in sorted(classes):
        rows = [int(i) for i in order if targets[i] == c]
        stop += rows[:min(max(round(frac * len(rows)), 1), len(rows) - 1)]
    fit = sorted(set(range(len(targets))) - set(stop))
    return fit, sorted(stop), "image"


def fit_weights(members: torch.Tensor, targets: torch.Tensor, steps: int = 500,
                lr: float = 0.05) -> list[float]:
    """Weights (>= 0, sum 1) minimising the log-loss of the weighted mean of ``[M, N, C]``."""
    p = members.double()[:, torch.arange(members.shape[1]), targets]  # [M, N] true-class prob
    theta = torch.zeros(members.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        loss = -torch.log(theta.softmax(0) @ p + 1e-12).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = theta.detach().softmax(0)
    log.info("ensemble weights %s (validation log-loss %.4f)", w.tolist(), float(loss.detach()))
    return [float(v) for v in w]


def _log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_stack(x: np.ndarray, y: np.ndarray, fit: Sequence[int], stop: Sequence[int],
              num_classes: int, cs: Sequence[float] = STACK_CS) -> dict[str, Any]:
    """Logistic regression on stacking features; ``C`` chosen on ``stop`` rows, then refitted.

    Returns:
        ``coef`` (``[K, F]`` lists; ``K`` is 1 for two classes, as in scikit-learn),
        ``intercept``, ``C``, ``stop_loss``.
    """
    from sklearn.linear_model import LogisticRegression

    present = sorted(set(y.tolist()))
    if len(present) < 2:
        raise ValueError(f"stacking needs at least two classes in the validation split; it only "
                         f"has class index {present}")
    fit, stop = list(fit), list(stop)

    def model(c: float, rows: list[int]) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=2000).fit(x[rows], y[rows])

    scores = {}
    for c in cs:
        lr = model(c, fit)
        proba = np.zeros((len(stop), num_classes))
        proba[:, lr.classes_] = lr.predict_proba(x[stop])
        scores[c] = _log_loss(proba, y[stop])
    best = min(cs, key=lambda c: (scores[c], -c))
    lr = model(best, fit + stop)
    coef, intercept = lr.coef_, lr.intercept_
    if num_classes > 2 and len(lr.classes_) < num_classes:
        # Classes absent from validation get a logit that never wins.
        full_c, full_i = np.zeros((num_classes, x.shape[1])), np.full(num_classes, -30.0)
        full_c[lr.classes_], full_i[lr.classes_] = coef, intercept
        coef, intercept = full_c, full_i
    log.info("stacking: C=%s (stopping log-loss %.4f)", best, scores[best])
    return {"coef": coef.astype(float).tolist(), "intercept": intercept.astype(float).tolist(),
            "C": float(best), "stop_loss": scores[best]}
