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
:mod:`histoclass.models.resolution`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoclass._version import __version__
from histoclass.data.transforms import Preprocess

FORMAT = "histoclass-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable histoclass checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        raise CheckpointError(f"{path}: not a readable {what} ({_load_reason(exc)})") from None


def _load_reason(exc: Exception) -> str:
    """The cause in torch's load error, without its advice to retry with weights_only=False
    (which would run arbitrary code from an untrusted file)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0]
        return ("not a PyTorch file, or one holding objects other than tensors and plain "
                f"types: {detail.strip()}")
    return text.splitlines()[0][:200] if text else type(exc).__name__


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
    """The architecture described by ``meta``, randomly initialised (no download)."""
    import timm

    return timm.create_model(meta["timm_name"], pretrained=False,
                             num_classes=meta["num_classes"], drop_rate=meta.get("drop_rate", 0))


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
    model = build_model(meta)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {meta['timm_name']} ({exc})") from None
    return model.to(device).eval(), meta


def preprocess_of(meta: dict[str, Any]) -> Preprocess:
    """The preprocessing stored in a checkpoint's metadata."""
    return Preprocess.from_dict(meta["preprocess"])


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
