"""ONNX export (float and QDQ), onnxruntime sessions, latency and int8 coverage."""
from .onnx_export import check_weight_format, export_float, export_qdq, read_metadata, session_config, update_metadata
from .runtime import compare_latency, int8_coverage, make_session

__all__ = ["check_weight_format", "compare_latency", "export_float", "export_qdq", "int8_coverage", "make_session", "read_metadata", "session_config", "update_metadata"]
