"""What ``histoclass run`` and ``histoclass demo`` check before any work.

* The whole config, against a small typed schema (:func:`validate_run`): every block, every
  member's training settings (their choices and bounds as ``histoclass train`` checks them),
  every ensemble spec, the ``predict`` and ``evaluate`` blocks. A typo in a nested block or a
  wrong type is one line naming the key, the block and the valid keys, before scanning and
  splitting run, not a traceback an hour later. The schema is the dataclasses and signatures
  the settings are passed to (:class:`~histoclass.train.TrainConfig`, ``fit_ensemble``,
  ``predict_paths``, ``evaluate_files``), so it cannot drift from them.
* The run folder (:func:`check_run_folder`): a folder holding a run made with other settings
  is not resumed (its members would be reused under the new settings); ``--force`` removes
  that run's outputs and starts afresh.
"""

from __future__ import annotations

import logging
import shutil
import typing
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SPLIT_SCHEMA = {"protocol": str, "seed": int, "val": float, "test": float, "folds": int,
                "magnification": str | list[str] | None, "groups": str | None,
                "classes": list[str] | None, "test_patients": list[str] | None}
# The top-level blocks and their types (RunConfig's fields).
TOP_SCHEMA = {"data": str, "out": str, "name": str, "task": str, "split": dict, "members": list,
              "train": dict, "weights": dict[str, str], "ensembles": list[dict],
              "predict": dict, "evaluate": dict}
# What a run writes into its folder: --force removes exactly these (and fold<k>/), nothing else.
OUTPUTS = ("manifest.csv", "manifest.skipped.csv", "members", "ensembles", "preds", "eval",
           "summary.csv", "summary.md", "config.yaml")


def kwargs_of(fn: Any, *exclude: str) -> dict[str, Any]:
    """A function's arguments and their types: the schema of a config block passed to it."""
    return {k: v for k, v in typing.get_type_hints(fn).items()
            if k not in exclude and k != "return"}


def validate_run(cfg: Any, specs: list[tuple[str, dict[str, Any]]]) -> None:
    """Check a :class:`~histoclass.pipeline.RunConfig` whose members resolve to ``specs``
    (``(name, training settings)``).

    Raises:
        ValueError: Naming the block, the key and the valid keys or values.
    """
    from histoclass.data.splits import PROTOCOLS
    from histoclass.evaluate import evaluate_files
    from histoclass.models.voting import METHODS
    from histoclass.predict import predict_paths
    from histoclass.train import TrainConfig, fit_ensemble
    from histoclass.train.config import CHOICES, check_block, train_schema

    check_block(dict(cfg.__dict__), TOP_SCHEMA, "config")
    if cfg.task not in CHOICES["task"]:
        raise ValueError(f"config: task {cfg.task!r}; choose one of {', '.join(CHOICES['task'])}")
    check_block(cfg.split, SPLIT_SCHEMA, "split")
    if cfg.split.get("protocol", "patient") not in PROTOCOLS:
        raise ValueError(f"split: protocol {cfg.split['protocol']!r}; choose one of "
                         f"{', '.join(PROTOCOLS)}")
    schema = train_schema()
    check_block(cfg.train, schema, "train")
    for i, item in enumerate(cfg.members):
        if not isinstance(item, str | dict) or (isinstance(item, dict) and "name" not in item):
            raise ValueError(f"members[{i}]: {item!r}; a member is a model name or a mapping "
                             "{name, model, ...training settings}")
        if isinstance(item, dict):
            check_block(item, {"name": str, "model": str, **schema}, f"members[{i}]")
    for name, settings in specs:
        try:
            TrainConfig(manifest="", out="", task=cfg.task, **settings).check()
        except ValueError as exc:
            raise ValueError(f"member {name}: {exc}") from None
    ens = {"name": str, "method": str, "members": str | list[str] | None,
           **kwargs_of(fit_ensemble, "members", "method", "manifest", "fold")}
    for i, spec in enumerate(cfg.ensembles):
        check_block(spec, ens, f"ensembles[{i}]")
        if spec.get("method") not in METHODS or "name" not in spec:
            raise ValueError(f"ensembles[{i}]: needs a name and a method, one of "
                             f"{', '.join(METHODS)}; got {spec!r}")
    check_block(cfg.predict, kwargs_of(predict_paths, "clf", "paths", "info", "runner"), "predict")
    check_block(cfg.evaluate, kwargs_of(evaluate_files, "paths"), "evaluate")


def check_run_folder(cfg: Any, force: bool = False) -> None:
    """Refuse to resume a run folder whose ``config.yaml`` holds other settings (listing
    them), unless ``force``, which removes that run's outputs (:data:`OUTPUTS`) first.

    Raises:
        ValueError: The settings differ and ``force`` is not given.
    """
    out = Path(cfg.out)
    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    now = yaml.safe_load(yaml.safe_dump(dict(cfg.__dict__), sort_keys=False))
    changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if k != "out" and saved.get(k) != now.get(k)]  # the folder itself may move
    if not changed:
        return
    if not force:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(changed)}); "
                         "resuming would mix the two: choose another --out, or pass --force to "
                         "start afresh (removes that run's outputs)")
    log.warning("--force: removing the earlier run's outputs in %s (%s)", out, "; ".join(changed))
    for name in [*OUTPUTS, *(p.name for p in out.glob("fold[0-9]*") if p.is_dir())]:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
