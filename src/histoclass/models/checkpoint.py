"""Self-describing checkpoints: weights plus everything needed to use them, in plain types.

A checkpoint is a dict ``{"state_dict": ..., "meta": ...}`` saved with ``torch.save`` and read
with ``torch.load(weights_only=True)``, so it can never run code on load. ``meta`` holds only
str/int/float/bool/None/list/dict values:

``format`` (``histoclass-checkpoint``), ``version`` (1), ``kind`` (``member``), ``arch`` (the
name given, e.g. ``v2-b0``), ``timm_name``, ``num_classes``, ``classes``, ``task``
(``binary``/``subtype``), ``drop_rate``, ``preprocess`` (see
:class:`histoclass.data.transforms.Preprocess`), ``stain`` (fitted normaliser or ``None``),
``config`` (training settings), ``history`` (per-epoch rows), ``metrics`` (best validation
metrics), ``histoclass_version``; optionally ``train_mpp`` (microns per pixel of the training
images, ``None``: unknown) and ``train_field`` (``[w, h]`` pixels one input covers; see
:mod:`histoclass.models.resolution`) and ``model_args`` (extra timm constructor arguments,
plain-typed; class names resolved by
:func:`histoclass.models.model_args.resolve_model_args`) and ``input`` (``{"mode": "resize" |
"tiles", "size", "stride", "edge"}``, :class:`histoclass.data.field_tiles.InputMode`; absent:
``resize``, the study's squash).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoclass._version import __version__
from histoclass.data.field_tiles import InputMode
from histoclass.data.files import atomic_write
from histoclass.data.transforms import Preprocess
from histoclass.models.model_args import resolve_model_args

FORMAT = "histoclass-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable histoclass checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file and rename (:func:`histoclass.data.files.atomic_write`),
    so a crash never leaves half a file and a write failure is one ``OSError`` naming ``path``."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def member_meta(
    arch: str,
    timm_name: str,
    classes: list[str] | tuple[str, ...],
    preprocess: Preprocess,
    *,
    task: str = "binary",
    drop_rate: float = 0.3,
    **extra: Any,
) -> dict[str, Any]:
    """The required metadata of a member checkpoint; ``extra`` adds config, history, metrics."""
    return {
        "arch": arch, "timm_name": timm_name, "num_classes": len(classes),
        "classes": list(classes), "task": task, "drop_rate": float(drop_rate),
        "preprocess": preprocess.to_dict(), "stain": None, "config": {}, "history": [],
        "metrics": {}, **extra,
    }


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write weights (contiguous CPU tensors) and metadata atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    full = {"format": FORMAT, "version": VERSION, "kind": "member", **meta}
    full.setdefault("histoclass_version", __version__)
    return atomic_save({"state_dict": state, "meta": full}, path)


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` of ``path``; errors call the file a ``what``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise CheckpointError(f"{path}: not a readable {what} ({load_reason(exc)})") from None


# Sentences of torch's error that advise loading anyway (weights_only=False, allow-listing
# globals): advice that would run code from an untrusted file, which histoclass never passes on.
_ADVICE = ("weights_only", "safe_globals", "trust", "file an issue", "documentation",
           "weights only load failed")


def load_reason(exc: BaseException) -> str:
    """Why ``torch.load`` (or any model-file reader) refused a file, in one line: the cause
    (e.g. ``unsupported GLOBAL posix.system``) kept whole, torch's advice dropped. Every loader
    (members, ensembles, ``--weights``, stain targets, ONNX metadata) words errors with it."""
    text = str(exc).strip()
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        text = text.replace("WeightsUnpickler error:", "\n")
        parts = (p.strip() for p in re.split(r"(?<=[.!?:])\s+|\n+", text))
        cause = " ".join(p for p in parts if p and not any(a in p.lower() for a in _ADVICE))
        return ("not a PyTorch file, or one holding objects other than tensors and plain "
                f"types: {cause or 'unsupported content'}")
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_finite(tensors: dict[str, Any], path: str | Path, what: str = "weights") -> None:
    """Raise :class:`CheckpointError` naming the file when a float tensor holds NaN or inf: such
    a network outputs NaN, which must never become a class."""
    bad = [k for k, v in tensors.items() if isinstance(v, torch.Tensor)
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: {what} contain NaN or infinite values ({len(bad)} "
                              f"tensor(s), e.g. {bad[0]}): a diverged or corrupted file; "
                              "retrain or use another checkpoint")


def check_ensemble_numbers(obj: dict[str, Any], path: str | Path) -> None:
    """:func:`check_finite` for what an ensemble file learned: weights, stacking
    coefficients, the concatenation head."""
    numbers = {"weights": obj.get("weights") or [], **(obj.get("stack") or {})}
    try:
        check_finite({k: torch.as_tensor(v, dtype=torch.float64) for k, v in numbers.items()},
                     path, "ensemble parameters")
    except (TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed ensemble weights or stack ({exc})") from None
    if isinstance(obj.get("head"), dict):
        check_finite(obj["head"], path, "concat head weights")


def ensemble_calibration(obj: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The ``temperature``, ``calibration`` and ``refer_risk`` keywords of an ensemble file or
    published ``histoclass.json`` (version 1: ``T = 1``, no rule), checked: a temperature that
    is not a finite number > 0, or a threshold outside [0, 1], is an error naming the file."""
    t, rule = obj.get("temperature", 1.0), obj.get("refer_risk")
    if t is None:
        t = 1.0
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf"):
        raise CheckpointError(f"{path}: ensemble temperature {t!r} must be a finite number > 0")
    threshold = rule.get("threshold") if isinstance(rule, dict) else None
    if not (rule is None or isinstance(rule, dict)) or (threshold is not None and not (
            isinstance(threshold, int | float) and 0 <= threshold <= 1)):
        raise CheckpointError(f"{path}: ensemble refer_risk {rule!r} needs a threshold in "
                              "[0, 1] or null")
    calibration = obj.get("calibration")
    return {"temperature": float(t), "refer_risk": rule,
            "calibration": calibration if isinstance(calibration, dict) else None}


def member_file(path: Path, entry: dict[str, Any]) -> Path:
    """The member file an ensemble file's ``entry`` names (beside the ensemble, else its
    absolute path), checked against its recorded sha256."""
    for cand in (path.parent / entry["path"], Path(entry["abs_path"])):
        if cand.is_file():
            if file_sha256(cand) != entry["sha256"]:
                raise CheckpointError(
                    f"{path}: member {entry['name']} file {cand} has changed since the ensemble "
                    "was built (sha256 differs); rebuild the ensemble with histoclass ensemble"
                )
            return cand
    raise CheckpointError(f"{path}: member {entry['name']} file {entry['path']} is missing "
                          f"(looked in {path.parent} and {entry['abs_path']})")


def check_meta(meta: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the file and the key when a member's metadata is
    missing, of the wrong type or out of bounds (hand-made or damaged files)."""
    import timm

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: checkpoint metadata {key} {why}")

    for key in ("timm_name", "num_classes", "classes", "preprocess"):
        if key not in meta:
            raise bad(key, "is missing")
    name, n, classes = meta["timm_name"], meta["num_classes"], meta["classes"]
    if not isinstance(name, str) or not (timm.is_model(name) or ":" in name):
        raise bad("timm_name", f"{name!r} is not a timm model name")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
        raise bad("num_classes", f"{n!r} must be an integer in [1, 100000]")
    if (not isinstance(classes, list) or len(classes) != n or len(set(map(str, classes))) != n
            or not all(isinstance(c, str) and c for c in classes)):
        raise bad("classes", f"{classes!r} must be {n} distinct non-empty names")
    drop = meta.get("drop_rate", 0.0)
    if not isinstance(drop, int | float) or not 0 <= drop < 1:
        raise bad("drop_rate", f"{drop!r} must be a number in [0, 1)")
    try:
        pre = Preprocess.from_dict(meta["preprocess"])
        mode = InputMode.from_dict(meta.get("input"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: checkpoint metadata {exc}") from None
    if mode.tiles and tuple(pre.input_size) != (mode.size, mode.size):
        raise bad("input", f"tile size {mode.size} differs from the input size "
                  f"{list(pre.input_size)}")


def check_checkpoint(obj: Any, path: str | Path) -> dict[str, Any]:
    """``obj`` (a loaded ``path``) if it is a histoclass checkpoint this version understands."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a histoclass checkpoint (no '{FORMAT}' metadata)")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta['version']} is newer than this "
            f"histoclass understands ({VERSION}); upgrade histoclass"
        )
    return obj


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) and check its format."""
    return check_checkpoint(load_file(path), path)


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The architecture described by ``meta`` (with its stored ``model_args``), randomly
    initialised (no download)."""
    import timm

    return timm.create_model(meta["timm_name"], pretrained=False,
                             num_classes=meta["num_classes"], drop_rate=meta.get("drop_rate", 0),
                             **resolve_model_args(meta.get("model_args") or {}))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a member checkpoint in eval mode, and return it with its metadata."""
    return model_from(read_checkpoint(path), path, device)


def model_from(obj: dict[str, Any], path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_checkpoint` for an already read and checked checkpoint ``obj`` of ``path``."""
    meta = obj["meta"]
    if meta.get("kind") != "member":
        raise CheckpointError(f"{path}: a {meta.get('kind')!r} file, not a member checkpoint")
    check_meta(meta, path)
    state = obj.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint has no state_dict of weights")
    check_finite(state, path)
    model = build_model(meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {meta['timm_name']} "
                              f"({str(exc).splitlines()[0][:300]})") from None
    return model.to(device).eval(), meta


def preprocess_of(meta: dict[str, Any]) -> Preprocess:
    """The preprocessing stored in a checkpoint's metadata.

    Raises:
        CheckpointError: It is missing or out of bounds.
    """
    try:
        return Preprocess.from_dict(meta.get("preprocess"))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint metadata: {exc}") from None


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (ensembles record their members' hashes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stain_of(meta: dict[str, Any], where: str | Path = "checkpoint") -> Any:
    """The fitted stain normaliser a checkpoint was trained with, or ``None``.

    Every consumer of checkpoints (predict, explain, export, serve) goes through this, so all
    apply exactly the normaliser training used.

    Raises:
        CheckpointError: The stored target is not one histoclass.stain can rebuild.
    """
    if not meta.get("stain"):
        return None
    from histoclass.stain import from_dict  # looked up at call time: numpy-only, light

    try:
        return from_dict(meta["stain"])
    except ValueError as exc:
        raise CheckpointError(f"{where}: stored stain target is unusable ({exc})") from None
