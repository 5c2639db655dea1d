"""Train several members in turn (``histoclass train-all``), skipping finished runs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from histoclass.train import distributed
from histoclass.train.config import TrainConfig
from histoclass.train.loop import train

log = logging.getLogger(__name__)


def finished(run: str | Path) -> bool:
    """True when ``run`` holds a completed run (``best.pt`` and the ``done`` marker)."""
    return (Path(run) / "best.pt").is_file() and (Path(run) / "done").is_file()


def train_all(base: TrainConfig, models: Sequence[str], weights_dir: str | Path | None = None
              ) -> dict[str, str]:
    """Train each member into ``<base.out>/<name>``, skipping finished runs, resuming others.

    The decoded-image cache is shared (its keys include the input size). A member that fails
    is reported and the others still run.

    Args:
        base: Settings for every member (``model``, ``out`` and ``resume`` are replaced).
        models: Member or timm names.
        weights_dir: Folder of local ImageNet weights named ``<name>.<ext>`` (offline runs).

    Returns:
        name -> ``trained``, ``skipped (finished)`` or ``failed: <reason>``.
    """
    root = Path(base.out)
    cache = str(root / "cache") if base.cache_dir == "" else base.cache_dir
    status: dict[str, str] = {}
    d = distributed.setup(base.device)
    try:
        for name in models:
            run = root / name
            if finished(run):
                status[name] = "skipped (finished)"
                log.info("%s: finished run in %s, skipped", name, run)
                continue
            try:
                weights = base.weights
                if weights_dir is not None:
                    found = sorted(Path(weights_dir).glob(f"{name}.*"))
                    if not found:
                        raise ValueError(f"no weights file {name}.* in {weights_dir}")
                    weights = str(found[0])
                cfg = replace(base, model=name, out=str(run), cache_dir=cache, weights=weights,
                              resume=(run / "last.pt").is_file())
                train(cfg)
                status[name] = "trained"
            except (ValueError, FileNotFoundError, RuntimeError) as exc:
                log.error("%s failed: %s", name, exc)
                status[name] = f"failed: {exc}"
    finally:
        distributed.cleanup(d)
    return status
