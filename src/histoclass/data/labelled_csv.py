"""A data set given as a CSV of ``path,label`` (layout 4 of :mod:`histoclass.data.scan`):
rows checked against each other and against the BreakHis names of their files.

Optional columns ``group``/``patient_id``, ``subtype``, ``slide_id``, ``magnification``;
relative paths are relative to the CSV. A row whose label contradicts its subtype or its file's
BreakHis name, or an image listed twice with different labels, is an error naming the lines;
the same image listed twice with the same label is kept once, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from histoclass.data.breakhis import LABELS, SUBTYPE_LABEL, parse_name
from histoclass.data.files import read_csv

log = logging.getLogger(__name__)


class ScanError(ValueError):
    """The input holds no usable image at all, or is not a folder or CSV."""


def rows_from_csv(csv: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """The CSV's rows as scan rows, and the rows left out as ``(path, reason)``.

    Raises:
        ScanError: Missing columns, or rows that contradict each other (lines named).
    """
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
