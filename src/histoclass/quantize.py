"""Static INT8 quantisation (QDQ) of an exported model, calibrated on real H&E images.

Dynamic quantisation only touches MatMul/Gemm weights, which are a sliver of an EfficientNet's
cost; static QDQ quantises the convolutions too (per-channel weights, uint8 activations), which
is where ONNX Runtime's VNNI kernels give the speed-up. Calibration ranges come from min/max over
the calibration images, preprocessed exactly as at inference.

EfficientNet V1/V2 use SiLU (``x * sigmoid(x)``) and squeeze-excitation (a spatial mean, two
1x1 convs, a sigmoid gate). Quantising only the convolutions leaves every activation in float,
with a dequantise/quantise pair around each one, and runs no faster than FP32. So the body is
quantised end to end: Sigmoid, Mul and Add become ORT's QLinearSigmoid/QLinearMul/QLinearAdd,
and the squeeze-excitation means (``ReduceMean`` over H, W, as the exporter writes them) are
rewritten to the equivalent ``GlobalAveragePool``, which has an int8 kernel. What stays float:
the input normalisation and each member's stem conv (they see the image itself), and everything
from the classifier on (logits, softmax, the ensemble rule: probabilities must not move in
8-bit steps).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def default_calibration() -> list[Path]:
    """The bundled H&E sample (BreakHis and UCSB images)."""
    from histoclass.data.images import IMAGE_SUFFIXES
    from histoclass.data.manifest import sample_path

    return sorted(p for p in sample_path().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over image files, one per call."""

    def __init__(self, paths: Sequence[str | Path], fp32: Path) -> None:
        from histoclass.onnx_backend import OnnxClassifier

        self.clf = OnnxClassifier(fp32)
        self.paths = list(paths)
        self.it: Iterator[Path | str] = iter(self.paths)

    def get_next(self) -> dict[str, np.ndarray] | None:
        from histoclass.data.images import ImageLoadError

        for p in self.it:
            try:
                return {"image": self.clf.preprocess_paths([p])}
            except ImageLoadError as exc:
                log.warning("calibration: skipped %s", exc)
        return None

    def rewind(self) -> None:
        self.it = iter(self.paths)


# Op types quantised: the convolutions and dense layers with the activations between them.
QUANTISED_OPS = ["Conv", "Gemm", "MatMul", "Clip", "Relu", "Sigmoid", "Mul", "Add",
                 "GlobalAveragePool"]


def stem_convs(model: Any) -> list[str]:
    """Names of the Conv nodes reading RGB (3 input channels): every member's stem."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Conv"
            and len(weights.get(n.input[1], ())) == 4 and weights[n.input[1]][1] == 3]


def _const_ints(model: Any, name: str) -> list[int] | None:
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).ravel()]
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return [int(v) for v in numpy_helper.to_array(n.attribute[0].t).ravel()]
    return None


def spatial_means_to_pool(model: Any) -> int:
    """Rewrite ``ReduceMean(axes=H,W, keepdims=1)`` of 4-D tensors to ``GlobalAveragePool``
    in place (the same values; ORT has an int8 kernel for the latter only). Returns the count."""
    from onnx import helper

    count = 0
    for i, n in enumerate(model.graph.node):
        if n.op_type != "ReduceMean":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axes = attrs.get("axes")
        if axes is None and len(n.input) > 1:  # opset >= 18: axes is an input
            axes = _const_ints(model, n.input[1])
        if attrs.get("keepdims", 1) != 1 or axes is None or sorted(axes) not in ([2, 3],
                                                                                 [-2, -1]):
            continue
        pool = helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output),
                                name=n.name or f"spatial_mean_{i}")
        model.graph.node[i].CopyFrom(pool)
        count += 1
    return count


def float_nodes(model: Any) -> list[str]:
    """Nodes kept in float: each stem conv and the nodes feeding it (input normalisation,
    ensemble resizes), and every node after a classifier (Gemm/MatMul), whose own output
    also stays float through ``OpTypesToExcludeOutputQuantization``."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep: dict[str, Any] = {}
    stems = set(stem_convs(model))
    stack = [n for n in model.graph.node if n.name in stems]
    while stack:  # upstream of the stems
        n = stack.pop()
        if n.name not in keep:
            keep[n.name] = n
            stack += [producer[i] for i in n.input if i in producer]
    heads = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    stack = [c for h in heads for o in h.output for c in consumers.get(o, [])]
    while stack:  # downstream of the classifiers
        n = stack.pop()
        if n.name not in keep:
            keep[n.name] = n
            stack += [c for o in n.output for c in consumers.get(o, [])]
    return sorted(keep)


def quantize_static_int8(fp32: str | Path, out: str | Path,
                         calibration: Sequence[str | Path] | None = None) -> Path:
    """Quantise ``fp32`` to ``out`` (QDQ, per-channel int8 weights, uint8 activations).

    The metadata is copied, with ``quantization`` set to ``int8-static-qdq``.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from histoclass.export import set_metadata

    fp32, out = Path(fp32), Path(out)
    paths = list(calibration) if calibration else default_calibration()
    if not paths:
        raise ValueError("INT8 quantisation needs calibration images; none given")
    meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    src, pre = out.with_name(out.stem + ".src.onnx"), out.with_name(out.stem + ".pre.onnx")
    # The calibration sessions warn about every initializer the rewrite left unused: noise.
    ort.set_default_logger_severity(3)
    try:
        model = onnx.load(str(fp32))
        pools = spatial_means_to_pool(model)
        onnx.save(model, str(src))
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        # Unnamed nodes cannot be excluded by name; the pre-processor names most, not all.
        for i, n in enumerate(model.graph.node):
            n.name = n.name or f"{n.op_type}_{i}"
        onnx.save(model, str(pre))
        keep = float_nodes(model)
        log.debug("INT8: %d spatial means -> GlobalAveragePool, %d nodes kept float",
                  pools, len(keep))
        quantize_static(
            str(pre), str(out), _Reader(paths, fp32), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=QUANTISED_OPS,
            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
            # A float stem halves the largest probability change on real H&E images
            # (efficientnet_lite0), and quantising it made B0 slower, not faster (measured).
            nodes_to_exclude=keep,
        )
    finally:
        src.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
    meta["quantization"] = "int8-static-qdq"
    meta["calibration"] = json.dumps({"images": len(paths)})
    set_metadata(out, meta)
    log.info("quantised %s -> %s on %d calibration image(s)", fp32, out, len(paths))
    return out
