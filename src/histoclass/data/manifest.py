"""The split manifest CSV: the file every later stage reads. Images are never moved."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import pandas as pd

from histoclass.data.files import atomic_write, read_csv
from histoclass.data.splits import check_split_values

REQUIRED = ("path", "label", "patient_id", "split")
SAMPLES = ("breakhis", "ucsb")


def sample_path(name: str = "") -> Path:
    """Folder of the real H&E sample bundled with the package.

    Args:
        name: ``""`` for all, or one of ``breakhis``, ``ucsb``.
    """
    root = Path(str(resources.files("histoclass") / "samples"))
    if not name:
        return root
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
    return root / name


def resolve_data(data: str | Path) -> Path:
    """Map ``sample`` / ``sample:<name>`` to the bundled sample; other values pass through."""
    text = str(data)
    if text == "sample" or text.startswith("sample:"):
        return sample_path(text.partition(":")[2])
    return Path(data)


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest (or any CSV table) atomically; identical frames give identical bytes.

    Raises:
        OSError: ``path`` cannot be written (the message names it; nothing is left behind).
    """
    return atomic_write(path, lambda fh: frame.to_csv(fh, index=False, lineterminator="\n"),
                        binary=False)


def skip_list_path(out: str | Path) -> Path:
    """Where the inputs left out of the file ``out`` are listed: ``<out stem>.skipped.csv``
    beside it (named after the output, so two runs into one folder never share one)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.skipped.csv")


def read_table(path: Path, required: Sequence[str], file: str, kind: str) -> pd.DataFrame:
    """A CSV as strings (empty cells stay ""), with the ``required`` columns; errors call it
    a ``file`` when it is absent and say it is not a ``kind`` when columns are missing."""
    frame = read_csv(path, file)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a {kind}, missing column(s) {missing}")
    return frame


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest; relative image paths are taken relative to the manifest's folder."""
    path = Path(path)
    frame = read_table(path, REQUIRED, "manifest", "manifest")
    check_split_values(frame, str(path))
    base = path.resolve().parent
    frame["path"] = [p if os.path.isabs(p) else str(base / p) for p in frame["path"]]
    return frame


def select(frame: pd.DataFrame, split: str, fold: int | None = None) -> pd.DataFrame:
    """Rows of one split (``train``/``val``/``test``), for one fold of a k-fold manifest."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; choose one of train, val, test")
    col = "split"
    if fold is not None:
        col = f"split_fold{fold}"
        if col not in frame.columns:
            folds = sorted(c.removeprefix("split_fold") for c in frame if c.startswith("split_f"))
            raise ValueError(f"fold {fold} not in manifest; it has folds {folds or 'none'}")
    return frame[frame[col] == split].reset_index(drop=True)


def leaks_patients(frame: pd.DataFrame) -> bool:
    """True when the manifest was made with the image-level ``paper`` protocol."""
    return "protocol" in frame.columns and (frame["protocol"] == "paper").any()


def split_table(frame: pd.DataFrame, column: str = "split") -> pd.DataFrame:
    """Per split: images, patients, benign/malignant images and images per magnification."""
    rows = []
    for name in ("train", "val", "test"):
        part = frame[frame[column] == name]
        row = {
            "split": name, "images": len(part), "patients": part["patient_id"].nunique(),
            "benign": int((part["label"] == "benign").sum()),
            "malignant": int((part["label"] == "malignant").sum()),
        }
        for mag in sorted(set(frame.get("magnification", [])) - {""}, key=lambda m: int(m[:-1])):
            row[mag] = int((part["magnification"] == mag).sum())
        rows.append(row)
    return pd.DataFrame(rows)
