"""Synthetic BreakHis-named images where benign and malignant differ clearly in colour/texture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

CODES = {"benign": ("B", "A", "adenosis"), "malignant": ("M", "DC", "ductal_carcinoma")}


def synthetic_manifest(root: Path, n_train: int = 16, n_val: int = 8, n_test: int = 4,
                       size: tuple[int, int] = (96, 72), seed: int = 0) -> Path:
    """Write PNGs and a manifest (train/val/test rows) under ``root``; returns the manifest path.

    Benign: smooth pink. Malignant: dark purple with speckle. Each split has its own patients.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            label = "benign" if i % 2 == 0 else "malignant"
            cls, code, subtype = CODES[label]
            patient = f"{ {'train': 1, 'val': 2, 'test': 3}[split] }{i % 2}{label[0] == 'b':d}"
            name = f"SOB_{cls}_{code}-14-{patient}-40-{i:03d}.png"
            w, h = size
            if label == "benign":
                base = np.array([235, 170, 200]) + rng.normal(0, 4, (h, w, 3))
            else:
                base = np.array([90, 40, 130]) + rng.normal(0, 40, (h, w, 3))
            img = np.clip(base, 0, 255).astype(np.uint8)
            path = root / "images" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            rows.append({"path": str(path), "label": label, "subtype": subtype,
                         "patient_id": f"14-{patient}", "magnification": "40X",
                         "split": split})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads cost 10-30x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
