"""Predictions of a member or an ensemble on images, folders or a manifest split.

Images are decoded in DataLoader worker processes; an unreadable file becomes a ``(path,
reason)`` entry in ``skipped`` instead of stopping the run. Each member gets its own input
(stain normalisation and size from its checkpoint). Softmax happens here, never in models.

The predictions CSV has ``path,patient_id,magnification,label`` (``label`` empty when unknown),
``subtype`` (subtype task), ``split,protocol`` (from a manifest), then ``p_malignant`` (binary
task) or ``p_<class>`` per class, ``pred`` (class name) and, for ensembles,
``member.<name>.p_<class>`` columns, ``disagreement`` and ``refer`` (0/1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from histoclass.data.breakhis import label_from_folder, parse_name
from histoclass.data.images import IMAGE_SUFFIXES, ImageLoadError, load_rgb
from histoclass.models.ensemble import Ensemble, Output, combine, disagreement

log = logging.getLogger(__name__)
INFO = ("path", "patient_id", "magnification", "label")


class Predictions(NamedTuple):
    """A predictions table and the inputs left out, as ``(path, reason)``."""

    frame: pd.DataFrame
    skipped: list[tuple[str, str]]


class ImageInputs(Dataset):
    """One input per member for each path; an unreadable file yields its error message."""

    def __init__(self, paths: Sequence[str], ens: Ensemble) -> None:
        self.paths = [str(p) for p in paths]
        self.steps = [(m.preprocess, m.stain) for m in ens.members]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor] | str]:
        try:
            img = load_rgb(self.paths[i])
            done: dict[Any, torch.Tensor] = {}  # members sharing settings share the work
            out = []
            for pre, stain in self.steps:
                key = (pre, id(stain))
                if key not in done:
                    from PIL import Image

                    src = img if stain is None else Image.fromarray(stain(np.asarray(img)))
                    done[key] = pre.normalize(pre.resize(src))
                out.append(done[key])
            return i, out
        except ImageLoadError as exc:
            return i, exc.reason
        except Exception as exc:  # a stain fit failing on an odd image must not stop the run
            return i, f"{type(exc).__name__}: {exc}"


def collate(items: list[tuple[int, Any]]) -> tuple[list[int], list[torch.Tensor], list]:
    """Stack the readable items per member; keep ``(index, reason)`` for the others."""
    good = [(i, x) for i, x in items if not isinstance(x, str)]
    bad = [(i, x) for i, x in items if isinstance(x, str)]
    inputs = [torch.stack([x[m] for _, x in good]) for m in range(len(good[0][1]))] if good else []
    return [i for i, _ in good], inputs, bad


class Outputs(NamedTuple):
    """Raw outputs for the readable rows ``index`` of a path list."""

    index: list[int]
    proba: torch.Tensor
    pred: torch.Tensor
    members: torch.Tensor
    disagreement: torch.Tensor
    features: torch.Tensor | None  # concatenated pooled member features, when asked
    skipped: list[tuple[str, str]]


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run(ens: Ensemble, paths: Sequence[str], *, tta: bool = False, batch_size: int = 16,
        workers: int = 0, features: bool = False, progress: bool = False) -> Outputs:
    """Run ``ens`` over image files (see :func:`predict_paths`).

    With ``features`` (used to fit ensembles) it returns the members' concatenated pooled
    features too, and combines the members by soft voting whatever ``ens.method`` is.
    """
    from tqdm.auto import tqdm

    if getattr(ens, "backend", None) == "onnx":  # OnnxClassifier: its own overlapped decoding
        if tta or features:
            raise ValueError("the onnx backend predicts plain images only: no --tta, no fitting")
        return ens.predict_paths(paths, batch_size, max(workers, 1), progress=progress).to_torch()
    loader = DataLoader(ImageInputs(paths, ens), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate, shuffle=False)
    index, outs, feats, skipped = [], [], [], []
    for idx, inputs, bad in tqdm(loader, disable=not progress, desc="predict"):
        for i, reason in bad:
            log.warning("skipped %s: %s", paths[i], reason)
            skipped.append((str(paths[i]), reason))
        if not idx:
            continue
        index += idx
        if features:  # fitting: members' soft outputs and features in one pass, no TTA
            p, f = ens.forward(inputs, features=True)
            proba, pred = combine("soft", p)
            outs.append(Output(proba, pred, p, disagreement("soft", p, pred)))
            feats.append(torch.cat(f, 1).cpu())
        else:
            outs.append(ens.predict_proba(inputs, tta=tta))
    if not index:
        c, m = len(ens.classes), len(ens.members)
        empty = torch.zeros(0, c)
        return Outputs([], empty, torch.zeros(0, dtype=torch.long), torch.zeros(m, 0, c),
                       torch.zeros(0), None, skipped)
    return Outputs(
        index, torch.cat([o.proba for o in outs]).cpu(), torch.cat([o.pred for o in outs]).cpu(),
        torch.cat([o.members for o in outs], 1).cpu(),
        torch.cat([o.disagreement for o in outs]).cpu(),
        torch.cat(feats) if features else None, skipped,
    )


def prob_columns(classes: Sequence[str], prefix: str = "") -> list[str]:
    """``p_malignant`` for the binary task, else ``p_<class>`` for every class."""
    if list(classes) == ["benign", "malignant"]:
        return [f"{prefix}p_malignant"]
    return [f"{prefix}p_{c}" for c in classes]


def describe(path: str | Path, root: Path | None = None) -> dict[str, str]:
    """Patient, magnification, label and subtype from a BreakHis name or class folder."""
    path = Path(path)
    row = {"path": str(path), "patient_id": "", "magnification": "", "label": "", "subtype": ""}
    try:
        parsed = parse_name(path.name)
    except ValueError as exc:  # a contradictory name: predict it, but claim no label
        log.warning("%s", exc)
        return row
    if parsed is not None:
        return {**row, "patient_id": parsed.patient_id, "magnification": parsed.magnification,
                "label": parsed.label, "subtype": parsed.subtype}
    parts = path.relative_to(root).parts[:-1] if root is not None else path.parts[-2:-1]
    for part in reversed(parts):
        found = label_from_folder(part)
        if found is not None:
            return {**row, "label": found[0], "subtype": found[1]}
    return row


def expand_inputs(items: Sequence[str | Path]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Image files and folders (searched recursively) -> info rows, plus what was left out."""
    rows, skipped = [], []
    for item in items:
        item = Path(item)
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file())
            if not files:
                skipped.append((str(item), "empty folder"))
            for p in files:
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append(describe(p, item))
                else:
                    skipped.append((str(p), f"not an image file (suffix {p.suffix or 'none'!r})"))
        elif item.is_file():
            rows.append(describe(item))
        else:
            skipped.append((str(item), "no such file or folder"))
    return pd.DataFrame(rows, columns=[*INFO, "subtype"]), skipped


def predict_paths(ens: Ensemble, paths: Sequence[str | Path], *,
                  info: pd.DataFrame | None = None, tta: bool = False, batch_size: int = 16,
                  workers: int = 0, refer_threshold: float | None = None,
                  progress: bool = False) -> Predictions:
    """Predict image files.

    Args:
        ens: From :func:`histoclass.models.ensemble.load_model_file` (member or ensemble).
        paths: Image files.
        info: Rows aligned with ``paths`` holding the descriptive columns (``path``,
            ``patient_id``, ``magnification``, ``label``, optional ``subtype``/``split``/
            ``protocol``); derived from the names when ``None``.
        tta: Average the 8 flips/90-degree rotations.
        batch_size: Images per forward pass.
        workers: Decoding processes (0 decodes in this process).
        refer_threshold: Overrides the ensemble's disagreement threshold for ``refer``.
        progress: Show a progress bar.
    """
    paths = [str(p) for p in paths]
    if info is None:
        info = pd.DataFrame([describe(p) for p in paths], columns=[*INFO, "subtype"])
    out = run(ens, paths, tta=tta, batch_size=batch_size, workers=workers, progress=progress)
    keep = list(INFO) + (["subtype"] if ens.task == "subtype" else [])
    keep += [c for c in ("split", "protocol") if c in info.columns]
    frame = info.iloc[out.index].reindex(columns=keep).fillna("").reset_index(drop=True)
    probs = out.proba.numpy().astype(float)
    cols = prob_columns(ens.classes)
    frame[cols] = probs[:, 1:] if len(cols) == 1 else probs
    frame["pred"] = [ens.classes[i] for i in out.pred.tolist()]
    if ens.is_ensemble:
        for m, member in enumerate(ens.members):
            p = out.members[m].numpy().astype(float)
            mcols = prob_columns(ens.classes, f"member.{member.name}.")
            frame[mcols] = p[:, 1:] if len(mcols) == 1 else p
        threshold = ens.refer_threshold if refer_threshold is None else refer_threshold
        frame["disagreement"] = out.disagreement.numpy().astype(float)
        frame["refer"] = (frame["disagreement"] > threshold).astype(int)
    log.info("predicted %d image(s), skipped %d", len(frame), len(out.skipped))
    return Predictions(frame, out.skipped)


def predict_manifest(ens: Ensemble, manifest: str | Path, split: str = "test",
                     fold: int | None = None, **kwargs: Any) -> Predictions:
    """Predict one split of a manifest (``kwargs`` go to :func:`predict_paths`)."""
    from histoclass.data.manifest import read_manifest, select

    frame = select(read_manifest(manifest), split, fold)
    if frame.empty:
        raise ValueError(f"{manifest}: no {split!r} rows" + (f" in fold {fold}" if fold else ""))
    info = frame.copy()
    if fold is not None:
        info["split"] = frame[f"split_fold{fold}"]
    return predict_paths(ens, list(frame["path"]), info=info, **kwargs)


def write_predictions(pred: Predictions, out: str | Path) -> tuple[Path, Path]:
    """Write the CSV and ``skipped.csv`` (``path,reason``) beside it; returns both paths."""
    from histoclass.data.manifest import write_manifest

    out = Path(out)
    csv = write_manifest(pred.frame, out)
    skipped = write_manifest(pd.DataFrame(pred.skipped, columns=["path", "reason"]),
                             out.with_name("skipped.csv"))
    return csv, skipped
