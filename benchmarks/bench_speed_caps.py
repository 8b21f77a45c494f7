"""What the activations between quantized convs cost, measured by taking them out.

For the hybrids whose 1-thread bar is 1.5x (mobilevitv2_050: SiLU; efficientformerv2_s0: GELU),
the `speed` artifact and the float model are timed side by side with timing-only variants in
which every such activation is bypassed (its output replaced by its input; the function changes,
so these variants are for timing only and are never shipped). That splits each model's latency
into "everything else" and "the activations", and answers: how fast would the int8 activations
have to be for 1.5x, and how fast is the cheapest form onnxruntime 1.31 can run them in.

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
from vitcompress.export import compare_latency  # noqa: E402

MODELS = {"mobilevitv2_050": "SiLU", "efficientformerv2_s0": "GELU"}


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


def measure(model: str, act: str, calib: Path, work: Path, rounds: int, repeats: int) -> dict:
    out = work / model
    quantize(QuantizeJob(out=out, model=model, pretrained=False, config=QuantConfig(placement="speed"),
                         calib_dir=calib, calib_size=32, latency_rounds=3, force=True))
    files = {"fp32": out / "model.fp32.onnx", "int8": out / "model.int8.onnx"}
    bypass = bypass_silu if act == "SiLU" else bypass_gelu
    counts = {}
    for name in ("fp32", "int8"):
        files[f"{name} without {act}"] = out / f"{name}.no_act.onnx"
        counts[name] = bypass(files[name], files[f"{name} without {act}"])
    if act == "SiLU":
        files["int8, SiLU gates in float"] = out / "int8.float_gates.onnx"
        counts["float gates"] = float_silu_gates(files["int8"], files["int8, SiLU gates in float"])
    import onnxruntime as ort

    shape = tuple(d if isinstance(d, int) else 1 for d in ort.InferenceSession(str(files["fp32"])).get_inputs()[0].shape)
    runs = [compare_latency(files, shape, threads=1, rounds=rounds) for _ in range(repeats)]
    ms = {k: statistics.median(r[k]["median_ms"] for r in runs) for k in files}
    return {"model": model, "act": act, "counts": counts, "ms": ms, "runs": runs}


def _rows(r: dict) -> list[str]:
    act, ms = r["act"], r["ms"]
    fp32, int8 = ms["fp32"], ms["int8"]
    rest_int8 = ms[f"int8 without {act}"]
    act_float = fp32 - ms[f"fp32 without {act}"]
    act_int8 = int8 - rest_int8
    budget = fp32 / 1.5 - rest_int8
    rows = [
        f"| {r['model']} | {act} x{r['counts']['int8']} | {fp32:.2f} | {int8:.2f} ({fp32 / int8:.2f}×) | {rest_int8:.2f} | "
        f"{act_float:.2f} | {act_int8:.2f} | {budget:.2f} | {fp32 / (rest_int8 + act_float):.2f}× |"
    ]
    if "int8, SiLU gates in float" in ms:
        g = ms["int8, SiLU gates in float"]
        rows.append(f"| {r['model']} | SiLU gates in float (x{r['counts']['float gates']}) | {fp32:.2f} | {g:.2f} ({fp32 / g:.2f}×) | "
                    f"{rest_int8:.2f} | – | {g - rest_int8:.2f} | {budget:.2f} | – |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_io_arguments(ap)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    calib = args.shared / "data" / "cifar10" / "train"
    if not calib.is_dir():
        calib = ROOT / "calib" / "train"  # random weights: any images do for calibration
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(m, a, calib, Path(tmp), args.rounds, args.repeats) for m, a in MODELS.items()]
    lines = [
        "## What caps the hybrids: the activations between quantized convs, timed by taking them out", "",
        f"Command: `python benchmarks/bench_speed_caps.py {' '.join(sys.argv[1:])}`", "",
        "Random weights, native size, `speed` placement; onnxruntime CPU, 1 thread, batch 1; each latency is the "
        f"median over {args.repeats} runs of the median of {args.rounds} alternated rounds. \"without\" variants "
        "bypass the activation (timing only: the function changes). Activation cost = model − its variant without "
        "the activation. Budget = what the int8 activations may cost for fp32/int8 = 1.5× (fp32 / 1.5 − int8 without "
        "them). Last column: the ratio if the int8 activations cost exactly what the float model pays for them.", "",
        "| model | activation | fp32 ms | int8 ms (ratio) | int8 without it, ms | its cost in fp32, ms | its cost in int8, ms "
        "| budget for 1.5×, ms | ratio if int8 paid the float cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines += _rows(r)
    text = "\n".join(lines) + "\n"
    write_section(args.out, text, "bench_speed_caps")
    print(text)


if __name__ == "__main__":
    main()
