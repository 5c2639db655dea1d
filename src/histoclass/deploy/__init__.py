"""Deployment: ONNX export (optionally INT8) and the ONNX Runtime classifier."""

from histoclass.deploy.export import ExportModule, export_onnx, parity
from histoclass.deploy.quantize import quantize_static_int8
from histoclass.deploy.runtime import OnnxClassifier

__all__ = ["ExportModule", "OnnxClassifier", "export_onnx", "parity", "quantize_static_int8"]
