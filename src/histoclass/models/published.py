"""The published model folder (``histoclass publish``): reading it back, checked, and the
``local-dir:``/``hf-hub:`` names that point at one.

A published member folder holds ``model.safetensors`` and ``config.json`` exactly as
``timm.models.save_for_hf`` writes them (so plain ``timm.create_model("local-dir:DIR",
pretrained=True)`` rebuilds the network), ``histoclass.json`` and a model card ``README.md``.
An ensemble folder holds one member folder per member under ``members/<name>/``, its
combination rule and fitted parameters in its ``histoclass.json`` and, for ``concat``, the head
as ``head.safetensors``. Nothing in it is pickled and no path in it is absolute.

``histoclass.json`` (JSON): ``format`` ``histoclass-published``, ``version``, ``kind``
(``member``/``ensemble``), ``classes``, ``task``, ``files`` (name -> sha256 of every weights
and config file of the folder, checked on load), ``refer_threshold``, and

* member: ``member`` (the checkpoint metadata: arch, timm name, preprocessing, stain target,
  training settings without absolute paths, validation metrics, history, ...);
* ensemble: ``method``, ``members`` (``name``, ``path`` relative to the folder, ``sha256`` of
  the member's ``histoclass.json``), ``weights``, ``stack``, ``head_config``, ``fit``;

plus what describes the model for people (not read back): ``stain``, ``input_mode``,
``temperature``, ``refer``, ``train_mpp``, ``split`` (protocol, manifest name and hash),
``metrics`` (their source and split, image and patient level, patient-bootstrap CIs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from histoclass.models.checkpoint import (
    CheckpointError,
    build_model,
    ensemble_calibration,
    file_sha256,
    preprocess_of,
    stain_of,
)
from histoclass.models.concat import ConcatHead

FORMAT = "histoclass-published"
VERSION = 1
META, WEIGHTS, CONFIG, HEAD, CARD = (
    "histoclass.json", "model.safetensors", "config.json", "head.safetensors", "README.md")
LOCAL, HUB = "local-dir:", "hf-hub:"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
# key -> type (or types) every histoclass.json of that kind must have.
SCHEMA: dict[str, dict[str, Any]] = {
    "any": {"format": str, "version": int, "kind": str, "classes": list, "task": str,
            "files": dict, "refer_threshold": (int, float)},
    "member": {"member": dict},
    "ensemble": {"method": str, "members": list, "fit": (dict, type(None))},
}
MEMBER_KEYS = {"arch": str, "timm_name": str, "num_classes": int, "classes": list,
               "preprocess": dict}


def is_model_ref(text: str | Path) -> bool:
    """True for ``local-dir:DIR`` or ``hf-hub:ORG/NAME`` (names, not files)."""
    return str(text).startswith((LOCAL, HUB))


def published_folder(ref: str | Path) -> Path | None:
    """The local folder a published model name points at, or ``None`` for a model file.

    ``local-dir:DIR`` and a plain folder are read in place; ``hf-hub:ORG/NAME[@REVISION]``
    is downloaded first (``huggingface_hub.snapshot_download``: the usual login or
    ``HF_TOKEN`` for private repositories, ``HF_HUB_OFFLINE=1`` for the local cache only).

    Raises:
        CheckpointError: No such folder, a failed download, or a folder without
            ``histoclass.json``.
    """
    text = str(ref)
    if text.startswith(LOCAL):
        folder = Path(text[len(LOCAL):]).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"{text}: no such folder {folder}")
    elif text.startswith(HUB):
        folder = hub_snapshot(text[len(HUB):])
    elif Path(text).is_dir():
        folder = Path(text)
    else:
        return None
    if not (folder / META).is_file():
        raise CheckpointError(f"{folder}: not a published histoclass model (no {META}); "
                              "write one with histoclass publish MODEL --out DIR")
    return folder


def hub_snapshot(repo: str) -> Path:
    """Download (or find in the cache) the hub repository ``ORG/NAME[@REVISION]``."""
    if not HUB_ID.match(repo):
        raise CheckpointError(f"hf-hub:{repo}: not a hub name; use hf-hub:ORG/NAME or "
                              "hf-hub:ORG/NAME@REVISION")
    import huggingface_hub  # looked up at call time so a test can stand in for the hub

    repo_id, _, revision = repo.partition("@")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None))
    except Exception as exc:  # network, auth, missing repo: many exception types, one line
        raise CheckpointError(f"hf-hub:{repo}: download failed ({one_line(exc)})") from None


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is an error naming the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _check_schema(obj: dict[str, Any], path: Path) -> None:
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a published histoclass model (format "
                              f"{obj.get('format')!r}, expected {FORMAT!r})")
    if isinstance(obj.get("version"), int) and obj["version"] > VERSION:
        raise CheckpointError(f"{path}: published format version {obj['version']} is newer "
                              f"than this histoclass understands ({VERSION}); upgrade histoclass")
    kind = obj.get("kind")
    if kind not in ("member", "ensemble"):
        raise CheckpointError(f"{path}: kind {kind!r}; expected 'member' or 'ensemble'")
    need = {**SCHEMA["any"], **SCHEMA[kind]}
    if kind == "member":
        need.update({f"member.{k}": t for k, t in MEMBER_KEYS.items()})
    for key, types in need.items():
        value = obj
        for part in key.split("."):
            value = value.get(part, KeyError) if isinstance(value, dict) else KeyError
        if value is KeyError or not isinstance(value, types) or isinstance(value, bool):
            kinds = " or ".join(t.__name__ for t in (types if isinstance(types, tuple)
                                                     else (types,)))
            raise CheckpointError(f"{path}: key {key!r} is missing or not {kinds}: the file "
                                  "was edited or is not a histoclass.json; publish the model "
                                  "again")


def _inside(folder: Path, name: str, path: Path) -> Path:
    """``folder/name``, refusing names that climb out of the folder (``..``, absolute)."""
    target = (folder / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{path}: file name {name!r} points outside the model folder")
    return folder / name


def check_files(folder: Path, obj: dict[str, Any]) -> None:
    """Every file listed under ``files`` is present with its recorded sha256."""
    meta = folder / META
    for name, digest in obj["files"].items():
        file = _inside(folder, name, meta)
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {meta})")
        if file_sha256(file) != digest:
            raise CheckpointError(f"{file} has changed since the model was published (sha256 "
                                  f"differs from {meta}); refusing to load it")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})"
                              ) from None


def _check_config(folder: Path, meta: dict[str, Any]) -> None:
    """timm's ``config.json`` must describe the same network as ``histoclass.json``."""
    path = folder / CONFIG
    cfg = read_json(path)
    pre = meta["preprocess"]
    want = {"architecture": meta["timm_name"], "num_classes": meta["num_classes"],
            "label_names": list(meta["classes"]),
            "input_size": [3, *pre["input_size"]], "mean": list(pre["mean"]),
            "std": list(pre["std"]), "interpolation": pre["interpolation"]}
    pcfg = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    got = {k: cfg.get(k, pcfg.get(k)) for k in want}
    got["input_size"] = list(got["input_size"] or [])
    got = {k: list(v) if isinstance(v, tuple) else v for k, v in got.items()}
    bad = [k for k in want if got[k] != want[k]]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)} disagree(s) with {folder / META} "
                              f"({', '.join(f'{k}={got[k]!r}' for k in bad)})")


def read_member(folder: Path, device: str | torch.device = "cpu", name: str | None = None
                ) -> tuple[str, torch.nn.Module, dict[str, Any], Any, Any]:
    """One published member as the fields of a ``Member`` (name, model, meta, preprocess,
    stain), its files checked against their recorded hashes."""
    path = folder / META
    obj = read_json(path)
    _check_schema(obj, path)
    if obj["kind"] != "member":
        raise CheckpointError(f"{path}: an ensemble where a member was expected")
    check_files(folder, obj)
    meta = obj["member"]
    _check_config(folder, meta)
    try:
        model = build_model(meta)
    except Exception as exc:  # an unknown timm name or arguments: timm raises several types
        raise CheckpointError(f"{path}: cannot build {meta['timm_name']!r} ({one_line(exc)})"
                              ) from None
    try:
        model.load_state_dict(_load_tensors(folder / WEIGHTS))
    except RuntimeError as exc:
        raise CheckpointError(f"{folder / WEIGHTS}: weights do not fit {meta['timm_name']} "
                              f"({one_line(exc)})") from None
    return (name or obj.get("name") or meta["arch"], model.to(device).eval(), meta,
            preprocess_of(meta), stain_of(meta, path))


def read_published(folder: Path, device: str | torch.device = "cpu"
                   ) -> tuple[list[tuple], dict[str, Any]]:
    """A published folder as members (``Member`` fields) and the ``Ensemble`` keyword
    arguments (``method``, fitted parameters, ``refer_threshold``, ``member_paths``, ``fit``).

    Raises:
        CheckpointError: A missing, changed or malformed file (the message names it).
    """
    path = folder / META
    obj = read_json(path)
    _check_schema(obj, path)
    refer = float(obj["refer_threshold"])
    if obj["kind"] == "member":
        return [read_member(folder, device)], {"method": "single", "refer_threshold": refer,
                                               "member_paths": [folder]}
    check_files(folder, obj)
    parts, dirs = [], []
    for entry in obj["members"]:
        if not isinstance(entry, dict) or not {"name", "path", "sha256"} <= set(entry):
            raise CheckpointError(f"{path}: member entry {entry!r} needs name, path and sha256")
        sub = _inside(folder, entry["path"], path)
        if not (sub / META).is_file():
            raise CheckpointError(f"{path}: member {entry['name']} folder {sub} is missing")
        if file_sha256(sub / META) != entry["sha256"]:
            raise CheckpointError(f"{sub / META} has changed since the ensemble was published "
                                  "(sha256 differs); refusing to load it")
        parts.append(read_member(sub, device, entry["name"]))
        dirs.append(sub)
    head = None
    if obj.get("head_config") is not None:
        try:
            head = ConcatHead(**obj["head_config"])
            head.load_state_dict(_load_tensors(folder / HEAD))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{folder / HEAD}: does not fit the concat head "
                                  f"({one_line(exc)})") from None
        head.eval()
    return parts, {"method": obj["method"], "weights": obj.get("weights"),
                   "stack": obj.get("stack"), "head": head, "refer_threshold": refer,
                   "member_paths": dirs, "fit": obj.get("fit"),
                   **ensemble_calibration(obj, path)}
