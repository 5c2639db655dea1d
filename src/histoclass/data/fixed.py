"""Published splits: a fixed list of held-out patients and a subset of the subtypes.

Benchmarks such as kaiko eva's BreakHis task fix their evaluation patients by slide id
(``16184CD``, the third ``-`` field of a BreakHis name) and keep only some subtypes. These
helpers select those rows; :func:`histoclass.data.splits.make_split` puts every image of a
listed patient (all its slides, see :mod:`histoclass.data.breakhis`) on the held-out side, so
the split stays patient-disjoint even where the published list names only one slide of a
patient.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from histoclass.data.breakhis import SUBTYPE_CODES

log = logging.getLogger(__name__)


def parse_ids(values: Iterable[str] | str | None) -> list[str]:
    """Patient or slide ids from a list, comma-separated strings, or files (one id a line,
    ``#`` comments); ``[]`` for none. Order kept, duplicates dropped."""
    if values is None:
        return []
    out: list[str] = []
    for value in [values] if isinstance(values, str) else values:
        value = str(value).strip()
        path = Path(value)
        if value and path.is_file():
            lines = path.read_text().splitlines()
            parts = [line.split("#", 1)[0].strip() for line in lines]
        else:
            parts = [p.strip() for p in value.split(",")]
        out += [p for p in parts if p and p not in out]
    return out


def subtype_names(classes: Iterable[str]) -> list[str]:
    """BreakHis subtype names for codes (``TA``) or names (``tubular_adenoma``), in the order
    given.

    Raises:
        ValueError: naming an unknown class and the valid codes.
    """
    names = {v: v for v in SUBTYPE_CODES.values()}
    names.update({k.upper(): v for k, v in SUBTYPE_CODES.items()})
    out = []
    for c in classes:
        key = str(c).strip()
        name = names.get(key.upper()) or names.get(key.lower().replace(" ", "_"))
        if name is None:
            raise ValueError(f"--classes {c!r}: not a BreakHis subtype; choose codes from "
                             f"{', '.join(SUBTYPE_CODES)} (or their names)")
        out.append(name)
    return out


def keep_classes(frame: pd.DataFrame, classes: Iterable[str]) -> pd.DataFrame:
    """Rows whose ``subtype`` is one of ``classes`` (codes or names).

    Raises:
        ValueError: an unknown class, or no row left (naming the subtypes the data has).
    """
    wanted = subtype_names(classes)
    col = frame["subtype"] if "subtype" in frame.columns else pd.Series("", index=frame.index)
    kept = frame[col.isin(wanted)].reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"no image of subtype {wanted}; the data has "
                         f"{sorted(set(col) - {''}) or 'no subtypes'}")
    return kept


def held_out_groups(frame: pd.DataFrame, groups: pd.Series, ids: list[str]) -> set[str]:
    """The (linked) patient groups of the rows named by ``ids``: an id matches a row's
    ``patient_id`` (``14-16184``) or its ``slide_id`` (``16184CD``, eva's form).

    Raises:
        ValueError: naming the ids that match no image (the published split does not fit
            this data).
    """
    cols = [c for c in ("patient_id", "slide_id") if c in frame.columns]
    hit = {i: pd.Series(False, index=frame.index) for i in ids}
    for i in ids:
        for c in cols:
            hit[i] |= frame[c].astype(str).str.upper() == i.upper()
    missing = [i for i in ids if not hit[i].any()]
    if missing:
        raise ValueError(f"--test-patients: {len(missing)} id(s) match no image (patient_id or "
                         f"slide_id) of the data: {', '.join(missing)}")
    named = pd.concat(list(hit.values()), axis=1).any(axis=1)
    out = set(groups[named])
    extra = int((groups.isin(out) & ~named).sum())
    if extra:  # the published list named some slides of a patient, not all of them
        log.warning("--test-patients: %d more image(s) held out because their patient has a "
                    "listed slide (kept patient-disjoint)", extra)
    return out
