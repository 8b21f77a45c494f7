"""OpenVINO as a second runtime: the same QDQ ONNX file, read directly by its CPU plugin.

The CPU plugin would compute a float model in bf16 on CPUs that have bf16 instructions (AVX-512
BF16, AMX) unless told otherwise; we pin ``INFERENCE_PRECISION_HINT=f32`` so that "fp32" means
fp32 on every CPU and the accuracy of a float artifact is the same as in onnxruntime. int8 parts
of a QDQ file run in int8 whatever that hint says (they are given by the graph, not by the hint).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import VitcompressError

# Latency of one request at a time, on the threads asked for: the deployment this tool measures.
COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
INTEGER_PRECISIONS = frozenset({"u8", "i8"})
# "Subgraph": a fused snippet, e.g. the attention products with the Softmax between them
EXECUTED_COMPUTE_LAYERS = frozenset({"Convolution", "FullyConnected", "MatMul", "GroupConvolution", "Deconvolution", "Subgraph"})
WEIGHT_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Convert"})  # between a weight constant and its layer


def _is_compute(layer_type: str) -> bool:
    """A compute layer, or a variant of one ("FullyConnectedQuantizedLegacy")."""
    return layer_type.startswith(tuple(EXECUTED_COMPUTE_LAYERS))


class OpenVinoSession:
    """A compiled OpenVINO model with one infer request: called on a batch, returns the logits."""

    runtime = "openvino"

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: x})
        return np.array(result[self.compiled.output(0)], copy=True)


def compile_model(path: str | Path, threads: int = 0, profile: bool = False):
    import openvino as ov

    config = dict(COMPILE_CONFIG)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if profile:  # per-layer counters (``op_times``)
        config["PERF_COUNT"] = True
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
        if _is_compute(kind):
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


def _precision(exec_type: str) -> str:
    """The precision a profiled node ran in, from its kernel name ("brgconv_avx512_1x1_I8" -> "i8")."""
    return exec_type.rpartition("_")[2].lower()


def op_class(key: str) -> str:
    """The class of a profile key "LayerType:precision", in ``runtime.op_class``'s terms. A fused
    ``Subgraph`` counts as products only where it runs on integers (the attention snippet); a float
    one is fused elementwise work."""
    kind, _, precision = key.partition(":")
    if _is_compute(kind):
        if precision in INTEGER_PRECISIONS:
            return "integer products"
        return "everything else" if kind == "Subgraph" else "float products"
    return "quantize/dequantize" if kind == "FakeQuantize" else "everything else"


def op_times(paths: dict[str, str | Path], input_shape: tuple[int, ...], threads: int = 1, rounds: int = 30,
             warmup: int = 5, seed: int = 0) -> dict[str, dict]:
    """Where each model's time goes in OpenVINO: its CPU plugin's per-layer counters, in ms per run
    by "LayerType:precision" (e.g. "Convolution:i8"), the models run alternately as in
    ``runtime.compare_latency``. The counters cover the executed layers only; the rest of a run
    (the request's own dispatch) is ``run_ms`` minus their sum. Counting adds a little to every run:
    compare models run this way, quote latencies from ``compare_latency``.
    Returns {name: {"run_ms": mean whole-run time, "ops": {key: ms}, "nodes": {key: count}}}."""
    from .runtime import alternate  # runtime.py imports this module

    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    requests = {}
    for name, path in paths.items():
        compiled = compile_model(path, threads, profile=True)
        requests[name] = compiled.create_infer_request()
    ops: dict[str, Counter] = {n: Counter() for n in paths}
    nodes: dict[str, Counter] = {n: Counter() for n in paths}

    def read_counters(name: str) -> None:
        for info in requests[name].get_profiling_info():
            key = f"{info.node_type}:{_precision(info.exec_type)}"
            ops[name][key] += info.real_time.total_seconds() * 1e3
            nodes[name][key] += 1

    times, rounds = alternate({n: (lambda r=r: r.infer({0: x})) for n, r in requests.items()}, rounds, warmup,
                              after=read_counters)
    return {n: {"run_ms": float(np.mean(times[n])), "ops": {k: v / rounds for k, v in ops[n].most_common()},
                "nodes": {k: v // rounds for k, v in nodes[n].items()}} for n in paths}
