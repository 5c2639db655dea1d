"""Write a published model folder (``histoclass publish``) and push it to the Hugging Face hub.

The folder's format is :mod:`histoclass.models.published` (which reads it back). Members are
written by ``timm.models.save_for_hf`` itself (``model.safetensors`` and ``config.json``), with
a data config of ``crop_pct`` 1.0 and ``crop_mode`` ``squash``: timm's eval transform then
resizes the whole image to the input size (a centre crop of nothing) with the model's
interpolation, mean and std, which is exactly :class:`histoclass.data.transforms.Preprocess`.
The folder is built beside ``out`` and renamed into place, so a failure never leaves half a
model behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from histoclass._version import __version__
from histoclass.data.transforms import Preprocess
from histoclass.deploy.publish.card import model_card
from histoclass.deploy.publish.facts import (
    member_meta,
    metrics_facts,
    portable,
    reading,
    split_facts,
)
from histoclass.models.checkpoint import file_sha256
from histoclass.models.ensemble import DEFAULT_REFER, Ensemble, Member, load_model_file
from histoclass.models.published import (
    CARD,
    CONFIG,
    FORMAT,
    HEAD,
    HUB_ID,
    META,
    VERSION,
    WEIGHTS,
    one_line,
)

log = logging.getLogger(__name__)
FORMATS = ("wsinfer",)


class PushError(RuntimeError):
    """The hub refused the upload, or could not be reached."""


def data_config(pre: Preprocess) -> dict[str, Any]:
    """timm data-config settings whose eval transform equals ``pre`` (squash, no crop)."""
    return {"input_size": (3, *pre.input_size), "interpolation": pre.interpolation,
            "mean": tuple(pre.mean), "std": tuple(pre.std), "crop_pct": 1.0,
            "crop_mode": "squash"}


def write_json(path: Path, obj: dict[str, Any]) -> Path:
    """Indented JSON, :func:`~histoclass.deploy.publish.facts.portable` (no absolute path, no
    NaN)."""
    path.write_text(json.dumps(portable(obj), indent=2, allow_nan=False) + "\n",
                    encoding="utf-8")
    return path


def _header(kind: str, classes: list[str], task: str) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "kind": kind, "classes": list(classes),
            "task": task, "histoclass_version": __version__}


def write_member(member: Member, folder: Path, facts: dict[str, Any], license_id: str,
                 refer_threshold: float = DEFAULT_REFER) -> dict[str, Any]:
    """``model.safetensors`` + ``config.json`` (timm's) + ``histoclass.json`` of one member."""
    from timm.models import save_for_hf

    if not hasattr(member.model, "pretrained_cfg"):
        raise ValueError(f"member {member.name} is a {type(member.model).__name__}, not a timm "
                         "model: only timm networks can be published")
    folder.mkdir(parents=True, exist_ok=True)
    classes = list(member.meta["classes"])
    save_for_hf(member.model.cpu(), str(folder), safe_serialization=True,
                model_config={"label_names": classes,
                              "pretrained_cfg": {"tag": "histoclass", "license": license_id}},
                data_config=data_config(member.preprocess))
    obj = {**_header("member", classes, member.meta.get("task", "binary")), "name": member.name,
           "files": {n: file_sha256(folder / n) for n in (WEIGHTS, CONFIG)},
           "refer_threshold": float(refer_threshold), "member": member_meta(member.meta),
           **facts}
    write_json(folder / META, obj)
    return obj


def dir_names(names: list[str]) -> list[str]:
    """Member folder names: safe characters only, unique."""
    out: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._@+-]", "_", name).strip(".") or "member"
        cand, k = base, 1
        while cand in out:
            k += 1
            cand = f"{base}-{k}"
        out.append(cand)
    return out


def write_ensemble(ens: Ensemble, folder: Path, facts: dict[str, Any], license_id: str,
                   extra_files: dict[str, str]) -> dict[str, Any]:
    """One member folder per member under ``members/``, the head and ``histoclass.json``."""
    from safetensors.torch import save_file

    entries = []
    for m, d in zip(ens.members, dir_names(ens.member_names), strict=True):
        sub = folder / "members" / d
        own = {**reading(Ensemble([m], "single")), "split": facts["split"],
               "metrics": metrics_facts(Ensemble([m], "single"), None)}
        write_member(m, sub, own, license_id)
        entries.append({"name": m.name, "path": f"members/{d}", "sha256": file_sha256(sub / META),
                        "arch": m.meta.get("arch", ""), "timm_name": m.meta.get("timm_name", "")})
    files = dict(extra_files)
    if ens.head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ens.head.state_dict().items()},
                  str(folder / HEAD))
        files[HEAD] = file_sha256(folder / HEAD)
    obj = {**_header("ensemble", ens.classes, ens.task), "method": ens.method, "members": entries,
           "weights": ens.weights, "stack": ens.stack,
           "head_config": None if ens.head is None else ens.head.config,
           "refer_threshold": float(ens.refer_threshold), "fit": portable(ens.fit or None),
           "files": files, **facts, "calibration": portable(ens.calibration),
           "refer_risk": portable(ens.refer_risk)}
    write_json(folder / META, obj)
    return obj


def _fresh(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder; choose a new "
                         "folder (a published model is written whole, never over another)")


def publish(model: str | Path, out: str | Path, *, metrics: str | Path | None = None,
            manifest: str | Path | None = None, dataset: str = "BreakHis",
            license_id: str = "mit", fmt: str | None = None, mpp: float | None = None,
            repo_id: str | None = None) -> list[Path]:
    """Write the self-contained published folder of a member or an ensemble.

    Args:
        model: Member checkpoint, ensemble file or published folder (``local-dir:``/``hf-hub:``).
        out: New (or empty) folder to write.
        metrics: ``metrics.json`` of ``histoclass evaluate`` (or its folder); without it the
            card reports the checkpoints' validation metrics, labelled as validation.
        manifest: Training manifest, when it moved since training (for the protocol and hash).
        dataset: Name of the training data for the card (``BreakHis`` adds its citation).
        license_id: Licence of the weights (a hub licence id).
        fmt: ``wsinfer`` also writes WSInfer's config and a TorchScript model in ``wsinfer/``.
        mpp: Microns per pixel of the model's input, for WSInfer (default: ``train_mpp``).
        repo_id: Hub name the card's loading instructions use (``ORG/NAME``).

    Returns:
        Every file written, sorted.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose {', '.join(FORMATS)}")
    if repo_id is not None and not HUB_ID.match(repo_id):
        raise ValueError(f"--push {repo_id!r}: not a hub name; use ORG/NAME")
    out = Path(out)
    _fresh(out)
    ens = load_model_file(model)
    facts = {**reading(ens), "split": split_facts(ens, manifest),
             "metrics": metrics_facts(ens, metrics)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        extra: dict[str, str] = {}
        if fmt == "wsinfer":
            from histoclass.deploy.publish.wsinfer import write_wsinfer

            extra = {p.relative_to(tmp).as_posix(): file_sha256(p)
                     for p in write_wsinfer(ens, tmp / "wsinfer", mpp, facts)}
        if ens.is_ensemble:
            obj = write_ensemble(ens, tmp, facts, license_id, extra)
        else:
            obj = write_member(ens.members[0], tmp, facts, license_id, ens.refer_threshold)
            if extra:
                obj["files"].update(extra)
                write_json(tmp / META, obj)
        model_card(obj, dataset=dataset, license_id=license_id, repo_id=repo_id,
                   name=out.name).save(tmp / CARD)
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp's 0700 (and safetensors' 0600) would survive the rename: use the umask
        for p in tmp.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("published %s -> %s", model, out)
    return sorted(p for p in out.rglob("*") if p.is_file())


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a published folder to the hub repository ``repo_id`` (created if needed), with
    the token of ``hf auth login`` or ``HF_TOKEN``; returns the commit URL.

    Raises:
        PushError: Refused (no token, no write access) or unreachable, in one line.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not HUB_ID.match(repo_id) or "@" in repo_id:
        raise ValueError(f"--push {repo_id!r}: not a hub name; use ORG/NAME")
    if not (folder / META).is_file():
        raise ValueError(f"{folder} is not a published model folder (no {META})")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder,
                                 commit_message=f"histoclass {__version__} publish")
    except Exception as exc:  # HTTP, auth and connection errors of several libraries
        raise PushError(f"push of {folder} to hf-hub:{repo_id} failed ({one_line(exc)}); the "
                        f"folder is complete: retry with hf upload {repo_id} {folder}") from None
    return str(getattr(info, "commit_url", info))
