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
rewritten to the equivalent ``GlobalAveragePool``, which has an int8 kernel (the graph passes
are in :mod:`histoclass.deploy.graph`). What stays float: the input normalisation and each
member's stem conv (they see the image itself), and each classifier (the dense layer with one
output per class) with everything after it (logits, softmax, the ensemble rule: probabilities
must not move in 8-bit steps).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

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
        from histoclass.deploy.runtime import OnnxClassifier

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


def quantize_static_int8(fp32: str | Path, out: str | Path,
                         calibration: Sequence[str | Path] | None = None) -> Path:
    """Quantise ``fp32`` to ``out`` (QDQ, per-channel int8 weights, uint8 activations).

    The metadata is copied, with ``quantization`` set to ``int8-static-qdq``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from histoclass.deploy.graph import (
        float_nodes,
        name_nodes,
        read_metadata,
        set_metadata,
        spatial_means_to_pool,
    )

    fp32, out = Path(fp32), Path(out)
    paths = list(calibration) if calibration else default_calibration()
    if not paths:
        raise ValueError("INT8 quantisation needs calibration images; none given")
    meta = read_metadata(fp32)
    src, pre = out.with_name(out.stem + ".src.onnx"), out.with_name(out.stem + ".pre.onnx")
    try:
        model = onnx.load(str(fp32))
        pools = spatial_means_to_pool(model)
        onnx.save(model, str(src))
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        name_nodes(model)
        onnx.save(model, str(pre))
        keep = float_nodes(model, len(json.loads(meta["classes"])))
        log.debug("INT8: %d spatial means -> GlobalAveragePool, %d nodes kept float",
                  pools, len(keep))
        quantize_static(
            str(pre), str(out), _Reader(paths, fp32), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=QUANTISED_OPS,
            # A float stem halves the largest probability change on real H&E images
            # (efficientnet_lite0), and quantising it made B0 slower, not faster (measured);
            # the classifiers stay float so probabilities never move in 8-bit steps.
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
