"""Ensemble members: the study's short names over timm architectures, the one :class:`Member`
type of histoclass and its loader, and how the members of one ensemble are named.

timm is the registry: a short name is only an alias for a timm name with a pretrained tag, and
any other timm name (``efficientnet_lite0``, ``convnext_tiny.fb_in1k``...) works as well.
Kalati et al. fine-tuned the Keras ImageNet-1k weights, whose timm ports carry the ``tf_`` prefix
and the ``.in1k`` tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from histoclass.data.transforms import Preprocess
from histoclass.models.checkpoint import load_checkpoint, model_from, preprocess_of, stain_of
from histoclass.models.classifier import StainFn

MEMBERS: dict[str, str] = {
    "v1-b0": "tf_efficientnet_b0.in1k",
    "v1-b1": "tf_efficientnet_b1.in1k",
    "v1-b2": "tf_efficientnet_b2.in1k",
    "v1-b3": "tf_efficientnet_b3.in1k",
    "v1-b4": "tf_efficientnet_b4.in1k",
    "v2-b0": "tf_efficientnetv2_b0.in1k",
    "v2-b1": "tf_efficientnetv2_b1.in1k",
    "v2-b2": "tf_efficientnetv2_b2.in1k",
    "v2-b3": "tf_efficientnetv2_b3.in1k",
    "v2-s": "tf_efficientnetv2_s.in1k",
}
V1_FAMILY = ("v1-b0", "v1-b1", "v1-b2", "v1-b3", "v1-b4")
V2_FAMILY = ("v2-b0", "v2-b1", "v2-b2", "v2-b3", "v2-s")
# Named groups of members (``histoclass ensemble --preset``, ``members: v1`` in run configs).
FAMILIES: dict[str, tuple[str, ...]] = {"v1": V1_FAMILY, "v2": V2_FAMILY,
                                        "all": V1_FAMILY + V2_FAMILY}


def resolve_arch(name: str) -> str:
    """Map a short member name or a timm name to a timm name (with pretrained tag if known).

    Raises:
        ValueError: ``name`` is neither a member nor a timm architecture; the message lists the
            members and close timm names.
    """
    import timm

    if name in MEMBERS:
        return MEMBERS[name]
    base = name.split(".", 1)[0]
    if timm.is_model(base):
        return name
    close = timm.list_models(f"*{base.replace('-', '_')}*")[:8]
    raise ValueError(
        f"unknown model {name!r}; use a member ({', '.join(MEMBERS)}) or a timm name"
        + (f" such as {', '.join(close)}" if close else "")
    )


class Member(NamedTuple):
    """One network with what it needs to read an image: the one member type of histoclass."""

    name: str
    model: nn.Module
    meta: dict[str, Any]
    preprocess: Preprocess
    stain: StainFn | None  # the fitted normaliser it was trained with


def load_member(path: str | Path, name: str | None = None, device: str | torch.device = "cpu",
                checkpoint: dict[str, Any] | None = None) -> Member:
    """A member checkpoint as a :class:`Member` (named after its ``arch`` by default);
    ``checkpoint`` is the file's checked content if the caller has already read it."""
    model, meta = (load_checkpoint(path, device) if checkpoint is None
                   else model_from(checkpoint, path, device))
    return Member(name or meta["arch"], model, meta, preprocess_of(meta), stain_of(meta, path))


def member_names(paths: Sequence[str | Path], archs: Sequence[str]) -> list[str]:
    """Names for the members of one ensemble: their ``arch``; a repeated arch gets its run
    folder (``runs/<run>/best.pt``) or file stem appended (``v2-b0@fold1``)."""
    out: list[str] = []
    for p, a in zip(paths, archs, strict=True):
        p = Path(p)
        where = p.parent.name if p.stem in ("best", "last") else p.stem
        name = a if list(archs).count(a) == 1 else f"{a}@{where}"
        while name in out:
            name += "+"
        out.append(name)
    return out


def member_table() -> list[dict[str, object]]:
    """One row per member: name, timm name, parameters (binary head), input size."""
    import timm
    import torch

    rows = []
    for short, tag in MEMBERS.items():
        with torch.device("meta"):  # no memory, no weights: only shapes are needed here
            model = timm.create_model(tag, pretrained=False, num_classes=2)
        cfg = timm.data.resolve_model_data_config(model)
        rows.append({
            "name": short, "timm": tag,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "input_size": cfg["input_size"][1], "pretrained": tag.split(".", 1)[1],
        })
    return rows
