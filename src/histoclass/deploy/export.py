"""Export a member or an ensemble to ONNX (optionally INT8) with its preprocessing embedded.

The graph takes one input, ``image``: the decoded, resized image as uint8 ``[N, H, W, 3]`` (RGB,
``H, W`` = the largest member's input size, dynamic batch axis ``N``); the normalisation (mean,
std) and the NHWC -> NCHW transpose run inside the graph, so a caller hands ONNX Runtime the bytes
it decoded, with no float copy made in Python (a quarter of the bytes, and ORT's kernels do the
arithmetic). ``uint8_input=False`` writes the older float32 ``[N, 3, H, W]`` normalised input,
which :class:`~histoclass.deploy.runtime.OnnxClassifier` still reads. Outputs are
**probabilities** (softmax inside the graph, so callers never re-implement the combining rule):

* ``probs`` ``[N, C]``: the model's (ensemble's) class probabilities;
* ensembles add ``members`` ``[N, M, C]`` (each member's softmax) and ``disagreement`` ``[N]``.

Ensembles (``soft``/``weighted``/``hard``/``stack``/``concat``) become one graph: members whose
input size differs from the largest are fed ``F.interpolate`` of the input (bilinear,
no antialias) and members with another mean/std get the input re-normalised. In PyTorch each
member resizes the original image itself, so for mixed-size ensembles ONNX and PyTorch agree
only approximately (a resize of a resize); same-size ensembles agree to float precision. All
members must share one stain normaliser (or none): it runs before the graph, on the decoded
image. Test-time augmentation is not exported.

Metadata (``metadata_props``): ``histoclass`` (format tag), ``preprocess``, ``classes``,
``stain`` (JSON; ``null`` without), ``task``, ``arch``, ``method``, ``members`` (JSON names),
``refer_threshold``, ``output`` (``probabilities``), ``input`` (``uint8-nhwc`` or
``float32-nchw-normalised``), ``quantization``, ``histoclass_version``, ``input_mode`` (the
member's checkpoint ``input``, :class:`~histoclass.data.field_tiles.InputMode`, plus ``reduce``:
``mean-prob`` or, for a linear head, ``mean-logit``), ``temperature`` (the one in the
probabilities: a member's divides its logits; an ensemble's own rescales the combined output as
``softmax(log(p) / T)``), ``temperature_in_graph`` (false only for a tiles member, whose
temperature the runtime applies after the tile average) and ``confidence_threshold`` (the
``--refer-risk`` threshold, ``null`` without one).

A ``tiles`` member exports as its network on one tile (``H, W`` = the tile size): the runtime
cuts each image into the same tiles and averages the graph's outputs per image exactly as
PyTorch does (:mod:`histoclass.models.tiles`). Ensembles with a tiles member are not exported
(their combining rule would have to run after the per-image average, outside the graph).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoclass._version import __version__
from histoclass.data.files import write_error
from histoclass.deploy.graph import set_metadata
from histoclass.models.ensemble import Ensemble, load_model_file
from histoclass.models.tiles import head_of, input_of
from histoclass.models.voting import disagreement, fuse, temper

log = logging.getLogger(__name__)
FORMAT = "histoclass-onnx"


class ExportModule(nn.Module):
    """A member or an ensemble as one module: image in, probabilities out.

    Args:
        ens: A loaded member or ensemble (:func:`histoclass.models.load_model_file`).
        uint8_input: Take uint8 ``NHWC`` and normalise inside; else normalised float ``NCHW``.
    """

    def __init__(self, ens: Ensemble, uint8_input: bool = True) -> None:
        super().__init__()
        members = list(ens.members)
        if len(members) > 1 and any(input_of(m.meta).tiles for m in members):
            raise ValueError("cannot export an ensemble with a tiles member (--input tiles): "
                             "its tiles are averaged per image before the combining rule, "
                             "outside one graph; export the members one by one, or use the "
                             "PyTorch ensemble")
        stains = {json.dumps(m.meta.get("stain"), sort_keys=True) for m in members}
        if len(stains) > 1:
            raise ValueError("cannot export an ensemble whose members use different stain "
                             "normalisers: one graph input cannot carry two stain spaces")
        main = max(members, key=lambda m: m.preprocess.input_size[0] * m.preprocess.input_size[1])
        self.preprocess = main.preprocess
        self.method = ens.method
        self.models = nn.ModuleList(m.model for m in members)
        self.sizes = [tuple(m.preprocess.input_size) for m in members]
        mean0, std0 = torch.tensor(main.preprocess.mean), torch.tensor(main.preprocess.std)
        self.uint8_input = uint8_input
        # (v / 255 - mean) / std as one multiply-add: Preprocess.normalize's result to ~1e-7.
        self.register_buffer("in_scale", (1.0 / (255.0 * std0)).view(1, 3, 1, 1))
        self.register_buffer("in_shift", (mean0 / std0).view(1, 3, 1, 1))
        self.renorm: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for i, m in enumerate(members):
            mean, std = torch.tensor(m.preprocess.mean), torch.tensor(m.preprocess.std)
            if torch.equal(mean, mean0) and torch.equal(std, std0):
                self.renorm.append(None)
                continue
            # x0 = (v - mean0) / std0  ->  x = (v - mean) / std = x0 * std0/std + (mean0-mean)/std
            self.register_buffer(f"scale{i}", (std0 / std).view(1, 3, 1, 1))
            self.register_buffer(f"shift{i}", ((mean0 - mean) / std).view(1, 3, 1, 1))
            self.renorm.append((f"scale{i}", f"shift{i}"))
        self.weights, self.stack = ens.weights, ens.stack
        self.head = ens.head if self.method == "concat" else None
        # Each member's calibration temperature divides its logits inside the graph, as in
        # Ensemble.forward; a tiles member's is applied by the runtime after the tile average.
        self.temperatures = [1.0 if input_of(m.meta).tiles else
                             float(m.meta.get("temperature", 1.0)) for m in members]
        self.ensemble_t = ens.own_temperature  # then the ensemble's own, on the combined output

    def forward(self, x: torch.Tensor) -> Any:
        if self.uint8_input:
            x = x.permute(0, 3, 1, 2).float() * self.in_scale - self.in_shift
        probs, feats = [], []
        for i, model in enumerate(self.models):
            xi = x
            if self.renorm[i] is not None:
                xi = xi * getattr(self, self.renorm[i][0]) + getattr(self, self.renorm[i][1])
            if tuple(xi.shape[-2:]) != self.sizes[i]:
                xi = nn.functional.interpolate(xi, size=self.sizes[i], mode="bilinear",
                                               align_corners=False)
            if self.head is not None:
                f = model.forward_head(model.forward_features(xi), pre_logits=True)
                feats.append(f)
                logits = model.get_classifier()(f)
            else:
                logits = model(xi)
            t = self.temperatures[i]
            probs.append((logits.float() / t if t != 1.0 else logits.float()).softmax(-1))
        if self.method == "single":
            return probs[0]
        members = torch.stack(probs)
        proba, pred = fuse(self.method, members, feats, weights=self.weights, stack=self.stack,
                           head=self.head)
        return (temper(proba, self.ensemble_t), members.transpose(0, 1),
                disagreement(self.method, members, pred))


def metadata_of(ens: Ensemble, module: ExportModule, quantization: str = "none") -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file (all values are strings)."""
    first = ens.members[0].meta
    return {
        "histoclass": FORMAT, "preprocess": json.dumps(module.preprocess.to_dict()),
        "classes": json.dumps(list(ens.classes)), "task": ens.task,
        "stain": json.dumps(first.get("stain")),
        "arch": first.get("arch", "") if len(ens.members) == 1 else "ensemble",
        "method": ens.method, "members": json.dumps([m.name for m in ens.members]),
        "refer_threshold": str(float(ens.refer_threshold)), "output": "probabilities",
        "input": "uint8-nhwc" if module.uint8_input else "float32-nchw-normalised",
        "quantization": quantization, "histoclass_version": __version__,
        "resolution": json.dumps(_resolution(ens)),
        "input_mode": json.dumps({**input_of(first).to_dict(), "reduce": "mean-logit"
                                  if head_of(first) == "linear" else "mean-prob"}),
        # already in the graph's probabilities, except a tiles member's (the runtime's)
        "temperature": json.dumps(ens.temperature),
        "temperature_in_graph": json.dumps(not input_of(first).tiles),
        "confidence_threshold": json.dumps(ens.confidence_threshold),
    }


def _resolution(ens: Ensemble) -> dict | None:
    """The members' shared training resolution for the metadata; ``None`` (with a warning)
    when unknown or when members disagree (the export still serves fields of view)."""
    try:
        r = ens.resolution
    except ValueError as exc:
        log.warning("%s; the export records no resolution", exc)
        return None
    return None if r is None else r.to_dict()


def export_module(module: nn.Module, x: torch.Tensor, out: Path, outputs: list[str]) -> None:
    """``torch.onnx.export`` (torch.export-based) with a dynamic batch axis, quietly."""
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        torch.onnx.export(module, (x,), str(out), input_names=["image"], output_names=outputs,
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)


def export_onnx(model_path: str | Path, out: str | Path, *, int8: bool = False,
                calibration: Sequence[str | Path] | None = None,
                uint8_input: bool = True) -> Path:
    """Export a model file (member or ensemble) to ONNX; ``int8`` also quantises it.

    Args:
        model_path: Member checkpoint or ensemble file.
        out: The ``.onnx`` file to write (with ``int8``, the INT8 model; the FP32 one is
            written beside it as ``<stem>.fp32.onnx``).
        int8: Static QDQ INT8 quantisation calibrated on ``calibration`` images.
        calibration: Image files for calibration (default: the bundled H&E sample).
        uint8_input: Decoded uint8 ``NHWC`` input with the normalisation in the graph (the
            default); ``False`` for a normalised float32 ``NCHW`` input (the bare network, as
            raw-ORT baselines and callers with their own tensors want).
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"output {out} must end with .onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    ens = load_model_file(model_path)
    module = ExportModule(ens, uint8_input).eval()
    h, w = module.preprocess.input_size
    x = (torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8) if uint8_input
         else torch.randn(2, 3, h, w))
    names = ["probs"] if ens.method == "single" else ["probs", "members", "disagreement"]
    fp32 = out.with_name(out.stem + ".fp32.onnx") if int8 else out
    # Written under a temporary name and renamed: a failure (full disk, a kill) never leaves a
    # half-written .onnx under the final name, and the temporary file is removed.
    tmp = fp32.with_name(f".{fp32.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad():
            export_module(module, x, tmp, names)
        set_metadata(tmp, metadata_of(ens, module))
        os.replace(tmp, fp32)
        log.info("exported %s -> %s", model_path, fp32)
        if int8:
            from histoclass.deploy.quantize import quantize_static_int8

            quantize_static_int8(fp32, tmp, calibration)
            os.replace(tmp, out)
    except OSError as exc:
        raise write_error(out, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def parity(model_path: str | Path, onnx_path: str | Path, images: Sequence[str | Path]
           ) -> tuple[float, int]:
    """The largest ``|p_onnx - p_torch|`` over ``images`` and classes, and on how many images
    the two predict the same class (both run through the same preparation)."""
    import numpy as np

    from histoclass.data.images import load_rgb
    from histoclass.deploy.runtime import OnnxClassifier

    decoded = [load_rgb(p) for p in images]
    ref = load_model_file(model_path).predict_images(decoded).proba
    got = OnnxClassifier(onnx_path).predict_images(decoded).proba
    return float(np.abs(ref - got).max()), int((ref.argmax(1) == got.argmax(1)).sum())
