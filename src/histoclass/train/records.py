"""What a run leaves besides its checkpoints: RNG state, ``config.yaml``, ``history.csv``,
``curves.png`` and the one-line epoch summary.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no
global figure registry and no display needed.

Undefined metrics (``None``) are an empty CSV cell, ``n/a`` in the summary and a gap in the plot.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors (loadable with ``weights_only=True``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_config(config: dict[str, Any], path: Path) -> None:
    """The resolved settings as YAML (``workers`` ``None`` shown as the number used)."""
    import os

    import yaml

    config = {**config}
    if config.get("workers") is None:
        config["workers"] = min(4, os.cpu_count() or 1)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    """One CSV row per epoch (``csv`` writes an undefined metric as an empty cell)."""
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def epoch_line(row: dict[str, Any], improved: bool) -> str:
    """The epoch's train/val scores on one line, `` *`` when it gave a new ``best.pt``."""
    return f"epoch {row['epoch']}: " + " ".join(
        f"{k}={'n/a' if v is None else format(v, '.4f')}"
        for k, v in row.items() if k.startswith(("train_", "val_"))) + (" *" if improved else "")


_TITLES = {"loss": "cross-entropy loss", "accuracy": "accuracy",
           "balanced_accuracy": "balanced accuracy", "auc": "ROC-AUC"}


def plot_history(rows: list[dict[str, Any]], path: Path, select: str,
                 best_epoch: int | None = None) -> Any:
    """Learning curves: one panel per metric, training and validation together (validation only
    where training has no such score), whole-number epoch ticks, the legend below the panels
    (never over a line) and ``best_epoch``, the epoch kept as ``best.pt``, marked on every panel.

    Returns:
        The ``matplotlib.figure.Figure``, already written to ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def column(key: str) -> list[float]:  # NaN draws an undefined value as a gap
        return [math.nan if r.get(key) is None else r[key] for r in rows]

    keys = list(rows[0])
    metrics = list(dict.fromkeys(k.split("_", 1)[1] for k in keys
                                 if k.startswith(("train_", "val_"))))
    metrics.sort(key=lambda m: m != "loss")  # loss first, scores in the order recorded
    ep = [r["epoch"] for r in rows]
    fig = Figure(figsize=(3.3 * len(metrics), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for split, colour, name in (("train", "C0", "training"), ("val", "C1", "validation")):
            if f"{split}_{metric}" in keys:
                ax.plot(ep, column(f"{split}_{metric}"), color=colour, marker="o", ms=3,
                        label=name)
        title = _TITLES.get(metric, metric.replace("_", " "))
        ax.set_title(title + (" (selects best.pt)" if metric == select else ""), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
        if metric != "loss":
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.35", ls="--", lw=1, label=f"best.pt: epoch "
                       f"{best_epoch} (best validation {_TITLES.get(select, select)})")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # one entry per line kind, whichever panel has it
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    fig.savefig(path, dpi=100)
    return fig
