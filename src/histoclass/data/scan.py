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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from histoclass.data.breakhis import (
    LABELS,
    LOOKS_BREAKHIS,
    SUBTYPE_LABEL,
    label_from_folder,
    parse_name,
)
from histoclass.data.files import read_csv, walk
from histoclass.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageLoadError,
    inspect_image,
    sniff,
)
from histoclass.data.splits import duplicate_groups

log = logging.getLogger(__name__)

COLUMNS = [
    "path", "label", "subtype", "patient_id", "slide_id", "magnification",
    "sha256", "pixel_sha256", "width", "height", "group_source",
]
# Where a row's patient_id came from: a BreakHis name, a groups CSV, the input CSV's
# patient_id/group column, or nowhere (``none``: the image is its own group).
GROUP_SOURCES = ("name", "groups", "csv", "none")


class ScanError(ValueError):
    """The input holds no usable image at all, or is not a folder or CSV."""


@dataclass
class ScanResult:
    """The readable images, and what was left out and why."""

    frame: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[list[str]] = field(default_factory=list)  # same bytes or same pixels
    unparsed_breakhis: list[str] = field(default_factory=list)  # SOB_ names with no slide id

    def summary(self) -> str:
        """One line: images kept, skipped and duplicated."""
        n_dup = sum(len(g) for g in self.duplicates)
        return (
            f"{len(self.frame)} images kept, {len(self.skipped)} skipped, "
            f"{n_dup} in {len(self.duplicates)} duplicate groups"
        )

    @property
    def ungrouped(self) -> int:
        """Images with no patient id (each its own group: leakage cannot be ruled out)."""
        return int((self.frame["group_source"] == "none").sum()) if len(self.frame) else 0

    def grouping_warnings(self) -> list[str]:
        """Loud lines for a split: images without patient ids, unparsed BreakHis-like names."""
        out, n = [], len(self.frame)
        if self.unparsed_breakhis:
            out.append(
                f"{len(self.unparsed_breakhis)} BreakHis-like file name(s) (SOB_...) hold no "
                f"recognisable slide id (e.g. {self.unparsed_breakhis[0]}): each is its own "
                "group, so one patient's images can land in several splits; rename them or "
                "pass --groups CSV (path,group)")
        if self.ungrouped:
            some = "any" if self.ungrouped == n else f"{self.ungrouped}"
            out.append(
                f"no patient ids for {some} of the {n} images (no BreakHis name, no groups "
                "CSV): each is its own group, so leakage between splits cannot be prevented or "
                "checked; pass --groups CSV (path,group)")
        return out


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
    found, bad = walk(root)  # follows symlinked folders: a linked class folder is data too
    files = []
    for p in found:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        elif (kind := sniff(p)) is not None:  # an image by content (GIF, a TIFF slide, no
            # suffix): not read, and said so; other files (README, checksums) are not data
            bad.append((str(p), f"{kind} image with suffix {p.suffix or 'none'!r}: not read "
                                f"(supported: {', '.join(sorted(IMAGE_SUFFIXES))})"))
    rows = []
    for p in files:
        try:
            row = {"path": str(p.resolve()), **_describe(p, root)}
        except (ImageLoadError, ValueError) as exc:
            bad.append((str(p), str(exc).removeprefix(f"{p}: ")))
            continue
        rel = p.relative_to(root).as_posix()
        if "patient_id" in row:
            row["group_source"] = "name"
        elif rel in groups:
            row["patient_id"], row["group_source"] = groups[rel], "groups"
        else:
            # Without a patient key each image is its own group: honest but pessimistic.
            row["patient_id"], row["group_source"] = rel.rsplit(".", 1)[0], "none"
        rows.append(row)
    return rows, bad


def _rows_from_csv(csv: Path) -> tuple[list[dict], list[tuple]]:
    table = read_csv(csv, "data CSV")
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ScanError(f"{csv}: missing column(s) {sorted(missing)}; need at least path,label")
    rows, bad, problems = [], [], []
    for line, rec in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        p = Path(rec["path"])
        p = p if p.is_absolute() else (csv.parent / p)
        label = rec["label"].strip().lower()
        if label not in LABELS:
            bad.append((str(p), f"label {rec['label']!r} is not one of {list(LABELS)}"))
            continue
        parsed = parse_name(p.name)
        given = (rec.get("patient_id") or rec.get("group") or "").strip()
        row = {
            "path": str(p.resolve()), "label": label, "_line": line,
            "subtype": rec.get("subtype") or (parsed.subtype if parsed else ""),
            "patient_id": given or (parsed.patient_id if parsed else p.stem),
            "group_source": "csv" if given else ("name" if parsed else "none"),
            "slide_id": rec.get("slide_id") or (parsed.slide_id if parsed else ""),
            "magnification": rec.get("magnification") or (parsed.magnification if parsed else ""),
        }
        problems += _contradictions(row, parsed)
        rows.append(row)
    problems += _duplicate_rows(rows)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)"
                                            if len(problems) > 10 else "")
        raise ScanError(f"{csv}: {shown}")
    seen: set[str] = set()
    kept = []
    for row in rows:
        line = row.pop("_line")
        if row["path"] in seen:
            log.warning("%s line %d: %s listed again with the same label; kept once", csv, line,
                        row["path"])
            continue
        seen.add(row["path"])
        kept.append(row)
    return kept, bad


def _contradictions(row: dict, parsed) -> list[str]:
    """Why a CSV row's label, subtype and BreakHis file name disagree (empty when they agree)."""
    line, label, subtype = row["_line"], row["label"], row["subtype"]
    out = []
    if parsed is not None and parsed.label != label:
        out.append(f"line {line}: label {label} but the file name {Path(row['path']).name} "
                   f"says {parsed.label} ({parsed.subtype})")
    elif parsed is not None and subtype and subtype != parsed.subtype:
        out.append(f"line {line}: subtype {subtype} but the file name says {parsed.subtype}")
    if subtype in SUBTYPE_LABEL and SUBTYPE_LABEL[subtype] != label:
        out.append(f"line {line}: label {label} contradicts subtype {subtype} "
                   f"({SUBTYPE_LABEL[subtype]})")
    return out


def _duplicate_rows(rows: list[dict]) -> list[str]:
    """One message per image listed on several lines with different labels or subtypes."""
    by_path: dict[str, list[dict]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    out = []
    for path, same in by_path.items():
        if len({(r["label"], r["subtype"]) for r in same}) > 1:
            where = ", ".join(f"line {r['_line']} {r['label']}"
                              + (f"/{r['subtype']}" if r["subtype"] else "") for r in same)
            out.append(f"{path} is listed with different labels ({where})")
    return out


def _read_groups(path: Path, base: Path, root: Path) -> dict[str, str]:
    """``path,group`` rows (paths relative to ``base``) keyed by path relative to ``root``."""
    table = read_csv(path, "groups CSV")
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
        ScanError: ``data`` does not exist, is empty, or holds no readable image.
    """
    data = Path(data)
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
    if not rows:
        raise ScanError(
            f"{data}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            + (f"; left out {len(bad)}, e.g. {bad[0][0]}: {bad[0][1]}" if bad else ""))

    def check(row: dict) -> dict | tuple[str, str]:
        try:
            info = inspect_image(row["path"], max_pixels)
        except ImageLoadError as exc:
            return (row["path"], exc.reason)
        return {**row, "sha256": info.sha256, "pixel_sha256": info.pixel_sha256,
                "width": info.width, "height": info.height}

    kept: list[dict] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results: Iterable = pool.map(check, rows)
        for res in tqdm(results, total=len(rows), disable=not progress, desc="scan"):
            (bad.append(res) if isinstance(res, tuple) else kept.append(res))
    for path, reason in bad:
        log.warning("skipped %s: %s", path, reason)
    if not kept:
        raise ScanError(f"{data}: none of the {len(rows)} image file(s) could be read")

    frame = pd.DataFrame([{c: row.get(c, "") for c in COLUMNS} for row in kept])
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    duplicates = duplicate_groups(frame)
    for group in duplicates:
        log.warning("duplicate images (same bytes or same pixels): %s", ", ".join(group))
    looks = frame["path"].map(lambda p: bool(LOOKS_BREAKHIS.search(Path(p).name)))
    unparsed = frame.loc[looks & (frame["group_source"] == "none"), "path"].tolist()
    return ScanResult(frame, bad, duplicates, unparsed)
