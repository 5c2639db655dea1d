"""WSInfer's model format (``publish --format wsinfer``): its ``config.json`` next to a TorchScript
model, in ``wsinfer/`` of the published folder (the folder's own ``config.json`` is timm's).

WSInfer (0.6) reads a model with ``torch.jit.load`` only (no ONNX), so the export is a traced
:class:`~histoclass.deploy.export.ExportModule` taking normalised float ``[N, 3, H, W]``, the
output of the config's ``Resize`` -> ``ToTensor`` -> ``Normalize``. WSInfer applies a softmax
to what the model returns, so the module returns log-probabilities: ``softmax(log p) = p`` for
every combining rule. The config follows spec ``1.0`` and is checked against the JSON schema
shipped in the ``wsinfer-zoo`` package (``model-config.schema.json``).

WSInfer reads square patches of ``patch_size_pixels`` at ``spacing_um_px``; both must describe
what the network sees. For a model trained on native-resolution tiles (input mode ``tiles``)
that is the input size at the training resolution ``train_mpp``. A model trained on whole
fields squashed to its input size saw another resolution per axis, so its spacing is asked for
(``--mpp``) rather than guessed. WSInfer has no stain step: stain-normalised models are refused.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoclass.deploy.export import ExportModule
from histoclass.models.ensemble import Ensemble

SPEC = "1.0"
CONFIG, MODEL = "config.json", "torchscript_model.pt"
PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # torchvision accepts them


class LogProbs(nn.Module):
    """The export module's probabilities as log-probabilities (WSInfer softmaxes the output)."""

    def __init__(self, inner: ExportModule) -> None:
        super().__init__()
        self.inner, self.single = inner, inner.method == "single"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return torch.log(out if self.single else out[0])


def spacing(facts: dict[str, Any], mpp: float | None) -> float:
    """Microns per pixel of the network's input: ``mpp``, else ``train_mpp`` for tile models.

    Raises:
        ValueError: Neither is known, or a squashed-field model without ``mpp``.
    """
    if mpp is not None:
        if not mpp > 0:
            raise ValueError(f"--mpp {mpp}: must be > 0 microns per pixel")
        return float(mpp)
    mode, train = facts.get("input_mode"), facts.get("train_mpp")
    if mode == "tiles" and isinstance(train, int | float) and train > 0:
        return float(train)
    if mode == "resize":
        raise ValueError("--format wsinfer: this model saw whole fields squashed to its input "
                         "size, so the microns per pixel of its input differ from the images' "
                         f"({train or 'unknown'} um/px); give --mpp (the field's um/px x field "
                         "width / input width)")
    raise ValueError(f"--format wsinfer needs the resolution the model was trained at (input mode "
                     f"{mode!r}, train_mpp {train!r}); give --mpp MICRONS_PER_PIXEL")


def wsinfer_config(ens: Ensemble, module: ExportModule, mpp: float) -> dict[str, Any]:
    """WSInfer's config (spec 1.0) for the export of ``ens``."""
    pre = module.preprocess
    h, w = pre.input_size
    if h != w:
        raise ValueError(f"--format wsinfer: WSInfer reads square patches; this model's input "
                         f"is {h}x{w}")
    arch = ens.members[0].meta.get("timm_name", "") if not ens.is_ensemble else \
        f"histoclass-{ens.method}-ensemble({','.join(ens.member_names)})"
    return {
        "spec_version": SPEC, "architecture": arch, "num_classes": len(ens.classes),
        "class_names": list(ens.classes), "patch_size_pixels": int(h), "spacing_um_px": mpp,
        "transform": [
            {"name": "Resize", "arguments": {"size": [int(h), int(w)], "antialias": True,
                                             "interpolation": PIL_CODES[pre.interpolation]}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(pre.mean), "std": list(pre.std)}},
        ],
    }


def write_wsinfer(ens: Ensemble, folder: Path, mpp: float | None, facts: dict[str, Any]
                  ) -> list[Path]:
    """Write ``folder/config.json`` and ``folder/torchscript_model.pt``; returns both."""
    stained = [m.name for m in ens.members if m.meta.get("stain")]
    if stained:
        raise ValueError(f"--format wsinfer: member(s) {', '.join(stained)} use stain "
                         "normalisation, which WSInfer's transforms (Resize, ToTensor, Normalize) "
                         "cannot apply; publish without --format wsinfer")
    module = ExportModule(ens, uint8_input=False).eval()
    config = wsinfer_config(ens, module, spacing(facts, mpp))
    h, w = module.preprocess.input_size
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape tests on member and class counts, constants of this model.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch deprecates TorchScript, but it is the only format WSInfer 0.6 loads.
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        traced = torch.jit.trace(LogProbs(module).eval(), torch.randn(2, 3, h, w))
    traced.save(str(folder / MODEL))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [folder / CONFIG, folder / MODEL]
