"""The pieces of a report page: numbers, figures as embedded PNG ``<img>`` tags (matplotlib's
object API, no pyplot: no global backend state, renders with Agg), and HTML tables."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from matplotlib.figure import Figure


def fmt(value: float | None) -> str:
    """Three decimals, or ``n/a`` for an undefined metric."""
    return "n/a" if value is None else f"{value:.3f}"


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def confusion_figure(y: np.ndarray, pred: np.ndarray, classes: tuple[str, ...]) -> str:
    """Image-level confusion matrix (rows true, columns predicted) as an ``<img>`` tag."""
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    fig = Figure(figsize=(2 + 0.6 * k, 1.6 + 0.6 * k))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (images)")
    return png(fig)


def roc_figure(y: np.ndarray, p: np.ndarray, classes: tuple[str, ...],
               title: str = "ROC") -> str:
    """ROC curve (binary) or one-vs-rest curves per class present (subtype)."""
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    curves = [(1, p, "malignant")] if p.ndim == 1 else \
        [(c, p[:, c], classes[c]) for c in range(len(classes))]
    for c, score, name in curves:
        if 0 < (y == c).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == c, score)
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    if ax.lines[:-1]:
        ax.legend(fontsize=7, loc="lower right")
    return png(fig)


def reliability_figure(bins: dict, ece_value: float | None, title: str = "Reliability") -> str:
    """Reliability diagram over the top-label confidence from ``calibration.json``'s bins
    (``count``, ``accuracy``, ``confidence`` per bin: the bins ECE uses)."""
    n = np.asarray(bins["count"])
    acc, conf = (np.array([np.nan if v is None else v for v in bins[k]], float)
                 for k in ("accuracy", "confidence"))
    width = 1 / len(n)
    centers = (np.arange(len(n)) + 0.5) * width
    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    ax.bar(centers, np.nan_to_num(acc), width=width, edgecolor="black", label="accuracy")
    ax.plot(conf, conf, "o", color="orange", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-label confidence", ylabel="accuracy",
           title=f"{title} (ECE {fmt(ece_value)})")
    ax.legend(fontsize=7, loc="upper left")
    return png(fig)


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def risk_coverage_figure(curve: dict, chosen: tuple[float, float] | None) -> str:
    """Selective error against coverage (accept when the confidence is at least each
    threshold), AURC in the title, and the ``--refer-risk`` rule's point when there is one."""
    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    # risk(t_i) holds on (coverage_{i-1}, coverage_i]: the area under this step is the AURC
    ax.step([0.0, *curve["coverage"]], [curve["selective_error"][0], *curve["selective_error"]],
            where="pre", label="accept confidence >= t")
    if chosen is not None:
        ax.plot(*chosen, "o", color="red", ms=6,
                label=f"refer-risk rule ({chosen[0]:.2f}, {chosen[1]:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, max(0.05, 1.1 * max(curve["selective_error"]))),
           xlabel="coverage (share of images kept)", ylabel="error among kept images",
           title=f"Risk-coverage (AURC {fmt(curve['aurc'])})")
    ax.legend(fontsize=7, loc="upper left")
    return png(fig)

