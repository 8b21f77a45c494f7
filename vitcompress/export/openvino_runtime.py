"""OpenVINO as a second runtime: the same QDQ ONNX file, read directly by its CPU plugin.

The CPU plugin would compute a float model in bf16 on CPUs that have bf16 instructions (AVX-512
BF16, AMX) unless told otherwise; we pin ``INFERENCE_PRECISION_HINT=f32`` so that "fp32" means
fp32 on every CPU and the accuracy of a float artifact is the same as in onnxruntime. int8 parts
of a QDQ file run in int8 whatever that hint says (they are given by the graph, not by the hint).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import VitcompressError

# Latency of one request at a time, on the threads asked for: the deployment this tool measures.
COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
INTEGER_PRECISIONS = frozenset({"u8", "i8"})
# "Subgraph": a fused snippet, e.g. the attention products with the Softmax between them
EXECUTED_COMPUTE_LAYERS = frozenset({"Convolution", "FullyConnected", "MatMul", "GroupConvolution", "Deconvolution", "Subgraph"})
WEIGHT_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Convert"})  # between a weight constant and its layer


class OpenVinoSession:
    """A compiled OpenVINO model with one infer request: called on a batch, returns the logits."""

    runtime = "openvino"

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: x})
        return np.array(result[self.compiled.output(0)], copy=True)


def compile_model(path: str | Path, threads: int = 0):
    import openvino as ov

    config = dict(COMPILE_CONFIG)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        core = ov.Core()
        return core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitcompressError(f"openvino cannot load {path}: {msg[:300]}") from None


def open_session(path: str | Path, threads: int = 0) -> OpenVinoSession:
    return OpenVinoSession(compile_model(path, threads))


def integer_layers(path: str | Path) -> dict[str, str]:
    """{original ONNX node name: executed layer type} for the nodes fused into each compute layer the
    CPU plugin runs on integer inputs (runtime precision u8/i8), read from its execution graph; and
    {weight constant name: type} for the constant weight each such layer reads (OpenVINO's low-precision
    passes may rename a layer after its moved dequantization, "Multiply_18570", but keep its weight's name)."""
    executed = compile_model(path, 1).get_runtime_model()
    layers = {}
    for op in executed.get_ordered_ops():
        info = op.get_rt_info()
        if info["runtimePrecision"].astype(str) not in INTEGER_PRECISIONS:
            continue
        kind = info["layerType"].astype(str)
        if kind in EXECUTED_COMPUTE_LAYERS:
            # the original names are the compute node and the Q/DQ (and bias Add) it absorbed, some
            # renamed by OpenVINO's passes under the node's own path ("/head/fc/MatMul/Dequantization
            # Multiply", "/stem/conv/Conv/WithoutBiases"): every path prefix stands for its node too
            for name in info["originalLayersNames"].astype(str).split(","):
                parts = name.split("/")
                for end in range(2, len(parts) + 1):
                    layers.setdefault("/".join(parts[:end]), kind)
            if op.get_input_size() > 1:
                for name in _weight_chain(op.input(1).get_source_output().get_node()):
                    layers.setdefault(name, kind)
    return layers


def _weight_chain(node) -> list[str]:
    """Names along a compute layer's weight input, up to its constant (through layout and type ops)."""
    names = []
    while True:
        names.append(node.get_friendly_name())
        if node.get_rt_info()["layerType"].astype(str) not in WEIGHT_LAYOUT_OPS or node.get_input_size() == 0:
            return names
        node = node.input(0).get_source_output().get_node()
