"""Batches of native-resolution tiles (``--input tiles``) and the one reduction of their outputs.

A tiles member's preparation gives each image a ``Tx3xSxS`` stack (:mod:`histoclass.data.
field_tiles`); a batch of images becomes one :class:`Tiles` (all tiles concatenated, and how many
belong to each image), so the network runs every tile of the batch in one pass.

The one row per image (:func:`reduce_logits`) is what the member's logits mean for the image:

* fine-tuned head (the default): the mean of the tiles' softmax probabilities, returned as its
  log, ``log(mean p)``. ``softmax(log(mean p)) == mean p``, so everything downstream (softmax at
  predict time, temperature scaling ``softmax(z / T)``, ensembles) treats it as logits;
* linear head (``meta["head"] == "linear"``): the mean of the tiles' logits (a linear probe's
  logits average like its features).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from histoclass.data.field_tiles import InputMode

# Tiles per forward pass: 16 BreakHis fields are 192 tiles; bounded so a large field or batch
# never needs all its activations at once.
CHUNK = 256


class Tiles(NamedTuple):
    """The tiles of N images: ``x`` ``[sum T, 3, S, S]``, ``counts`` ``[N]`` tiles per image."""

    x: torch.Tensor
    counts: torch.Tensor

    def to(self, device: torch.device | str, **kwargs) -> Tiles:
        """Both tensors on ``device`` (``kwargs`` go to the images' ``Tensor.to``)."""
        return Tiles(self.x.to(device, **kwargs), self.counts.to(device))


def input_of(meta: dict) -> InputMode:
    """A member checkpoint's input mode (``resize`` when the file predates ``meta["input"]``)."""
    return InputMode.from_dict(meta.get("input"))


def head_of(meta: dict) -> str:
    """``linear`` for a linear-probe member, else ``finetune``."""
    return "linear" if meta.get("head") == "linear" else "finetune"


def collate_tiles(stacks: Sequence[torch.Tensor]) -> Tiles:
    """Per-image ``Tx3xSxS`` stacks -> one :class:`Tiles`."""
    return Tiles(torch.cat(list(stacks)), torch.tensor([len(s) for s in stacks]))


def segment_mean(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[sum T, ...]`` rows -> ``[N, ...]`` means over each image's consecutive rows."""
    index = torch.repeat_interleave(torch.arange(len(counts), device=values.device),
                                    counts.to(values.device))
    out = torch.zeros((len(counts), *values.shape[1:]), dtype=values.dtype, device=values.device)
    out.index_add_(0, index, values)
    return out / counts.to(values.device, values.dtype).view(-1, *[1] * (values.dim() - 1))


def reduce_logits(logits: torch.Tensor, counts: torch.Tensor, head: str = "finetune"
                  ) -> torch.Tensor:
    """Tile logits ``[sum T, C]`` -> image logits ``[N, C]`` (see the module docstring)."""
    logits = logits.float()
    if head == "linear":
        return segment_mean(logits, counts)
    return segment_mean(logits.softmax(-1), counts).clamp_min(1e-30).log()


def run_tiles(model: nn.Module, x: torch.Tensor, features: bool = False
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Pooled features (when asked) and logits of every tile, :data:`CHUNK` tiles a pass."""
    from histoclass.models.concat import features_and_logits

    feats, logits = [], []
    for part in x.split(CHUNK):
        f, z = features_and_logits(model, part, features)
        feats.append(f)
        logits.append(z)
    return (torch.cat(feats) if features else None), torch.cat(logits)


def member_logits(model: nn.Module, x: torch.Tensor | Tiles, features: bool = False,
                  head: str = "finetune") -> tuple[torch.Tensor | None, torch.Tensor]:
    """A member's features and logits per image, for a plain batch or a :class:`Tiles`
    (features: the tiles' mean)."""
    from histoclass.models.concat import features_and_logits

    if not isinstance(x, Tiles):
        return features_and_logits(model, x, features)
    f, z = run_tiles(model, x.x, features)
    return (None if f is None else segment_mean(f.float(), x.counts)), \
        reduce_logits(z, x.counts, head)


def views(x: torch.Tensor | Tiles, tta: bool) -> list[torch.Tensor | Tiles]:
    """The 8 dihedral views (``tta``) of a batch or of every tile, else the batch itself."""
    from histoclass.models.voting import dihedral

    if not tta:
        return [x]
    if isinstance(x, Tiles):
        return [Tiles(v, x.counts) for v in dihedral(x.x)]
    return dihedral(x)
