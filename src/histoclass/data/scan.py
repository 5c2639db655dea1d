"""Turn a data folder or CSV into an image table, reporting unreadable files and duplicates.

Accepted inputs:

1. the official BreakHis release tree (``BreaKHis_v1/histology_slides/breast/...``),
2. class folders (``benign/``, ``malignant/`` or the 8 subtype folders) of BreakHis-named files,
3. any class-folder tree with other file names: each image is its own group unless a
   ``groups.csv`` (columns ``path,group``, paths relative to the CSV's folder) sits in DATA or
   one of its sub-folders, or is passed as ``groups`` (paths relative to DATA),
4. a CSV with at least ``path,label`` (optional ``group``/``patient_id``, ``subtype``,
   ``magnification``; relative paths are relative to the CSV), e.g. an existing manifest.

BreakHis names win over folders: the name carries subtype, patient and magnification.

Folders histoclass wrote (``explain`` figures and overlays) hold :data:`OUTPUT_MARKER`: a scan
refuses such a folder and leaves such sub-folders out (reported), so figures never become data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from histoclass.data.breakhis import LABELS, SUBTYPE_LABEL, label_from_folder, parse_name
from histoclass.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageLoadError, inspect_image

log = logging.getLogger(__name__)

COLUMNS = [
    "path", "label", "subtype", "patient_id", "slide_id", "magnification",
    "sha256", "width", "height",
]


OUTPUT_MARKER = ".histoclass-output"


class ScanError(ValueError):
    """The input holds no usable image at all, or is not a folder or CSV."""


@dataclass
class ScanResult:
    """The readable images, and what was left out and why."""

    frame: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[list[str]] = field(default_factory=list)  # paths sharing one sha256

    def summary(self) -> str:
        """One line: images kept, skipped and duplicated."""
        n_dup = sum(len(g) for g in self.duplicates)
        return (
            f"{len(self.frame)} images kept, {len(self.skipped)} skipped, "
            f"{n_dup} in {len(self.duplicates)} duplicate groups"
        )


def mark_output(folder: str | Path, command: str) -> Path:
    """Mark ``folder`` as written by ``histoclass <command>``: scans will not take it for data."""
    from histoclass._version import __version__

    path = Path(folder) / OUTPUT_MARKER
    path.write_text(f"written by histoclass {command} {__version__}: outputs, not data; "
                    "histoclass refuses to scan this folder for images\n", encoding="utf-8")
    return path


def output_root(path: str | Path) -> Path | None:
    """The folder at or above ``path`` that histoclass wrote (holds the marker), if any."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / OUTPUT_MARKER).is_file():
            return folder
    return None


def refuse_output(path: str | Path) -> str | None:
    """Why ``path`` is not data (it lies in a folder histoclass wrote), else ``None``."""
    root = output_root(path)
    if root is None:
        return None
    return (f"{root} was written by histoclass (it holds {OUTPUT_MARKER}): its images are "
            "figures, not data; give the folder of the original images")


def data_files(root: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file under ``root`` (sorted) except those in sub-folders histoclass wrote, and
    those sub-folders as ``(folder, reason)``."""
    root = Path(root)
    written = sorted(m.parent for m in root.rglob(OUTPUT_MARKER) if m.is_file())
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER
                   and not any(w in p.parents for w in written))
    return files, [(str(w), refuse_output(w) or "") for w in written]


def _from_folder(path: Path, root: Path) -> dict[str, str]:
    for part in reversed(path.relative_to(root).parts[:-1]):
        found = label_from_folder(part)
        if found is not None:
            return {"label": found[0], "subtype": found[1]}
    raise ImageLoadError(
        path,
        "unknown file name: not a BreakHis name (e.g. SOB_B_A-14-22549AB-40-001.png) and no "
        f"class folder above it (one of {', '.join(LABELS + tuple(SUBTYPE_LABEL))})",
    )


def _describe(path: Path, root: Path | None) -> dict[str, str]:
    parsed = parse_name(path.name)
    if parsed is not None:
        return {
            "label": parsed.label, "subtype": parsed.subtype, "patient_id": parsed.patient_id,
            "slide_id": parsed.slide_id, "magnification": parsed.magnification,
        }
    if root is None:
        raise ImageLoadError(path, "no label given")
    return _from_folder(path, root)


def _rows_from_dir(root: Path, groups: dict[str, str]) -> tuple[list[dict], list[tuple]]:
    files, bad = data_files(root)
    files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    rows = []
    for p in files:
        try:
            row = {"path": str(p.resolve()), **_describe(p, root)}
        except (ImageLoadError, ValueError) as exc:
            bad.append((str(p), str(exc).removeprefix(f"{p}: ")))
            continue
        rel = p.relative_to(root).as_posix()
        if "patient_id" not in row:
            # Without a patient key each image is its own group: honest but pessimistic.
            row["patient_id"] = groups.get(rel, rel.rsplit(".", 1)[0])
        rows.append(row)
    return rows, bad


def _rows_from_csv(csv: Path) -> tuple[list[dict], list[tuple]]:
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ScanError(f"{csv}: missing column(s) {sorted(missing)}; need at least path,label")
    rows, bad = [], []
    for rec in table.to_dict("records"):
        p = Path(rec["path"])
        p = p if p.is_absolute() else (csv.parent / p)
        label = rec["label"].strip().lower()
        if label not in LABELS:
            bad.append((str(p), f"label {rec['label']!r} is not one of {list(LABELS)}"))
            continue
        parsed = parse_name(p.name)
        row = {
            "path": str(p.resolve()), "label": label,
            "subtype": rec.get("subtype") or (parsed.subtype if parsed else ""),
            "patient_id": rec.get("patient_id") or rec.get("group")
            or (parsed.patient_id if parsed else p.stem),
            "slide_id": rec.get("slide_id") or (parsed.slide_id if parsed else ""),
            "magnification": rec.get("magnification") or (parsed.magnification if parsed else ""),
        }
        rows.append(row)
    return rows, bad


def _read_groups(path: Path, base: Path, root: Path) -> dict[str, str]:
    """``path,group`` rows (paths relative to ``base``) keyed by path relative to ``root``."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"path", "group"} <= set(table.columns):
        raise ScanError(f"{path}: a groups CSV needs columns path,group; has {list(table.columns)}")
    return {
        (base / p).resolve().relative_to(root.resolve()).as_posix(): g
        for p, g in zip(table["path"], table["group"], strict=True)
    }


def scan(
    data: str | Path,
    *,
    groups: str | Path | None = None,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
) -> ScanResult:
    """Find, decode and hash every image under ``data`` (a folder or a CSV).

    Args:
        data: Folder (layouts 1-3) or CSV (layout 4).
        groups: CSV of ``path,group`` for folders of non-BreakHis names.
        workers: Decoding threads (PIL releases the GIL while decoding).
        max_pixels: Larger images are skipped as too large.
        progress: Show a progress bar.

    Raises:
        ScanError: ``data`` does not exist, is empty, holds no readable image, or is a folder
            histoclass wrote.
    """
    data = Path(data)
    if data.is_dir() and refuse_output(data):
        raise ScanError(refuse_output(data))
    if data.is_file() and data.suffix.lower() == ".csv":
        rows, bad = _rows_from_csv(data)
    elif data.is_dir():
        known: dict[str, str] = {}
        for gfile in sorted(data.rglob("groups.csv")):
            known.update(_read_groups(gfile, gfile.parent, data))
        if groups:
            known.update(_read_groups(Path(groups), data, data))
        rows, bad = _rows_from_dir(data, known)
    elif not data.exists():
        raise ScanError(f"{data}: no such file or folder")
    else:
        raise ScanError(f"{data}: expected a folder of images or a CSV with path,label columns")
    if not rows and not bad:
        raise ScanError(
            f"{data}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )

    def check(row: dict) -> dict | tuple[str, str]:
        try:
            info = inspect_image(row["path"], max_pixels)
        except ImageLoadError as exc:
            return (row["path"], exc.reason)
        return {**row, "sha256": info.sha256, "width": info.width, "height": info.height}

    kept: list[dict] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results: Iterable = pool.map(check, rows)
        # disable=None: a bar on a terminal, none in a log file (SLURM, CI)
        for res in tqdm(results, total=len(rows), disable=None if progress else True,
                        desc="scan"):
            (bad.append(res) if isinstance(res, tuple) else kept.append(res))
    for path, reason in bad:
        log.warning("skipped %s: %s", path, reason)
    if not kept:
        raise ScanError(f"{data}: none of the {len(bad)} image file(s) could be read")

    frame = pd.DataFrame([{c: row.get(c, "") for c in COLUMNS} for row in kept])
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    dup = frame[frame.duplicated("sha256", keep=False)]
    duplicates = [sorted(g["path"]) for _, g in dup.groupby("sha256", sort=True)]
    for group in duplicates:
        log.warning("duplicate images (same content): %s", ", ".join(group))
    return ScanResult(frame, bad, duplicates)
