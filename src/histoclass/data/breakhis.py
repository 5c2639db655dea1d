"""BreakHis file-name parsing and the dataset's label vocabulary.

A BreakHis file name such as ``SOB_B_A-14-22549AB-40-001.png`` encodes the biopsy procedure
(``SOB``), the class (``B`` benign / ``M`` malignant), the tumour subtype (``A``), the year
(``14``), the slide id (``22549AB``), the magnification (``40``) and a sequence number (``001``).

Patient identity: BreakHis gives no patient column, only slide ids. Slides cut from one patient
share the numeric stem and differ by a letter suffix (``22549AB``, ``22549CD``, ``22549G``), and
patient ``14-13412`` appears under both ductal and lobular carcinoma. We therefore define
``patient_id = "<year>-<numeric stem>"`` (e.g. ``14-22549``): it ignores the suffix and the
subtype, so every image of one patient lands in the same split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LABELS: tuple[str, ...] = ("benign", "malignant")

# Subtype codes in the order BreakHis lists them (4 benign, then 4 malignant).
SUBTYPE_CODES: dict[str, str] = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
SUBTYPES: tuple[str, ...] = tuple(SUBTYPE_CODES.values())
SUBTYPE_LABEL: dict[str, str] = {
    name: ("benign" if i < 4 else "malignant") for i, name in enumerate(SUBTYPES)
}
MAGNIFICATIONS: tuple[str, ...] = ("40X", "100X", "200X", "400X")

_NAME = re.compile(
    r"^(?P<procedure>[A-Z]+)_(?P<cls>[BM])_(?P<code>A|F|PT|TA|DC|LC|MC|PC)-"
    r"(?P<year>\d{2})-(?P<slide>(?P<stem>\d+)[A-Z]*)-(?P<mag>40|100|200|400)-(?P<seq>\d+)$",
    re.IGNORECASE,
)

# A BreakHis slide id inside another name: the crops, tiles and re-exports people publish
# (``SOB_B_A_14-22549AB_0.png``, ``SOB_M_DC-14-2523-40-010_crop3.png``, ``SOB_M_DC_14-12312_2``).
# The slide id must end the name, or be followed by ``_``/``.``/a space/``(``, or by a full
# ``-<mag>-<seq>``: ``SOB_B_A-14-22549AB-50-001`` (no such magnification) stays unparsed.
_DERIVED = re.compile(
    r"(?:^|(?<=[^A-Za-z0-9]))(?P<procedure>[A-Z]+)_(?P<cls>[BM])_"
    r"(?P<code>A|F|PT|TA|DC|LC|MC|PC)[-_](?P<year>\d{2})-(?P<slide>(?P<stem>\d+)[A-Z]*)"
    r"(?:-(?P<mag>40|100|200|400)-(?P<seq>\d+)(?=$|[^0-9])|(?=$|[_.\s(]))",
    re.IGNORECASE,
)
# Names that look like BreakHis files: when some of these do not parse, a split warns.
LOOKS_BREAKHIS = re.compile(r"(?:^|[^A-Za-z0-9])SOB_", re.IGNORECASE)


@dataclass(frozen=True)
class BreakHisName:
    """The fields encoded in one BreakHis file name."""

    procedure: str
    label: str
    subtype: str
    subtype_code: str
    year: str
    slide_id: str
    patient_id: str
    magnification: str  # "" when a derived name does not carry it
    sequence: int  # 0 when a derived name does not carry it
    derived: bool = False  # parsed from a crop/tile/re-export name, not an original file name


def parse_name(name: str) -> BreakHisName | None:
    """Parse a BreakHis file name (with or without folder and extension).

    Args:
        name: File name or path, e.g. ``SOB_B_A-14-22549AB-40-001.png``.

    A name that is not a BreakHis file name but holds a BreakHis slide id (a crop or tile such
    as ``SOB_M_DC-14-2523-40-010_crop3.png`` or ``SOB_B_A_14-22549AB_0.png``) gives the same
    class, subtype and patient, with ``derived=True`` (magnification ``""`` if absent).

    Returns:
        The parsed fields, or ``None`` when the name holds no BreakHis slide id.

    Raises:
        ValueError: The class letter contradicts the subtype (``SOB_B_DC-...``): such a file is
            mislabelled and must not be trained on silently.
    """
    stem = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    m = _NAME.match(stem)
    derived = m is None
    if m is None:
        m = _DERIVED.search(stem)
    if m is None:
        return None
    code = m["code"].upper()
    subtype = SUBTYPE_CODES[code]
    label = "benign" if m["cls"].upper() == "B" else "malignant"
    if SUBTYPE_LABEL[subtype] != label:
        raise ValueError(
            f"{name!r}: class letter {m['cls']!r} contradicts subtype {code!r} "
            f"({subtype} is {SUBTYPE_LABEL[subtype]})"
        )
    return BreakHisName(
        procedure=m["procedure"].upper(),
        label=label,
        subtype=subtype,
        subtype_code=code,
        year=m["year"],
        slide_id=m["slide"].upper(),
        patient_id=f"{m['year']}-{m['stem']}",
        magnification=f"{m['mag']}X" if m["mag"] else "",
        sequence=int(m["seq"]) if m["seq"] else 0,
        derived=derived,
    )


def label_from_folder(part: str) -> tuple[str, str] | None:
    """Map a folder name to ``(label, subtype)``; subtype is ``""`` for plain class folders.

    Accepts ``benign``/``malignant``, subtype names (``ductal_carcinoma``, ``ductal carcinoma``)
    and BreakHis codes (``DC``), case-insensitively.
    """
    key = part.strip().lower().replace(" ", "_").replace("-", "_")
    if key in LABELS:
        return key, ""
    if key in SUBTYPE_LABEL:
        return SUBTYPE_LABEL[key], key
    code = part.strip().upper()
    if code in SUBTYPE_CODES:
        subtype = SUBTYPE_CODES[code]
        return SUBTYPE_LABEL[subtype], subtype
    return None


def describe_path(path: str | Path, root: str | Path | None = None) -> dict[str, str] | None:
    """What an image's location says about it: ``label``, ``subtype`` and, from a BreakHis
    name, ``patient_id``, ``slide_id`` and ``magnification``; else the class folders between
    ``root`` and the file (without ``root``: its parent folder); ``None`` when neither says.

    Raises:
        ValueError: A BreakHis name whose class letter contradicts its subtype.
    """
    path = Path(path)
    parsed = parse_name(path.name)
    if parsed is not None:
        return {"label": parsed.label, "subtype": parsed.subtype,
                "patient_id": parsed.patient_id, "slide_id": parsed.slide_id,
                "magnification": parsed.magnification}
    parts = path.relative_to(root).parts[:-1] if root is not None else path.parts[-2:-1]
    for part in reversed(parts):
        found = label_from_folder(part)
        if found is not None:
            return {"label": found[0], "subtype": found[1]}
    return None


# Microns per pixel of BreakHis images, derived from the acquisition that Spanhol et al. 2016
# describe (IEEE TBME 63(7):1455-1462, "A Dataset for Breast Cancer Histopathological Image
# Classification"): an Olympus BX-50 microscope with a 3.3x relay lens and a Samsung SCC-131AN
# camera whose 1/3" CCD has 6.5 x 6.25 um pixels (752 x 582); the magnifications 40X, 100X,
# 200X and 400X are the objectives 4x, 10x, 20x and 40x with a 10x ocular. On the specimen one
# camera pixel therefore spans 6.5 / (3.3 x objective) um horizontally (vertically 6.25 / ...,
# 4% less; we use the horizontal value). This assumes the 700 x 460 images are crops of the
# sensor grid, not resampled (the paper gives no resampling step). BreakHis "40X" is the eyepiece
# magnification: ~0.49 um/px is a scanner's "20x" level, not its "40x" (~0.25 um/px).
CAMERA_PIXEL_UM = 6.5
RELAY_LENS = 3.3
OBJECTIVE: dict[str, int] = {"40X": 4, "100X": 10, "200X": 20, "400X": 40}
MPP: dict[str, float] = {mag: round(CAMERA_PIXEL_UM / (RELAY_LENS * obj), 4)
                         for mag, obj in OBJECTIVE.items()}
