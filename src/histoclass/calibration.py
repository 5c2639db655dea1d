"""Calibrated probabilities and a referral threshold with a stated error rate (no torch).

* :func:`fit_temperature` — the one scalar ``T > 0`` that minimises the negative log-likelihood
  of ``softmax(logits / T)`` on held-out (validation) logits (Guo et al. 2017, "On Calibration of
  Modern Neural Networks"). Fit on the validation split only, never on test.
* :func:`ece` / :func:`brier` — calibration of a probability matrix (ECE reuses
  :func:`histoclass.metrics.ece`, the one home of the binning rule).
* :func:`clopper_pearson_upper` — exact one-sided binomial upper bound (Clopper & Pearson 1934).
* :func:`risk_coverage` — the risk-coverage curve of a confidence and its area (AURC).
* :func:`choose_refer_threshold` — the lowest confidence threshold whose accepted validation
  images have an error rate bounded by ``alpha`` with probability ``1 - delta``, selected by
  fixed-sequence testing as in "Learn then Test" (Angelopoulos et al. 2021).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.stats import beta

from histoclass import metrics

log = logging.getLogger(__name__)

#: Search range of ``log T``: ``T`` in about ``[0.01, 100]``.
LOG_T_BOUNDS = (-4.6, 4.6)
#: Fewer validation images than this and the record carries a caution (a rule of thumb: with
#: 15 ECE bins, under about two images per bin the fit follows noise).
FEW = 30


def _probs_labels(probs: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(probs, float), np.asarray(labels, int)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be (n, K) with n = {len(y)} labels; got shape {p.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be in 0..{p.shape[1] - 1}; got {y.min()}..{y.max()}")
    return p, y


def nll(logits: np.ndarray, labels: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``."""
    z, y = _probs_labels(logits, labels)
    return float(-log_softmax(z / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)``.

    Bounded search over ``log T`` in :data:`LOG_T_BOUNDS` (so ``T`` stays positive).

    Args:
        logits: ``(n, K)`` validation logits.
        labels: ``n`` class indices.

    Raises:
        ValueError: no images, or shapes/labels that do not match.
    """
    z, y = _probs_labels(logits, labels)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on 0 images")
    res = minimize_scalar(lambda s: nll(z, y, float(np.exp(s))), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    log.info("temperature %.4f (NLL %.4f at T=1 -> %.4f)", t, nll(z, y), nll(z, y, t))
    return t


def ece(probs: np.ndarray, labels: Sequence[int], bins: int = metrics.ECE_BINS) -> float | None:
    """Expected calibration error of the top label of a ``(n, K)`` probability matrix
    (:func:`histoclass.metrics.ece`); ``None`` for no images."""
    p, y = _probs_labels(probs, labels)
    correct, confidence = metrics.top_label(y, p)
    return metrics.ece(correct, confidence, bins)


def brier(probs: np.ndarray, labels: Sequence[int]) -> float | None:
    """Multiclass Brier score: mean over images of ``sum_k (p_k - [y = k])^2``; ``None`` for no
    images."""
    p, y = _probs_labels(probs, labels)
    if len(y) == 0:
        log.warning("brier is undefined (no images); reporting null")
        return None
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """Exact one-sided ``1 - delta`` upper bound of a binomial rate after ``k`` events in ``n``
    trials (Clopper & Pearson 1934): ``Beta.ppf(1 - delta, k + 1, n - k)``, ``1.0`` when ``k = n``.

    Raises:
        ValueError: ``n < 1``, ``k`` outside ``0..n`` or ``delta`` outside ``(0, 1)``.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1; got k={k}, n={n}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    return 1.0 if k == n else float(beta.ppf(1 - delta, k + 1, n - k))


def choose_refer_threshold(confidence: Sequence[float], correct: Sequence[bool], alpha: float,
                           delta: float = 0.05) -> dict | None:
    """The lowest confidence threshold whose accepted images have error rate ``<= alpha``
    with probability ``>= 1 - delta``, or ``None`` when no threshold qualifies (then refuse:
    no error rate can be stated).

    Fixed-sequence ("Learn then Test", Angelopoulos et al. 2021) selection: candidate thresholds
    are the distinct validation confidences, scanned from the highest down; at each the
    Clopper-Pearson (1934) ``1 - delta`` upper bound of the error rate among validation images
    with ``confidence >= t`` is tested against ``alpha``, and the scan stops at the first
    failure. Thresholds accepting fewer images than the smallest count at which even zero errors
    could pass are not tested (they can never pass, and which they are depends only on the
    confidences, never on correctness, so the order is still fixed before the labels are
    looked at). Because the hypotheses are tested in a fixed order and the scan stops at the first
    non-rejection, the family-wise error is at most ``delta`` without a multiplicity correction.

    Args:
        confidence: Per validation image, the probability of its top label.
        correct: Per validation image, whether the top label is right.
        alpha: Target error rate among accepted (not referred) images, in ``(0, 1)``.
        delta: Allowed probability that the bound is wrong, in ``(0, 1)``.

    Returns:
        ``{"alpha", "delta", "threshold", "val_coverage", "val_n", "val_error", "upper"}``:
        refer when ``confidence < threshold``; coverage is the accepted share of validation
        images, ``val_error`` their observed error rate, ``upper`` its bound.

    Raises:
        ValueError: lengths differ, or ``alpha``/``delta`` outside ``(0, 1)``.
    """
    conf, right = np.asarray(confidence, float), np.asarray(correct, bool)
    if len(conf) != len(right):
        raise ValueError(f"{len(conf)} confidences but {len(right)} correctness flags")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], ~right[order]
    # smallest n at which even 0 errors pass: 1 - delta ** (1 / n) <= alpha
    n_min = int(np.ceil(np.log(delta) / np.log1p(-alpha)))
    best = None
    for t in np.unique(conf)[::-1]:
        n = int(np.searchsorted(-conf, -t, side="right"))  # images with confidence >= t
        if n < n_min:
            continue
        k = int(wrong[:n].sum())
        upper = clopper_pearson_upper(k, n, delta)
        if upper > alpha:
            break
        best = {"alpha": float(alpha), "delta": float(delta), "threshold": float(t),
                "val_coverage": n / len(conf), "val_n": len(conf), "val_error": k / n,
                "upper": upper}
    if best is None:
        log.warning("no confidence threshold bounds the error at %.3g (delta %.3g) on %d "
                    "validation images; no referral rule can be stated", alpha, delta, len(conf))
    return best


def risk_coverage(confidence: Sequence[float], correct: Sequence[bool]) -> dict | None:
    """The risk-coverage curve of "accept when ``confidence >= t``" over every distinct ``t``
    (from the most confident down), and the area under it (AURC; Geifman et al. 2019,
    "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers").

    Ties are accepted or referred together, so the curve does not depend on their order; AURC
    is the step integral ``sum_t risk(t) * (coverage(t) - coverage(t_prev))``, which equals the
    mean over ``k`` of the error among the ``k`` most confident images when no confidences tie.
    ``aurc_oracle`` is the AURC of a ranking that puts every error last (the floor).

    Returns:
        ``{"threshold", "coverage", "selective_error"}`` lists and ``aurc``, ``aurc_oracle``;
        ``None`` for no images.
    """
    conf, wrong = np.asarray(confidence, float), ~np.asarray(correct, bool)
    if len(conf) != len(wrong):
        raise ValueError(f"{len(conf)} confidences but {len(wrong)} correctness flags")
    if len(conf) == 0:
        return None
    order = np.argsort(-conf, kind="stable")
    conf, errors = conf[order], np.cumsum(wrong[order])
    last = np.r_[conf[1:] != conf[:-1], True]  # the last image of each run of equal confidence
    n = np.flatnonzero(last) + 1
    coverage, risk = n / len(conf), errors[last] / n
    k = np.arange(1, len(conf) + 1)
    oracle = np.clip(k - (len(conf) - errors[-1]), 0, None) / k
    return {"threshold": conf[last].tolist(), "coverage": coverage.tolist(),
            "selective_error": risk.tolist(),
            "aurc": float((risk * np.diff(np.r_[0.0, coverage])).sum()),
            "aurc_oracle": float(oracle.mean())}


def calibrate_logits(logits: np.ndarray, labels: Sequence[int], method: str = "temperature",
                     refer_risk: float | None = None, refer_delta: float = 0.1) -> dict:
    """The calibration record of a model from its validation logits: stored in its file.

    Args:
        logits: ``(n, K)`` validation logits.
        labels: ``n`` class indices.
        method: ``temperature`` (fit ``T``) or ``none`` (``T = 1``).
        refer_risk: Target error among accepted images (:func:`choose_refer_threshold` on the
            calibrated confidences); ``None`` for no referral rule.
        refer_delta: Allowed probability that the bound is wrong.

    Returns:
        ``{"temperature", "calibration", "refer_risk"}``: ``calibration`` holds NLL/ECE/Brier
        before and after and the image count (or a ``reason`` when ``T = 1`` was not fitted);
        ``refer_risk`` is ``None`` when not asked, else the rule, with ``threshold`` ``None``
        and a ``reason`` when no threshold attains it.
    """
    from scipy.special import softmax

    z, y = _probs_labels(logits, labels)
    if method not in ("temperature", "none"):
        raise ValueError(f"calibration {method!r}: choose one of temperature, none")
    t, reason = 1.0, None
    if len(y) == 0:
        reason = "no validation images"
        log.warning("calibration: no validation images; temperature stays 1")
    elif method == "none":
        reason = "calibration none"
    else:
        t = fit_temperature(z, y)
    record = {"images": len(y), "method": method}
    if not reason and len(y) < FEW:
        record["caution"] = (f"fitted on {len(y)} validation images (< {FEW}): its effect on "
                             "new images is uncertain; check ECE on test")
        log.warning("calibration: %s", record["caution"])
    if reason:
        record["reason"] = reason
    elif any(abs(nll(z, y, t) - nll(z, y, float(np.exp(b)))) <= 1e-9 + 1e-6 * nll(z, y, t)
             for b in LOG_T_BOUNDS):  # an edge is as good: the optimum is not inside
        # e.g. validation images all right with margin: NLL falls as T -> 0 without end
        record["note"] = (f"T {t:.4g} is at the edge of the search range "
                          f"[{np.exp(LOG_T_BOUNDS[0]):.3g}, {np.exp(LOG_T_BOUNDS[1]):.3g}]: "
                          "the optimum lies beyond it")
        log.warning("calibration on %d validation images: %s", len(y), record["note"])
    if len(y):
        before, after = softmax(z, axis=1), softmax(z / t, axis=1)
        record.update(nll_before=nll(z, y), nll_after=nll(z, y, t), ece_before=ece(before, y),
                      ece_after=ece(after, y), brier_before=brier(before, y),
                      brier_after=brier(after, y))
    rule = None
    if refer_risk is not None:
        rule = {"alpha": float(refer_risk), "delta": float(refer_delta), "threshold": None,
                "method": "Clopper-Pearson fixed-sequence (Learn then Test)", "images": len(y),
                "accepted": 0}
        found = None
        if len(y):
            p = softmax(z / t, axis=1)
            found = choose_refer_threshold(p.max(1), p.argmax(1) == y, refer_risk, refer_delta)
        if found is None:
            rule["reason"] = (f"no confidence threshold bounds the error at {refer_risk:g} "
                              f"(delta {refer_delta:g}) on {len(y)} validation images")
        else:
            rule.update(threshold=found["threshold"], upper=found["upper"],
                        val_error=found["val_error"], val_coverage=found["val_coverage"],
                        accepted=round(found["val_coverage"] * len(y)))
    return {"temperature": t, "calibration": record, "refer_risk": rule}


def uncalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The ``softmax(z)`` behind ``probs = softmax(z / T)``: ``p ** T`` renormalised (exact,
    since ``p_k`` is proportional to ``exp(z_k / T)``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.asarray(probs, float) ** temperature
        return raw / raw.sum(axis=1, keepdims=True)


def recovered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """:func:`uncalibrated` where it is exact; ``NaN`` rows where ``T < 1`` sharpened some
    probability to exactly 0 (it underflowed: the network's own value cannot be recovered)."""
    raw = uncalibrated(probs, temperature)
    if temperature < 1:
        lost = (np.asarray(probs) == 0).any(axis=1)
        if lost.any():
            log.warning("%d row(s): probabilities underflowed under T = %.3g; their raw.p_ "
                        "columns are left empty", int(lost.sum()), temperature)
        raw[lost] = np.nan
    return raw


def referral(confidence: Sequence[float], threshold: float | None,
             disagree: np.ndarray | None = None, error: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(refer 0/1, refer_reason)`` per image: low confidence (``confidence < threshold``),
    members that disagree and/or an ``error`` row (always referred, its reason is in the
    ``error`` column); the reason is empty for images that are not referred."""
    conf = np.asarray(confidence, float)
    low = conf < threshold if threshold is not None else np.zeros(len(conf), bool)
    dis = np.zeros(len(conf), bool) if disagree is None else np.asarray(disagree, bool)
    reasons = ["; ".join(([f"low confidence {c:.2f} < {threshold:.2f}"] if lo else [])
                         + (["members disagree"] if d else []))
               for c, lo, d in zip(conf, low, dis, strict=True)]
    err = np.zeros(len(conf), bool) if error is None else np.asarray(error, bool)
    return (low | dis | err).astype(int), np.array(reasons, dtype=object)
