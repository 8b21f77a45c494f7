"""onnxruntime sessions, side-by-side latency, and int8 coverage of an exported model."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import VitcompressError
from .onnx_export import session_config

# Kernels that compute in integers on onnxruntime's CPU provider. Not MatMulNBits: its 4-bit
# weights are unpacked into a float GEMM (accuracy_level 0), or its input requantized on a grid of
# its own (level 4), so it is weight-only storage, not our integer arithmetic.
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QGemm",
    "DynamicQuantizeMatMul", "QAttention", "QLinearAdd", "QLinearMul",
})
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulNBits"})
WEIGHT_ONLY_OPS = frozenset({"MatMulNBits"})  # packed low-bit weights, float arithmetic


def make_session(path: str | Path, threads: int = 0, optimized_path: str | None = None,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    for key, value in session_config(path).items():  # what the artifact was exported for (its metadata)
        opts.add_session_config_entry(key, value)
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitcompressError(f"onnxruntime cannot load {path}: {msg[:300]}") from None


def run_session(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def compare_latency(paths: dict[str, str | Path], input_shape: tuple[int, ...], threads: int = 1,
                    rounds: int = 30, warmup: int = 5, seed: int = 0) -> dict[str, dict]:
    """Median latency (ms) of several models, timed alternately in one process.

    Alternating A B B A ... spreads machine noise evenly, so the ratio of medians holds even when
    absolute times drift (see benchmarking notes).
    """
    sessions = {name: make_session(p, threads) for name, p in paths.items()}
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            run_session(sessions[name], x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            run_session(sessions[name], x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        n: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "rounds": rounds, "threads": threads,
            "batch": input_shape[0]}
        for n, t in times.items()
    }


def _measured_shapes(model: onnx.ModelProto, tensors: set[str]) -> dict[str, list[int]]:
    """Shapes of the given tensors, observed by running the model once at batch 1.

    Symbolic shape inference gives up on many timm graphs (Swin's window reshapes, for one);
    running the graph with those tensors exposed as outputs always gives the real shapes.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    wanted = sorted(t for t in tensors if t and t not in inits and t not in existing)
    for name in wanted:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    x = np.zeros(shape, dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, {inp.name: x})
    shapes = {n: list(v.shape) for n, v in zip(names, values)}
    shapes.update(inits)
    return shapes


def _macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    out = shapes.get(node.output[0])
    if out is None:
        return 0
    if node.op_type in WEIGHT_ONLY_OPS:
        return int(np.prod(out)) * next(a.i for a in node.attribute if a.name == "K")
    if node.op_type in ("MatMul", "Gemm"):
        a = shapes.get(node.input[0])
        if a is None:
            return 0
        transa = any(at.name == "transA" and at.i for at in node.attribute)
        k = a[-2] if transa else a[-1]
        return int(np.prod(out)) * k
    if node.op_type in ("Conv", "ConvTranspose"):
        w = shapes.get(node.input[1])
        if w is None:
            return 0
        return int(np.prod(out)) * int(np.prod(w[1:]))
    return 0


def int8_coverage(qdq_path: str | Path) -> dict:
    """Share of MACs that onnxruntime runs in integer kernels, and the float islands.

    Each compute node (MatMul/Gemm/Conv) of the exported graph is identified by the quantized
    tensors feeding its DequantizeLinear inputs; it counts as integer when a node of an integer
    kernel type in onnxruntime's optimized graph carries its name (onnxruntime names fused kernels
    after the node they replace) or consumes one of those quantized tensors; each integer kernel
    is matched to one compute node at most.
    """
    model = onnx.load(str(qdq_path))
    compute_nodes = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    shapes = _measured_shapes(model, {t for n in compute_nodes for t in (*n.input[:2], n.output[0])})
    producer = {o: n for n in model.graph.node for o in n.output}
    compute = []
    for n in model.graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        qinputs = set()
        for i in n.input[:2]:
            p = producer.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                qinputs.add(p.input[0])
        compute.append((n, _macs(n, shapes), frozenset(qinputs)))
    with tempfile.TemporaryDirectory() as d:
        opt_path = os.path.join(d, "optimized.onnx")
        make_session(qdq_path, 1, opt_path, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        optimized = onnx.load(opt_path)
    integer_nodes = [n for n in optimized.graph.node if n.op_type in INTEGER_OPS]
    integer_inputs = [set(n.input) for n in integer_nodes]
    claimed = [False] * len(integer_nodes)
    by_name = {n.name: k for k, n in enumerate(integer_nodes) if n.name}
    total = sum(m for _, m, _ in compute) or 1
    int_macs, islands = 0, []
    for n, macs, q in compute:
        # onnxruntime names a fused kernel after the node it replaces; failing that, one shared
        # quantized input identifies it (fusions may rename a weight or an s8->u8 activation).
        best = by_name.get(n.name) if n.name else None
        if best is not None and claimed[best]:
            best = None
        best_overlap = 0
        for k, inputs in enumerate(integer_inputs if best is None else []):
            overlap = len(q & inputs)
            if not claimed[k] and overlap > best_overlap:
                best, best_overlap = k, overlap
        if best is not None:
            claimed[best] = True
            int_macs += macs
        else:
            islands.append({"node": n.name or n.output[0], "layer": module_name_of(n.name), "op": n.op_type,
                            "macs": macs, "quantized_inputs": len(q), "weight_only": n.op_type in WEIGHT_ONLY_OPS})
    islands.sort(key=lambda r: -r["macs"])
    op_counts: dict[str, int] = {}
    for n in optimized.graph.node:
        if n.op_type in INTEGER_OPS:
            op_counts[n.op_type] = op_counts.get(n.op_type, 0) + 1
    return {
        "integer_mac_share": int_macs / total,
        "total_macs": total,
        "integer_macs": int_macs,
        "integer_kernels": op_counts,
        "float_islands": islands,
        # layers with quantized inputs that still run a float kernel: simulated, not integer
        "simulated_layers": [i["layer"] or i["node"] for i in islands if i["quantized_inputs"] and not i["weight_only"]],
        # layers exported with packed low-bit weights over a float GEMM (by choice: --weight-format int4)
        "weight_only_layers": [i["layer"] or i["node"] for i in islands if i["weight_only"]],
    }


def module_name_of(node_name: str) -> str:
    """The torch module a node was exported from, read from the exporter's scope path:
    '/stages/stages.0/stages.0.0/conv1_1x1/conv/Conv' -> 'stages.0.0.conv1_1x1.conv'; '' if none."""
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path
