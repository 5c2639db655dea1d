"""Grad-CAM for vision transformers: their layers output tokens, not feature maps.

``grad-cam`` handles transformers through a ``reshape_transform`` that turns a ``B x N x C``
token tensor into a ``B x C x h x w`` map (its documentation's ViT tutorial). For timm ViTs the
first ``model.num_prefix_tokens`` tokens are the class and register tokens, which have no place
on the image grid: they are dropped, and the patch tokens are laid out on the patch grid of the
actual input (``dynamic_img_size`` models accept other sizes than the training one).

The default target layer is ``blocks[-1].norm1``, the layer norm in front of the last block's
attention (``grad-cam``'s ViT example): the last layer whose patch tokens still matter to the
output. Layers after the last attention (``norm``, ``fc_norm``) only see the class token on its
way to the head, so their patch-token gradients are zero and the map would be empty.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def is_token_model(model: nn.Module) -> bool:
    """A timm transformer whose blocks output ``B x N x C`` tokens (ViT, DeiT, EVA...)."""
    return (getattr(model, "num_prefix_tokens", None) is not None
            and hasattr(model, "patch_embed") and hasattr(model, "blocks"))


def default_token_layer(model: nn.Module) -> str | None:
    """``blocks.<last>.norm1`` when the model has it, else ``None``."""
    if not is_token_model(model) or not len(model.blocks):
        return None
    name = f"blocks.{len(model.blocks) - 1}.norm1"
    return name if name in dict(model.named_modules()) else None


def token_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The patch grid ``(rows, cols)`` a ``height x width`` input makes."""
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        return tuple(pe.dynamic_feat_size((height, width)))
    return tuple(pe.grid_size)


def token_reshape(model: nn.Module, x: torch.Tensor
                  ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``grad-cam``'s ``reshape_transform`` for ``model`` on input ``x``, or ``None`` for a
    model whose layers already output maps (CNNs).

    The returned function leaves 4-D tensors alone, so a CNN-like layer picked by ``--layer``
    inside a hybrid model still works.
    """
    if not is_token_model(model):
        return None
    rows, cols = token_grid(model, int(x.shape[-2]), int(x.shape[-1]))
    prefix = int(model.num_prefix_tokens)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 3:
            return t
        patches = t[:, prefix:, :]
        if patches.shape[1] != rows * cols:
            raise ValueError(f"{type(model).__name__}: a layer output of {t.shape[1]} tokens "
                             f"does not hold {prefix} prefix + {rows}x{cols} patch tokens; "
                             "choose a transformer block layer (--layer list shows them)")
        return patches.reshape(t.shape[0], rows, cols, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


def token_candidates(model: nn.Module, n: int = 10) -> list[str]:
    """The ``norm1`` layers of the last ``n`` blocks, last first: CAM layers for a ViT."""
    modules = dict(model.named_modules())
    names = [f"blocks.{i}.norm1" for i in range(len(model.blocks))]
    return [name for name in reversed(names) if name in modules][:n]
