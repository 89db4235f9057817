"""Export: teacher, student and the anomaly map fused into one ONNX graph, with its metadata."""

from .onnx_export import export_onnx, verify_export

__all__ = ["export_onnx", "verify_export"]
