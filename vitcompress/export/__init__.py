"""ONNX export (float and QDQ), runtimes (onnxruntime, OpenVINO), latency and int8 coverage."""
from .onnx_export import (artifact_numerics, check_weight_format, export_float, export_qdq, read_metadata, session_config,
                          update_metadata)
from .runtime import RUNTIMES, compare_latency, get_runtime, int8_coverage, make_session, op_times, open_session

__all__ = ["RUNTIMES", "artifact_numerics", "check_weight_format", "compare_latency", "export_float", "export_qdq", "get_runtime",
           "int8_coverage", "make_session", "op_times", "open_session", "read_metadata", "session_config", "update_metadata"]
