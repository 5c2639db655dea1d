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

Folders histoclass wrote (``explain`` figures and overlays) hold the output marker
(:func:`histoclass.data.files.mark_output`): a scan refuses such a folder and leaves such
sub-folders out (reported), so figures never become data.
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
    describe_path,
    parse_name,
)
from histoclass.data.files import (  # noqa: F401 - the output marker is re-exported
    OUTPUT_MARKER,
    mark_output,
    read_csv,
    refuse_output,
    walk,
)
from histoclass.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageLoadError,
    inspect_image,
    sniff,
)
from histoclass.data.labelled_csv import ScanError, rows_from_csv
from histoclass.data.splits import duplicate_groups

log = logging.getLogger(__name__)

COLUMNS = [
    "path", "label", "subtype", "patient_id", "slide_id", "magnification",
    "sha256", "pixel_sha256", "width", "height", "group_source",
]
# Where a row's patient_id came from: a BreakHis name, a groups CSV, the input CSV's
# patient_id/group column, or nowhere (``none``: the image is its own group).
GROUP_SOURCES = ("name", "groups", "csv", "none")


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


def _describe(path: Path, root: Path | None) -> dict[str, str]:
    # A CSV row (no root) gains only what a BreakHis name says, never a folder's label.
    found = describe_path(path, root) if root is not None or parse_name(path.name) else None
    if found is not None:
        return found
    if root is None:
        raise ImageLoadError(path, "no label given")
    raise ImageLoadError(
        path,
        "unknown file name: not a BreakHis name (e.g. SOB_B_A-14-22549AB-40-001.png) and no "
        f"class folder above it (one of {', '.join(LABELS + tuple(SUBTYPE_LABEL))})",
    )


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
        ScanError: ``data`` does not exist, is empty, holds no readable image, or is a folder
            histoclass wrote.
    """
    data = Path(data)
    if data.is_dir() and refuse_output(data):
        raise ScanError(refuse_output(data))
    if data.is_file() and data.suffix.lower() == ".csv":
        rows, bad = rows_from_csv(data)
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
        # disable=None: a bar on a terminal, none in a log file (SLURM, CI)
        for res in tqdm(results, total=len(rows), disable=None if progress else True,
                        desc="scan"):
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
