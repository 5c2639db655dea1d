"""Shared fixtures: synthetic BreakHis-shaped trees and the location of the real images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SUBTYPE_DIR = {
    "A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
# (class letter, subtype code, year, slide): patient 14-22549 has three suffixed slides and
# patient 14-13412 appears under both ductal and lobular carcinoma, as in BreakHis.
SLIDES = [
    ("B", "A", "14", "22549AB"), ("B", "A", "14", "22549CD"), ("B", "A", "14", "22549G"),
    ("B", "F", "14", "21998CD"), ("B", "PT", "14", "29315EF"), ("B", "TA", "14", "3411F"),
    ("B", "F", "14", "25951"), ("B", "TA", "14", "16196"),
    ("M", "DC", "14", "13412"), ("M", "LC", "14", "13412"), ("M", "MC", "14", "19979"),
    ("M", "PC", "15", "190EF"), ("M", "DC", "14", "2523"), ("M", "LC", "14", "15570"),
    ("M", "MC", "14", "18842"), ("M", "PC", "14", "9146"),
]
MAGS = ("40", "100", "200", "400")


def shared_data(sub: str = "") -> Path:
    """Path under ../shared/data, skipping the test loudly when it is absent."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real images absent: {path} not found (a fresh clone has no ../shared)")
    return path


def write_image(path: Path, seed: int, size: tuple[int, int] = (46, 70)) -> Path:
    """A small random RGB PNG (content depends on ``seed`` only)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def breakhis_name(cls: str, code: str, year: str, slide: str, mag: str, seq: int) -> str:
    """A BreakHis file name, e.g. ``SOB_B_A-14-22549AB-40-001.png``."""
    return f"SOB_{cls}_{code}-{year}-{slide}-{mag}-{seq:03d}.png"


def make_official_tree(root: Path, per_mag: int = 2) -> Path:
    """The official release layout with every slide above at every magnification."""
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    seed = 0
    for cls, code, year, slide in SLIDES:
        label = "benign" if cls == "B" else "malignant"
        for mag in MAGS:
            folder = (base / label / "SOB" / SUBTYPE_DIR[code]
                      / f"SOB_{cls}_{code}_{year}-{slide}" / f"{mag}X")
            for seq in range(1, per_mag + 1):
                seed += 1
                write_image(folder / breakhis_name(cls, code, year, slide, mag, seq), seed)
    return root


@pytest.fixture
def official_tree(tmp_path: Path) -> Path:
    """Official layout plus one corrupt file and one duplicate image (another patient)."""
    root = make_official_tree(tmp_path / "data")
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    corrupt = base / "benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-009.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    src = base / "benign/SOB/fibroadenoma/SOB_B_F_14-21998CD/100X/SOB_B_F-14-21998CD-100-001.png"
    dup = base / "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/100X/SOB_M_DC-14-2523-100-009.png"
    shutil.copy(src, dup)
    return root


@pytest.fixture
def class_folder_tree(tmp_path: Path) -> Path:
    """``benign/`` and ``malignant/`` folders of BreakHis-named files, all slides, 40X and 400X."""
    root = tmp_path / "classes"
    seed = 1000
    for cls, code, year, slide in SLIDES:
        label = "benign" if cls == "B" else "malignant"
        for mag in ("40", "400"):
            seed += 1
            write_image(root / label / breakhis_name(cls, code, year, slide, mag, 1), seed)
    return root
