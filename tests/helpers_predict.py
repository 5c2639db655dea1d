"""Shared builders for the predict/ensemble tests: tiny real members and fixed-output members."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from histoclass.data import make_split, scan, write_manifest
from histoclass.data.dataset import ManifestDataset
from histoclass.data.manifest import sample_path, select
from histoclass.data.transforms import Preprocess
from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint
from histoclass.models.ensemble import Member

SIZE = 64


def sample_manifest(folder: Path) -> Path:
    """A patient-disjoint manifest of the bundled UCSB sample (2 val and 2 test patients)."""
    frame = make_split(scan(sample_path("ucsb")).frame, "patient", val=0.3, test=0.3, seed=0)
    return write_manifest(frame, folder / "manifest.csv")


def train_member(manifest: Path, out: Path, seed: int, steps: int = 4) -> Path:
    """A ``test_efficientnet`` at 64 px, trained a few steps so its outputs depend on the image."""
    from histoclass.data import read_manifest

    torch.manual_seed(seed)
    model = create_model("test_efficientnet", 2, pretrained=False)
    pre = model_preprocess(model, SIZE)
    data = ManifestDataset(select(read_manifest(manifest), "train"), pre)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor(data.targets)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = member_meta("test_efficientnet", "test_efficientnet", ["benign", "malignant"], pre)
    return save_checkpoint(out, model.eval(), meta)


class TableLogits(nn.Module):
    """A real network with known output: row ``k`` of ``probs`` for an image whose first pixel
    holds ``k`` (so tests know every member's probabilities exactly)."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(probs, dtype=torch.float64).log().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].round().long()]


def fixed_member(name: str, probs: list[list[float]],
                 classes: tuple[str, ...] = ("benign", "malignant")) -> Member:
    pre = Preprocess((2, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    meta = {"arch": name, "classes": list(classes), "task": "binary", "stain": None}
    return Member(name, TableLogits(probs).eval(), meta, pre, None)


def index_batch(n: int) -> torch.Tensor:
    """Images whose first pixel is their row number (inputs for :class:`TableLogits`)."""
    x = torch.zeros(n, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return x


def make_member(path: Path, size: int = 64, seed: int = 0, bias: list[float] | None = None,
                zero: bool = True) -> Path:
    """A tiny checkpoint; ``bias`` sets the head's bias (and zeroes its weights if ``zero``)."""
    torch.manual_seed(seed)
    model = create_model("test_efficientnet", 2, pretrained=False)
    if bias is not None:
        if zero:
            model.get_classifier().weight.data.zero_()
        model.get_classifier().bias.data = torch.tensor(bias)
    meta = member_meta("test_efficientnet", "test_efficientnet", ["benign", "malignant"],
                       model_preprocess(model, size))
    return save_checkpoint(path, model, meta)
