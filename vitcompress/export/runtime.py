"""Runtimes (onnxruntime by default, OpenVINO as an option), side-by-side latency, and int8 coverage."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import VitcompressError
from ..registry import lookup
from ..cpu import compatibility
from .onnx_export import COMPUTE_OPS, NUMERICS_KEY, SESSION_CONFIG_KEY, producers, stored_metadata


class CpuMismatchWarning(UserWarning):
    """An artifact whose integer numerics are not exact on the CPU running it (see ``vitcompress.cpu``)."""


def _runtime_needs(path: str | Path) -> dict:
    """The artifact's metadata as a runtime needs it; warns when its numerics are not exact on this CPU."""
    stored = stored_metadata(path) or {}
    note = compatibility(stored.get(NUMERICS_KEY))["note"]
    if note:
        warnings.warn(f"{Path(path).name}: {note}", CpuMismatchWarning, stacklevel=3)
    return stored

# Kernels that compute in integers on onnxruntime's CPU provider. Not MatMulNBits: its 4-bit
# weights are unpacked into a float GEMM (accuracy_level 0), or its input requantized on a grid of
# its own (level 4), so it is weight-only storage, not our integer arithmetic.
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QGemm",
    "DynamicQuantizeMatMul", "QAttention", "QLinearAdd", "QLinearMul",
})
WEIGHT_ONLY_OPS = frozenset({"MatMulNBits"})  # packed low-bit weights, float arithmetic


class OrtSession:
    """An onnxruntime session as the runtimes share it: called on a batch, returns the logits."""

    runtime = "onnxruntime"

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def make_session(path: str | Path, threads: int = 0, optimized_path: str | None = None,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    for key, value in _runtime_needs(path).get(SESSION_CONFIG_KEY, {}).items():  # what the artifact was exported for
        opts.add_session_config_entry(key, value)
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitcompressError(f"onnxruntime cannot load {path}: {msg[:300]}") from None


def _open_onnxruntime(path: str | Path, threads: int) -> OrtSession:
    return OrtSession(make_session(path, threads))


def _open_openvino(path: str | Path, threads: int):
    from .openvino_runtime import open_session

    if Path(path).suffix == ".onnx":  # OpenVINO also reads its own IR (.xml), which carries no metadata of ours
        _runtime_needs(path)
    return open_session(path, threads)


@dataclass(frozen=True)
class Runtime:
    """An inference engine that runs our ONNX files as they are (no conversion step for the user)."""

    name: str
    module: str  # the Python package that provides it
    install: str  # how to get it when it is missing (optional extras)
    open: Callable[[str | Path, int], Callable[[np.ndarray], np.ndarray]]

    def version(self) -> str:
        return importlib.import_module(self.module).__version__.split("-")[0]

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", "onnxruntime", "pip install onnxruntime", _open_onnxruntime),
    "openvino": Runtime("openvino", "openvino", "pip install 'vitcompress[openvino]'", _open_openvino),
}
DEFAULT_RUNTIME = "onnxruntime"


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``; one line naming the install command when its package is missing."""
    runtime = lookup(RUNTIMES, name, "runtime")
    if not runtime.available():
        raise VitcompressError(f"runtime '{name}' is not installed: {runtime.install}")
    return runtime


def open_session(path: str | Path, runtime: str = DEFAULT_RUNTIME, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A session of ``runtime`` over an exported file: called on a float batch, returns the logits."""
    return get_runtime(runtime).open(path, threads)


def runtime_info(name: str) -> dict:
    """{"name", "version"} of a runtime, for every latency a report shows."""
    return {"name": name, "version": get_runtime(name).version()}


def run_session(session, x: np.ndarray) -> np.ndarray:
    """Logits of an onnxruntime InferenceSession or of any ``open_session`` result."""
    if callable(session):
        return session(x)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


Candidate = Union[str, Path, tuple]  # a path (default runtime) or (path, runtime name)


def alternate(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 5, min_seconds: float = 0.0,
              after: Callable[[str], None] | None = None) -> tuple[dict[str, list[float]], int]:
    """Milliseconds of each timed call: every call ``warmup`` times, then ``rounds`` rounds run
    alternately (A B .. then .. B A), so machine noise is spread evenly over the calls.

    ``min_seconds``: more rounds where needed for the timed ones to last about that long (estimated
    from each call's last warm-up). ``after(name)`` runs after each timed call, outside its time (to
    read a per-run profile). Returns the times and the number of rounds run."""
    names = list(calls)
    per_round = 0.0  # seconds of one round, from each call's last warm-up
    for name in names:
        last = 0.0
        for _ in range(warmup):
            t0 = time.perf_counter()
            calls[name]()
            last = time.perf_counter() - t0
        per_round += last
    if min_seconds > 0 and per_round > 0:
        rounds = max(rounds, math.ceil(min_seconds / per_round))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
            if after is not None:
                after(name)
    return times, rounds


def compare_latency(paths: dict[str, Candidate], input_shape: tuple[int, ...], threads: int = 1,
                    rounds: int = 30, warmup: int = 5, seed: int = 0, runtime: str = DEFAULT_RUNTIME,
                    min_seconds: float = 0.0) -> dict[str, dict]:
    """Median latency (ms) of several models, timed alternately in one process.

    Alternating A B B A ... spreads machine noise evenly, so the ratio of medians holds even when
    absolute times drift (see benchmarking notes). Each entry is a path run by ``runtime``, or a
    (path, runtime) pair, so one run can put the same file on two runtimes side by side.
    ``min_seconds``: more rounds than ``rounds`` where needed for the timed runs to last about that
    long (estimated from the last warm-up): 30 rounds of a sub-millisecond model last a few
    milliseconds, and their ratio swings by ±10 % from run to run.
    """
    runtimes = {name: (p if isinstance(p, tuple) else (p, runtime)) for name, p in paths.items()}
    sessions = {name: open_session(p, rt, threads) for name, (p, rt) in runtimes.items()}
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    times, rounds = alternate({n: functools.partial(s, x) for n, s in sessions.items()}, rounds, warmup, min_seconds)
    return {
        n: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "rounds": rounds, "threads": threads,
            "batch": input_shape[0], "runtime": runtime_info(runtimes[n][1])}
        for n, t in times.items()
    }


# Operator classes of onnxruntime's optimized graph, for saying where a model's time goes.
PRODUCT_OPS = COMPUTE_OPS | {"FusedMatMul", "FusedConv", "FusedGemm"}  # float matrix products as onnxruntime fuses them
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def op_class(op_type: str) -> str:
    """'integer products', 'float products', 'quantize/dequantize' or 'everything else'."""
    if op_type in INTEGER_OPS:
        return "integer products"
    if op_type in PRODUCT_OPS:
        return "float products"
    return "quantize/dequantize" if op_type in QDQ_OPS else "everything else"


def op_times(paths: dict[str, str | Path], input_shape: tuple[int, ...], threads: int = 1, rounds: int = 30,
             warmup: int = 5, seed: int = 0) -> dict[str, dict]:
    """Where each model's time goes: onnxruntime's own per-node profile, in ms per run by operator type.

    The models run alternately, as in ``compare_latency``, so machine noise is spread evenly; the
    warm-up runs are left out. Profiling adds a little time to every node, so the per-class sums
    are for comparing models run this way, not for quoting as latencies (``compare_latency`` is).
    Returns {name: {"run_ms": mean whole-run time, "ops": {op_type: ms}, "nodes": {op_type: count}}}.
    """
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {n: make_session(p, threads, profile_prefix=str(Path(tmp) / f"profile_{i}"))
                    for i, (n, p) in enumerate(paths.items())}
        alternate({n: functools.partial(run_session, s, x) for n, s in sessions.items()}, rounds, warmup)
        files = {n: s.end_profiling() for n, s in sessions.items()}
        out = {}
        for n, f in files.items():
            events = json.loads(Path(f).read_text())
            runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                          key=lambda e: e["ts"])[warmup:]
            start = runs[0]["ts"]
            ops: Counter = Counter()
            nodes: Counter = Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                    ops[e["args"]["op_name"]] += e["dur"]
                    nodes[e["args"]["op_name"]] += 1
            out[n] = {"run_ms": sum(e["dur"] for e in runs) / len(runs) / 1e3,
                      "ops": {k: v / len(runs) / 1e3 for k, v in ops.most_common()},
                      "nodes": {k: v // len(runs) for k, v in nodes.items()}}
    return out


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


def _compute_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int, frozenset]]:
    """(node, MACs at batch 1, quantized tensors feeding its DequantizeLinear inputs) of every
    MatMul/Gemm/Conv of an exported graph."""
    nodes = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    shapes = _measured_shapes(model, {t for n in nodes for t in (*n.input[:2], n.output[0])})
    producer = producers(model.graph)
    compute = []
    for n in nodes:
        qinputs = set()
        for i in n.input[:2]:
            p = producer.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                qinputs.add(p.input[0])
        compute.append((n, _macs(n, shapes), frozenset(qinputs)))
    return compute


def _constants(model: onnx.ModelProto) -> set[str]:
    """Names of the graph's constant tensors: a compute node whose weight is one of them (not a
    DequantizeLinear output) has a float weight, left float by the placement."""
    return {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def _onnxruntime_integer(qdq_path: str | Path, model: onnx.ModelProto, compute: list) -> tuple[list[bool], dict[str, int]]:
    """Which compute nodes onnxruntime's optimized graph runs as integer kernels, and those kernels' counts.

    A compute node counts as integer when a node of an integer kernel type carries its name
    (onnxruntime names fused kernels after the node they replace) or consumes one of its quantized
    tensors; each integer kernel is matched to one compute node at most."""
    with tempfile.TemporaryDirectory() as d:
        opt_path = os.path.join(d, "optimized.onnx")
        make_session(qdq_path, 1, opt_path, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        optimized = onnx.load(opt_path)
    integer_nodes = [n for n in optimized.graph.node if n.op_type in INTEGER_OPS]
    integer_inputs = [set(n.input) for n in integer_nodes]
    claimed = [False] * len(integer_nodes)
    by_name = {n.name: k for k, n in enumerate(integer_nodes) if n.name}
    flags = []
    for n, _, q in compute:
        # failing the name, one shared quantized input identifies the kernel (fusions may rename
        # a weight or an s8->u8 activation).
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
        flags.append(best is not None)
    return flags, dict(Counter(n.op_type for n in integer_nodes))


def _openvino_integer(qdq_path: str | Path, model: onnx.ModelProto, compute: list) -> tuple[list[bool], dict[str, int]]:
    from .openvino_runtime import integer_layers

    layers = integer_layers(qdq_path)  # original ONNX node name (or its weight's name) -> the executed integer layer's type
    producer = producers(model.graph)
    kinds = [next((layers[k] for k in (n.name, *_weight_sources(n, producer)) if k and k in layers), None) for n, _, _ in compute]
    return [k is not None for k in kinds], dict(Counter(k for k in kinds if k is not None))


def _weight_sources(node: onnx.NodeProto, producer: dict) -> list[str]:
    """Tensor names a compute node's weight input comes from, through DequantizeLinear and layout ops."""
    names, tensor = [], node.input[1] if len(node.input) > 1 else ""
    while tensor:
        names.append(tensor)
        p = producer.get(tensor)
        tensor = p.input[0] if p is not None and p.op_type in ("DequantizeLinear", "Transpose", "Reshape", "Cast") else ""
    return names


# (the file, its loaded graph, its compute nodes) -> which nodes run in integer kernels there, and those kernels' counts
INTEGER_KERNELS = {"onnxruntime": _onnxruntime_integer, "openvino": _openvino_integer}


def int8_coverage(qdq_path: str | Path, runtime: str = DEFAULT_RUNTIME) -> dict:
    """Share of MACs that ``runtime`` runs in integer kernels, and the float islands."""
    get_runtime(runtime)
    model = onnx.load(str(qdq_path))
    compute = _compute_nodes(model)
    integer, op_counts = lookup(INTEGER_KERNELS, runtime, "runtime")(qdq_path, model, compute)
    total = sum(m for _, m, _ in compute) or 1
    int_macs, islands = 0, []
    constants = _constants(model)
    for (n, macs, q), is_int in zip(compute, integer):
        if is_int:
            int_macs += macs
        else:
            islands.append({"node": n.name or n.output[0], "layer": module_name_of(n.name), "op": n.op_type,
                            "macs": macs, "quantized_inputs": len(q), "weight_only": n.op_type in WEIGHT_ONLY_OPS,
                            "float_weight": len(n.input) > 1 and n.input[1] in constants})
    islands.sort(key=lambda r: -r["macs"])
    by_op: Counter[str] = Counter()
    for island in islands:
        by_op[island["op"]] += island["macs"]
    return {
        "runtime": runtime_info(runtime),
        "integer_mac_share": int_macs / total,
        "total_macs": total,
        "integer_macs": int_macs,
        "integer_kernels": op_counts,
        "float_islands": islands,
        # where the float MACs are, by operator type (what caps an int8 artifact's speed), largest first
        "float_mac_share_by_op": {op: m / total for op, m in by_op.most_common()},
        # layers with quantized inputs that still run a float kernel: simulated, not integer (a layer
        # whose weight the placement left float only reads a dequantized activation: a float layer)
        "simulated_layers": [i["layer"] or i["node"] for i in islands
                             if i["quantized_inputs"] and not i["weight_only"] and not i["float_weight"]],
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
