"""Static INT8 quantisation (QDQ) of an exported model, calibrated on real H&E images.

Dynamic quantisation only touches MatMul/Gemm weights, which are a sliver of an EfficientNet's
cost; static QDQ quantises the convolutions too (per-channel weights, uint8 activations), which
is where ONNX Runtime's VNNI kernels give the speed-up. Calibration ranges come from min/max over
the calibration images, preprocessed exactly as at inference.
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


def stem_convs(model: Any) -> list[str]:
    """Names of the Conv nodes reading RGB (3 input channels): every member's stem."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Conv"
            and len(weights.get(n.input[1], ())) == 4 and weights[n.input[1]][1] == 3]


def quantize_static_int8(fp32: str | Path, out: str | Path,
                         calibration: Sequence[str | Path] | None = None) -> Path:
    """Quantise ``fp32`` to ``out`` (QDQ, per-channel int8 weights, uint8 activations).

    The metadata is copied, with ``quantization`` set to ``int8-static-qdq``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from histoclass.export import set_metadata

    fp32, out = Path(fp32), Path(out)
    paths = list(calibration) if calibration else default_calibration()
    if not paths:
        raise ValueError("INT8 quantisation needs calibration images; none given")
    meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    pre = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        stems = stem_convs(onnx.load(str(pre)))
        quantize_static(
            str(pre), str(out), _Reader(paths, fp32), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Convolutions with their fused ReLU/ReLU6 and the dense layers; logits, softmax and
            # the ensemble rule stay float (cheap, and probabilities must not be 8-bit steps).
            op_types_to_quantize=["Conv", "Gemm", "MatMul", "Clip", "Relu"],
            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
            # The stem sees the image itself; in float it halves the largest probability
            # change on real H&E images (efficientnet_lite0) and costs one small 3-channel conv.
            nodes_to_exclude=stems,
        )
    finally:
        pre.unlink(missing_ok=True)
    meta["quantization"] = "int8-static-qdq"
    meta["calibration"] = json.dumps({"images": len(paths)})
    set_metadata(out, meta)
    log.info("quantised %s -> %s on %d calibration image(s)", fp32, out, len(paths))
    return out
