"""What caps the fp32/int8 ratio of the models with a speed bar, measured two ways.

1. Where the time goes, by operator class: onnxruntime's own per-node profile of the float model
   and of the `speed` artifact, run alternately. It splits each latency into the matrix products
   (integer kernels in the artifact), quantize/dequantize, and everything else, and answers: how
   much faster are the integer kernels themselves on this CPU, and what ratio would the model
   reach if quantizing were free and everything else cost what the float model pays.
2. For the hybrids (mobilevitv2_050: SiLU; efficientformerv2_s0: GELU), the activations between
   quantized convs, timed by taking them out: timing-only variants in which every such activation
   is bypassed (its output replaced by its input; the function changes, so these variants are
   never shipped). How fast would the int8 activations have to be for the bar, and how fast is the
   cheapest form onnxruntime can run them in.
3. On OpenVINO, where the bars are met or nearest: the artifact `vitcompress quantize --runtime
   openvino` makes (its default placement), timed against the fastest fp32 of either runtime, and
   split by OpenVINO's own per-layer counters into integer products, FakeQuantize and everything else
   (the other layers and the request's own dispatch).

The bar of each model depends on the CPU (``BARS``): what the int8 kernels can give differs between
CPUs that accumulate int8 products in int32 (VNNI) and those that do not (AVX2).

    python benchmarks/bench_speed_caps.py --out benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import onnx

from common import ROOT, add_io_arguments, write_section  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress import QuantConfig, QuantizeJob, quantize  # noqa: E402
from vitcompress.cpu import this_cpu  # noqa: E402
from vitcompress.export import compare_latency  # noqa: E402
from vitcompress.export import openvino_runtime  # noqa: E402
from vitcompress.export.runtime import op_class, op_times  # noqa: E402

# The 1-thread fp32/int8 bars against the fastest fp32 (the speed issue's done-when), keyed by whether
# the CPU accumulates int8 products in int32 (VNNI) or not (AVX2's u8*s8 pairs saturate in int16).
BARS = {
    True: {"deit_tiny_patch16_224": 2.2, "mobilevitv2_050": 1.5, "efficientformerv2_s0": 1.5},
    False: {"deit_tiny_patch16_224": 1.5, "mobilevitv2_050": 1.2, "efficientformerv2_s0": 1.2},
}
ACTIVATIONS = {"mobilevitv2_050": "SiLU", "efficientformerv2_s0": "GELU"}  # what sits between the hybrids' int8 convs
CLASSES = ("float products", "integer products", "quantize/dequantize", "everything else")


def _producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in g.node for o in n.output}


def _drop_dead(g: onnx.GraphProto) -> None:
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            return
        del g.node[:]
        g.node.extend(keep)


def _sigmoid_of(t: str, prod: dict) -> onnx.NodeProto | None:
    """The Sigmoid behind tensor ``t``, directly or through the Q/DQ pair of a quantized gate."""
    p = prod.get(t)
    while p is not None and p.op_type in ("QuantizeLinear", "DequantizeLinear"):
        p = prod.get(p.input[0])
    return p if p is not None and p.op_type == "Sigmoid" else None


def _same_value(a: str, b: str, prod: dict) -> bool:
    """Same tensor, or two DequantizeLinear of the same codes."""
    pa, pb = prod.get(a), prod.get(b)
    return a == b or (pa is not None and pb is not None and pa.op_type == pb.op_type == "DequantizeLinear"
                      and pa.input[0] == pb.input[0])


def bypass_silu(src: Path, dst: Path) -> int:
    """x * sigmoid(x) -> x (float or quantized gate); returns how many were bypassed."""
    m = onnx.load(str(src))
    g, prod, rename = m.graph, _producers(m.graph), {}
    for n in g.node:
        if n.op_type != "Mul":
            continue
        for k in (0, 1):
            s = _sigmoid_of(n.input[k], prod)
            if s is not None and _same_value(s.input[0], n.input[1 - k], prod):
                rename[n.output[0]] = n.input[1 - k]
                break
    for n in g.node:
        for i, x in enumerate(n.input):
            while x in rename:
                x = rename[x]
            n.input[i] = x
    _drop_dead(g)
    onnx.save(m, str(dst))
    return len(rename)


def bypass_gelu(src: Path, dst: Path) -> int:
    """Gelu -> Identity; returns how many were bypassed."""
    m = onnx.load(str(src))
    count = 0
    for n in m.graph.node:
        if n.op_type == "Gelu":
            n.op_type, n.domain = "Identity", ""
            del n.attribute[:]
            count += 1
    onnx.save(m, str(dst))
    return count


def float_silu_gates(src: Path, dst: Path) -> int:
    """The other form onnxruntime could run a quantized gate in: the sigmoid's Q/DQ pair removed, so
    DQ -> Sigmoid -> Mul -> Q runs in float between the quantized convs (same function up to the
    gate's rounding); returns how many gates."""
    m = onnx.load(str(src))
    g, prod = m.graph, _producers(m.graph)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    count = 0
    for s in [n for n in g.node if n.op_type == "Sigmoid"]:
        q = (consumers.get(s.output[0]) or [None])[0]
        dq = (consumers.get(q.output[0]) or [None])[0] if q is not None and q.op_type == "QuantizeLinear" else None
        if dq is None or dq.op_type != "DequantizeLinear" or prod[s.input[0]].op_type != "DequantizeLinear":
            continue
        for c in consumers.get(dq.output[0], []):
            c.input[:] = [s.output[0] if i == dq.output[0] else i for i in c.input]
        count += 1
    _drop_dead(g)
    onnx.save(m, str(dst))
    return count


def build(model: str, calib: Path, work: Path) -> dict[str, Path]:
    """The float model and its `speed` artifact (random weights, native size)."""
    out = work / model
    quantize(QuantizeJob(out=out, model=model, pretrained=False, config=QuantConfig(placement="speed"),
                         calib_dir=calib, calib_size=32, latency_rounds=3, force=True))
    return {"fp32": out / "model.fp32.onnx", "int8": out / "model.int8.onnx"}


def _input_shape(path: Path) -> tuple[int, ...]:
    """The model's input shape, read from the graph (a symbolic batch dimension taken as 1)."""
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value or 1 for d in dims)


def profile(model: str, files: dict[str, Path], rounds: int, repeats: int) -> dict:
    """Milliseconds per run by operator class (median over repeats), float model vs artifact."""
    runs = [op_times(files, _input_shape(files["fp32"]), threads=1, rounds=rounds) for _ in range(repeats)]
    by_class = {}
    for name in files:
        per_run = []
        for r in runs:
            sums = dict.fromkeys(CLASSES, 0.0)
            for op, ms in r[name]["ops"].items():
                sums[op_class(op)] += ms
            per_run.append(sums)
        by_class[name] = {c: statistics.median(p[c] for p in per_run) for c in CLASSES}
    return {"model": model, "by_class": by_class, "runs": runs}


def measure(model: str, act: str, files: dict[str, Path], rounds: int, repeats: int) -> dict:
    files = dict(files)
    out = files["fp32"].parent
    bypass = bypass_silu if act == "SiLU" else bypass_gelu
    counts = {}
    for name in ("fp32", "int8"):
        files[f"{name} without {act}"] = out / f"{name}.no_act.onnx"
        counts[name] = bypass(files[name], files[f"{name} without {act}"])
    if act == "SiLU":
        files["int8, SiLU gates in float"] = out / "int8.float_gates.onnx"
        counts["float gates"] = float_silu_gates(files["int8"], files["int8, SiLU gates in float"])
    runs = [compare_latency(files, _input_shape(files["fp32"]), threads=1, rounds=rounds) for _ in range(repeats)]
    ms = {k: statistics.median(r[k]["median_ms"] for r in runs) for k in files}
    return {"model": model, "act": act, "counts": counts, "ms": ms, "runs": runs}


def build_openvino(model: str, calib: Path, work: Path) -> tuple[Path, str]:
    """The artifact `vitcompress quantize --runtime openvino` makes (random weights), and its placement."""
    out = work / f"{model}_openvino"
    report = quantize(QuantizeJob(out=out, model=model, pretrained=False, config=QuantConfig(placement="default"),
                                  calib_dir=calib, calib_size=32, latency_rounds=3, force=True, runtime="openvino"))
    return out / "model.int8.onnx", report["placement_auto"]["chosen"]


def measure_openvino(model: str, fp32: Path, int8: Path, placement: str, rounds: int, repeats: int) -> dict:
    """Plain latencies (fp32 on both runtimes, the artifact on OpenVINO) and the artifact's per-layer split."""
    shape = _input_shape(fp32)
    files = {"fp32 onnxruntime": (fp32, "onnxruntime"), "fp32 openvino": (fp32, "openvino"), "int8": (int8, "openvino")}
    runs = [compare_latency(files, shape, threads=1, rounds=rounds) for _ in range(repeats)]
    ms = {k: statistics.median(r[k]["median_ms"] for r in runs) for k in files}
    profiles = [openvino_runtime.op_times({"int8": int8}, shape, threads=1, rounds=rounds)["int8"] for _ in range(repeats)]
    by_class = {c: statistics.median(sum(v for k, v in p["ops"].items() if openvino_runtime.op_class(k) == c) for p in profiles)
                for c in CLASSES}
    return {"model": model, "placement": placement, "ms": ms, "by_class": by_class}


def _openvino_row(r: dict, bar: float) -> str:
    ms, c = r["ms"], r["by_class"]
    fastest = min(("onnxruntime", ms["fp32 onnxruntime"]), ("openvino", ms["fp32 openvino"]), key=lambda t: t[1])
    products = c["integer products"] + c["float products"]
    rest = ms["int8"] - products - c["quantize/dequantize"]
    return (f"| {r['model']} | {bar:g}× | {r['placement']} | {fastest[1]:.2f} ({fastest[0]}) | {ms['fp32 openvino']:.2f} | "
            f"{ms['int8']:.2f} ({fastest[1] / ms['int8']:.2f}×) | {products:.2f} ({c['integer products']:.2f}) | "
            f"{c['quantize/dequantize']:.2f} | {rest:.2f} | {fastest[1] / products:.2f}× | "
            f"{fastest[1] / bar - products - c['quantize/dequantize']:.2f} |")


def _activation_rows(r: dict, bar: float) -> list[str]:
    act, ms = r["act"], r["ms"]
    fp32, int8 = ms["fp32"], ms["int8"]
    rest_int8 = ms[f"int8 without {act}"]
    act_float = fp32 - ms[f"fp32 without {act}"]
    act_int8 = int8 - rest_int8
    budget = fp32 / bar - rest_int8
    rows = [
        f"| {r['model']} | {act} x{r['counts']['int8']} | {bar:g}× | {fp32:.2f} | {int8:.2f} ({fp32 / int8:.2f}×) | {rest_int8:.2f} | "
        f"{act_float:.2f} | {act_int8:.2f} | {budget:.2f} | {fp32 / (rest_int8 + act_float):.2f}× |"
    ]
    if "int8, SiLU gates in float" in ms:
        g = ms["int8, SiLU gates in float"]
        rows.append(f"| {r['model']} | SiLU gates in float (x{r['counts']['float gates']}) | {bar:g}× | {fp32:.2f} | {g:.2f} "
                    f"({fp32 / g:.2f}×) | {rest_int8:.2f} | – | {g - rest_int8:.2f} | {budget:.2f} | – |")
    return rows


def _class_row(r: dict, bar: float) -> str:
    run = {n: statistics.median(x[n]["run_ms"] for x in r["runs"]) for n in ("fp32", "int8")}
    f, q = r["by_class"]["fp32"], r["by_class"]["int8"]
    prod_f = f["float products"] + f["integer products"]
    prod_q = q["float products"] + q["integer products"]
    rest_f = run["fp32"] - prod_f - f["quantize/dequantize"]
    rest_q = run["int8"] - prod_q - q["quantize/dequantize"]
    return (f"| {r['model']} | {bar:g}× | {run['fp32']:.2f} | {run['int8']:.2f} ({run['fp32'] / run['int8']:.2f}×) | "
            f"{prod_f:.2f} → {prod_q:.2f} ({prod_f / prod_q:.2f}×) | {q['integer products']:.2f} | {q['quantize/dequantize']:.2f} | "
            f"{rest_f:.2f} → {rest_q:.2f} | {run['fp32'] / prod_q:.2f}× | {run['fp32'] / (prod_q + rest_f):.2f}× | "
            f"{run['fp32'] / bar - rest_f:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_io_arguments(ap)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--section", default="bench_speed_caps", help="RESULTS.md section to write (one per CPU ISA)")
    args = ap.parse_args()
    calib = args.shared / "data" / "cifar10" / "train"
    if not calib.is_dir():
        calib = ROOT / "calib" / "train"  # random weights: any images do for calibration
    bars = BARS[this_cpu()["int32_dot"]]
    with tempfile.TemporaryDirectory() as tmp:
        files = {m: build(m, calib, Path(tmp)) for m in bars}
        profiles = [profile(m, files[m], args.rounds, args.repeats) for m in bars]
        activations = [measure(m, a, files[m], args.rounds, args.repeats) for m, a in ACTIVATIONS.items()]
        openvino = [measure_openvino(m, files[m]["fp32"], *build_openvino(m, calib, Path(tmp)), args.rounds, args.repeats)
                    for m in bars]
    lines = [
        "## What caps the fp32/int8 ratio of the models with a speed bar", "",
        f"Command: `python benchmarks/bench_speed_caps.py {' '.join(sys.argv[1:])}`", "",
        "Random weights, native size, 1 thread, batch 1. The bar is the speed issue's for this CPU's int8 ISA. The "
        "first two tables: the `speed` placement on onnxruntime, against onnxruntime's fp32; the third: OpenVINO, "
        "against the fastest fp32 of either runtime.", "",
        "### Where the time goes, by operator class", "",
        "onnxruntime's per-node profile of the float model and the artifact, run alternately, "
        f"{args.rounds} rounds after 5 warm-ups, median of {args.repeats} runs; profiling adds a little to every "
        "node, so these totals run above the plain latencies below. Products = MatMul/Gemm/Conv "
        "(integer kernels in the artifact, any float ones left included; in the float model onnxruntime fuses a conv's "
        "activation into the conv, so the hybrids' float products carry their SiLU/GELU: the second table splits "
        "those out); everything else = the rest of the run "
        "(norms, softmax, activations, adds, layout, the session's own overhead). Ceiling = fp32 / int8 products "
        "(everything else free); 'if the rest cost float's' = fp32 / (int8 products + the float model's "
        "everything else), quantizing free; last column: what the products may cost for the bar at that.", "",
        "| model | bar | fp32 ms | int8 ms (ratio) | products fp32 → int8 ms (ratio) | of which integer kernels, ms "
        "| quantize/dequantize, ms | everything else fp32 → int8 ms | ceiling | ratio if the rest cost float's "
        "| products may cost for the bar, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_class_row(r, bars[r["model"]]) for r in profiles]
    lines += [
        "", "### The hybrids' activations between quantized convs, timed by taking them out", "",
        f"Each latency is the median over {args.repeats} runs of the median of {args.rounds} alternated rounds. "
        "\"without\" variants bypass the activation (timing only: the function changes). Activation cost = model − "
        "its variant without the activation. Budget = what the int8 activations may cost for the bar (fp32 / bar − "
        "int8 without them). Last column: the ratio if the int8 activations cost exactly what the float model pays "
        "for them.", "",
        "| model | activation | bar | fp32 ms | int8 ms (ratio) | int8 without it, ms | its cost in fp32, ms | its cost in "
        "int8, ms | budget for the bar, ms | ratio if int8 paid the float cost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in activations:
        lines += _activation_rows(r, bars[r["model"]])
    lines += [
        "", "### On OpenVINO: the artifact `vitcompress quantize --runtime openvino` makes", "",
        f"Latencies: median over {args.repeats} runs of the median of {args.rounds} alternated rounds of the fp32 file on "
        "both runtimes and the artifact on OpenVINO; the ratio is against the fastest fp32. Split: OpenVINO's per-layer "
        f"counters (PERF_COUNT) over {args.rounds} rounds, median of {args.repeats} runs; products = Convolution, "
        "GroupConvolution, MatMul, FullyConnected (and integer attention snippets), in brackets those on integer "
        "kernels; everything else = the artifact's plain latency − products − FakeQuantize (norms, softmax, "
        "activations, adds, reorders, and the request's own dispatch). Ceiling = fastest fp32 / products; last "
        "column: what everything else may cost for the bar.", "",
        "| model | bar | placement | fastest fp32 ms | OpenVINO fp32 ms | int8 ms (vs fastest fp32) | products ms (integer) "
        "| FakeQuantize ms | everything else ms | ceiling | everything else may cost for the bar, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_openvino_row(r, bars[r["model"]]) for r in openvino]
    text = "\n".join(lines) + "\n"
    write_section(args.out, text, args.section)
    print(text)


if __name__ == "__main__":
    main()
