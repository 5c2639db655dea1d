"""Named pathology foundation models (``--model uni``): where their weights are, the timm
constructor arguments they need, how to turn their tokens into one embedding, and their terms.

Every value below was looked up, not remembered; the source of each row is in the comment above
it. ``None`` means *unverified*: histoclass then takes the value from the model's own
``config.json`` on the hub (architecture, normalisation) instead of guessing it. Licences and
gating are the publishers' terms as reported by the cited sources: read the model card before use.

Embedding rules (:func:`embed`): ``cls`` is timm's own pooled output (the class token for these
ViTs); ``cls+mean_patch`` concatenates the class token with the mean of the patch tokens, the
register tokens excluded (timm's ``num_prefix_tokens`` counts the class and register tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
EMBEDDINGS = ("cls", "cls+mean_patch")


@dataclass(frozen=True)
class Preset:
    """One named backbone. ``timm`` is the architecture (``None``: read from the hub's
    config.json); ``args`` plain-typed constructor arguments (class names resolved by
    :mod:`histoclass.models.model_args`); ``norm`` ``(mean, std)`` or ``None`` (config.json's);
    ``loader`` ``timm`` or the library the publisher documents when it is not timm."""

    hub: str
    timm: str | None
    args: dict[str, Any] = field(default_factory=dict)
    embedding: str = "cls"
    dim: int | None = None
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    licence: str = "unverified"
    gated: str = "unverified"
    loader: str = "timm"


PRESETS: dict[str, Preset] = {
    # UNI: hf-hub:MahmoodLab/uni with init_values=1e-5, dynamic_img_size=True (model card usage,
    # as in endaaman/uni-playground a.py); vit_large_patch16_224 with the same arguments loads the
    # weights strictly (kaiko-ai/eva backbones/pathology/mahmood.py); ImageNet normalisation
    # (MianxinLiu/CryoAID FM_code/models/uni.py); licence CC-BY-NC-ND-4.0, gated (lazyslide UNI
    # model class; trident README encoder table).
    "uni": Preset("MahmoodLab/UNI", "vit_large_patch16_224",
                  {"init_values": 1e-5, "dynamic_img_size": True}, "cls", 1024, IMAGENET,
                  "CC-BY-NC-ND-4.0", "gated"),
    # UNI2-h: timm_kwargs of the model card (kaiko-ai/eva mahmood.py mahmood_uni2_h; CryoAID
    # models/uni2.py, which names vit_giant_patch14_224 and ImageNet normalisation); licence
    # CC-BY-NC-ND-4.0 (encoder licence registry in a public repo), gated (trident table).
    "uni2-h": Preset("MahmoodLab/UNI2-h", "vit_giant_patch14_224",
                     {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                      "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                      "no_embed_class": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU",
                      "reg_tokens": 8, "dynamic_img_size": True}, "cls", 1536, IMAGENET,
                     "CC-BY-NC-ND-4.0", "gated"),
    # Virchow2: hf-hub:paige-ai/Virchow2 with mlp_layer=SwiGLUPacked, act_layer=SiLU (eva
    # paige.py; many users); embedding CLS + mean of the patch tokens after the 4 register
    # tokens, 2560-d (eva ExtractCLSFeatures(num_register_tokens=4); output[:, 5:] in
    # hcc_sempath's test); architecture and normalisation from config.json (not verified
    # here); licence CC-BY-NC-ND-4.0 (licence registry), gated (trident table).
    "virchow2": Preset("paige-ai/Virchow2", None,
                       {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, "cls+mean_patch",
                       2560, None, "CC-BY-NC-ND-4.0", "gated"),
    # H-optimus-0: init_values=1e-5, dynamic_img_size=False (model card usage quoted by several
    # repos; eva bioptimus.py); its own mean/std (several repos, identical values); CLS
    # embedding, 1536-d; licence Apache-2.0 (licence registry: one secondary source); gated,
    # approved automatically (a public project README: "gated=auto").
    "h-optimus-0": Preset("bioptimus/H-optimus-0", None,
                          {"init_values": 1e-5, "dynamic_img_size": False}, "cls", 1536,
                          HOPTIMUS, "Apache-2.0", "gated (automatic approval)"),
    # H0-mini: mlp_layer=SwiGLUPacked, act_layer=SiLU; output 1 x 261 x 768 and the card's
    # embedding: CLS concatenated with the mean of output[:, num_prefix_tokens:], 1536-d (model
    # card example script); normalisation: sources disagree, so config.json's; licence
    # unverified; gated, approved by hand (a public project README: "gated=manual").
    "h0-mini": Preset("bioptimus/H0-mini", None,
                      {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, "cls+mean_patch", 1536,
                      None, "unverified", "gated (manual approval)"),
    # Midnight-12k: published for transformers' AutoModel, not timm (two public wrappers load it
    # with AutoModel.from_pretrained("kaiko-ai/midnight")); embedding CLS + mean patch tokens,
    # 3072-d, mean = std = 0.5 (the same wrappers; a provenance note citing the card); licence
    # MIT (two secondary sources); public (trident table).
    "midnight": Preset("kaiko-ai/midnight", None, {}, "cls+mean_patch", 3072,
                       ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "MIT", "public",
                       loader="transformers"),
}


def preset_of(name: str) -> Preset | None:
    """The preset called ``name`` (case-insensitive), or ``None``."""
    return PRESETS.get(name.lower())


def preset_table() -> list[dict[str, object]]:
    """One row per preset for ``histoclass models``."""
    return [{"name": n, "hub": p.hub,
             "timm": p.timm or ("(config.json)" if p.loader == "timm" else "-"),
             "embedding": f"{p.embedding} ({p.dim or '?'}-d)", "licence": p.licence,
             "access": p.gated, "loader": p.loader} for n, p in PRESETS.items()]


def embed(model: nn.Module, x: torch.Tensor, rule: str | None = "cls") -> torch.Tensor:
    """The embedding of images ``x`` by ``model`` under ``rule`` (a member's
    ``meta["embedding"]``; ``None``: ``cls``).

    Raises:
        ValueError: An unknown rule, or ``cls+mean_patch`` on a model without tokens.
    """
    rule = rule or "cls"
    if rule not in EMBEDDINGS:
        raise ValueError(f"unknown embedding rule {rule!r}; use one of {', '.join(EMBEDDINGS)}")
    feats = model.forward_features(x)
    if rule == "cls":
        return model.forward_head(feats, pre_logits=True)
    prefix = getattr(model, "num_prefix_tokens", None)
    if feats.ndim != 3 or not prefix:
        raise ValueError(f"embedding rule {rule!r} needs a ViT with a class token; "
                         f"{type(model).__name__} has none")
    return torch.cat([feats[:, 0], feats[:, prefix:].mean(1)], dim=-1)
