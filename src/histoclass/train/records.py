"""What a run leaves besides its checkpoints: RNG state, ``config.yaml``, ``history.csv``,
``curves.png`` and the one-line epoch summary.

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


def plot_history(rows: list[dict[str, Any]], path: Path, select: str) -> None:
    """Learning curves: losses on the left, validation scores on the right."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (servers, workers)
    import matplotlib.pyplot as plt

    def column(key: str) -> list[float]:  # NaN draws an undefined value as a gap
        return [math.nan if r[key] is None else r[key] for r in rows]

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, column("train_loss"), label="train")
    a.plot(ep, column("val_loss"), label="validation")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a.legend()
    for key in ("train_accuracy", "val_accuracy", "val_balanced_accuracy", "val_auc"):
        b.plot(ep, column(key), label=key)
    b.set(xlabel="epoch", ylim=(0, 1.02), title=f"scores (selection: val {select})")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
