"""What a published model says about itself: how it reads an image, under which split protocol
it was trained, and which numbers were measured on what.

Metadata keys are read where training wrote them and have documented defaults when absent
(older checkpoints): ``input_mode`` ``resize`` (the whole field squashed to the input size),
``temperature`` 1.0 (no calibration), ``refer`` ``None`` (no calibrated referral threshold;
only the disagreement threshold), ``train_mpp`` ``None`` (the training resolution is unknown).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from histoclass.data.manifest import leaks_patients, read_table
from histoclass.metrics import IMAGE_METRICS, PATIENT_METRICS
from histoclass.models.checkpoint import CheckpointError, file_sha256
from histoclass.models.ensemble import Ensemble
from histoclass.models.published import read_json

log = logging.getLogger(__name__)
DEFAULTS = {"input_mode": "resize", "temperature": 1.0, "refer": None, "train_mpp": None,
            "model_kwargs": None}
PATH_KEYS = ("manifest", "out", "weights", "stain_target", "cache_dir")


def portable(value: Any) -> Any:
    """``value`` with every absolute path reduced to its file name (a published folder must
    not carry the machine it was made on) and non-finite floats as ``None`` (JSON has no NaN;
    an undefined value is null)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def member_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's metadata as published: no training state (optimiser and RNG state stay
    in ``last.pt``), no absolute paths, and path settings reduced to their file names."""
    out = {k: v for k, v in meta.items() if k != "train_state"}
    config = dict(out.get("config") or {})
    for key in PATH_KEYS:
        if isinstance(config.get(key), str) and config[key]:
            config[key] = Path(config[key]).name
    out["config"] = config
    return portable(out)


def _value(meta: dict[str, Any], name: str) -> Any:
    """One member's ``name``; the input mode is ``meta["input"]["mode"]`` (``--input``)."""
    if name == "input_mode" and isinstance(meta.get("input"), dict):
        return meta["input"].get("mode", DEFAULTS[name])
    return meta.get(name, DEFAULTS[name])


def reading(ens: Ensemble) -> dict[str, Any]:
    """Input mode, temperature, referral thresholds, training resolution, constructor arguments
    and stain targets (one value, or one per member where they differ)."""
    metas = [m.meta for m in ens.members]

    def key(name: str) -> Any:
        values = [_value(m, name) for m in metas]
        return values[0] if all(v == values[0] for v in values) else \
            {m.name: v for m, v in zip(ens.members, values, strict=True)}

    stains = [m.get("stain") for m in metas]
    return {
        "input_mode": key("input_mode"),
        "temperature": ens.temperature,  # the one in the probabilities (members: their own)
        "refer": ens.confidence_threshold,
        "refer_threshold": float(ens.refer_threshold),
        "train_mpp": key("train_mpp"),
        "model_kwargs": key("model_kwargs"),
        "stain": stains[0] if all(s == stains[0] for s in stains) else
        {m.name: s for m, s in zip(ens.members, stains, strict=True)},
    }


def split_facts(ens: Ensemble, manifest: str | Path | None = None) -> dict[str, Any]:
    """Split protocol and manifest hash of the training manifest (``manifest``, else the one
    recorded in the checkpoints, when it is still there); ``None`` where unknown."""
    recorded = [m.meta.get("config", {}).get("manifest") for m in ens.members]
    recorded.append(ens.fit.get("manifest"))
    candidates = [manifest] if manifest else [r for r in recorded if r]
    out: dict[str, Any] = {"protocol": None, "manifest": None, "manifest_sha256": None,
                           "leaks_patients": None, "fold": None}
    folds = {m.meta.get("config", {}).get("fold") for m in ens.members}
    out["fold"] = folds.pop() if len(folds) == 1 else sorted(f for f in folds if f is not None)
    found = next((Path(c) for c in candidates if Path(c).is_file()), None)
    if found is None:
        if manifest:
            raise FileNotFoundError(f"manifest {manifest} does not exist")
        log.warning("training manifest %s not found: the split protocol is recorded as unknown "
                    "(give --manifest)", candidates[0] if candidates else "(none recorded)")
        return out
    frame = read_table(found, ("path",), "manifest", "manifest")
    protocols = sorted(set(frame["protocol"])) if "protocol" in frame.columns else []
    out.update(protocol=",".join(protocols) or None, manifest=found.name,
               manifest_sha256=file_sha256(found), leaks_patients=bool(leaks_patients(frame)))
    return out


def _level(values: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: values.get(k) for k in names if k in values}


def metrics_facts(ens: Ensemble, metrics: str | Path | None) -> dict[str, Any]:
    """The numbers the card reports: ``histoclass evaluate``'s ``metrics.json`` (with the
    ``evaluation.json`` beside it, when present), else the members' validation metrics stored in
    their checkpoints, labelled as such."""
    if metrics is None:
        return {"source": "validation", "split": "val",
                "note": "best-epoch validation metrics stored in the checkpoint: the split the "
                        "epoch was selected on, so optimistic; no confidence intervals, image "
                        "level only. Publish with --metrics for a test evaluation.",
                "members": {m.name: m.meta.get("metrics") or {} for m in ens.members}}
    path = Path(metrics)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist (give the metrics.json "
                                "that histoclass evaluate wrote)")
    values = read_json(path)
    if not any(k in values for k in (*IMAGE_METRICS, *PATIENT_METRICS)):
        raise CheckpointError(f"{path}: no metrics of histoclass evaluate in it (expected keys "
                              f"such as {', '.join(IMAGE_METRICS[:3])}, patient_accuracy)")
    run = read_json(path.parent / "evaluation.json") \
        if (path.parent / "evaluation.json").is_file() else {}
    classes = run.get("classes")
    if classes and list(classes) != list(ens.classes):
        raise ValueError(f"{path}: evaluated classes {classes} are not the model's {ens.classes}")
    return {
        "source": "histoclass evaluate", "file": path.name, "split": run.get("split", "test"),
        "images": run.get("images"), "patients": run.get("patients"),
        "bootstrap": run.get("bootstrap"), "threshold": run.get("threshold"),
        "folds": len(run["files"]) if len(run.get("files") or []) > 1 else None,
        "leaks_patients": run.get("leaks_patients"),
        "image": _level(values, IMAGE_METRICS), "patient": _level(values, PATIENT_METRICS),
        "ci95": values.get("ci95") or {}, "per_magnification": values.get("per_magnification"),
        # Why intervals or patient numbers are absent, in evaluate's own words.
        "ci_note": run.get("ci_note"), "patient_note": run.get("patient_note"),
    }
