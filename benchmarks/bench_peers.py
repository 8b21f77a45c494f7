"""Side-by-side W8A8 benchmark: vitcompress minmax vs onnxruntime quantize_static vs NNCF (ONNX).

Every tool gets the same calibration tensor (seeded sample of the train split) and every
artifact is evaluated in one pass over the same validation images, in onnxruntime; latencies are
timed alternately in one process (benchmarks notes: ratios of medians, 1 thread, batch 1).

    python benchmarks/bench_peers.py --out benchmarks/RESULTS.md
    python benchmarks/bench_peers.py --skip-zoo --speed-models deit_tiny_patch16_224 --section NAME  # a subset, its own section
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

from common import ROOT, add_io_arguments, write_section  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress import QuantConfig, QuantizeJob, load, quantize  # noqa: E402
from vitcompress.data import load_tensor, label_map_to_model, sample, scan_images  # noqa: E402
from vitcompress.evaluate import collect_logits, fidelity, onnx_predictor, summarize  # noqa: E402
from vitcompress.export import compare_latency, int8_coverage, make_session  # noqa: E402

ZOO_MODELS = ["cifar10_vit_tiny", "cifar10_mobilevit_xxs", "cifar10_mobilevitv2_050"]
SPEED_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "mobilevitv2_050", "mobilevitv2_100",
                "efficientformerv2_s0", "efficientformer_l1"]
# vitcompress rows: tool name -> placement (see vitcompress/quant/placement.py)
OURS = {"vitcompress": "partial", "vitcompress speed": "speed"}
PEERS = ["onnxruntime", "onnxruntime tuned", "nncf"]
TOOLS = [*OURS, *PEERS]


def ort_quantize_static(fp32: Path, out: Path, calib: torch.Tensor, tuned: bool = False) -> Path:
    """onnxruntime's quantize_static with its defaults, or ``tuned``: the best settings we found for
    its CPU kernels (shape pre-processing, per-channel weights, uint8 activations, removable
    activations kept quantized) -- so the comparison is not against a strawman."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x[None].numpy()} for x in calib])

        def get_next(self):
            return next(self.it, None)

    if not tuned:
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ)
        return out
    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception:  # its symbolic shape inference gives up on some graphs (MobileViTv2's Col2Im)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"QDQKeepRemovableActivations": True})
    pre.unlink()
    return out


def nncf_quantize(fp32: Path, out: Path, calib: torch.Tensor) -> Path:
    import nncf

    model = onnx.load(str(fp32))
    dataset = nncf.Dataset([{"input": x[None].numpy()} for x in calib])
    q = nncf.quantize(model, dataset, subset_size=len(calib))
    onnx.save(q, str(out))
    return out


def run_model(tag: str, workdir: Path, calib_dir: Path, calib_size: int, eval_dir: Path | None,
              model: str | None = None, checkpoint: Path | None = None, rounds: int = 30) -> dict:
    out = workdir / tag
    files, walls = {}, {}
    for tool, placement in OURS.items():
        t0 = time.perf_counter()
        job = QuantizeJob(out=out / placement, model=model, checkpoint=checkpoint, pretrained=checkpoint is not None,
                          config=QuantConfig(placement=placement), calib_dir=calib_dir, calib_size=calib_size,
                          latency_rounds=3, force=True)
        quantize(job)
        walls[tool] = time.perf_counter() - t0
        files.setdefault("fp32", out / placement / "model.fp32.onnx")
        files[tool] = out / placement / "model.int8.onnx"
    loaded = load(model, checkpoint, pretrained=checkpoint is not None)
    calib = load_tensor(sample(scan_images(calib_dir), calib_size, 0), loaded.preprocessing)
    peers = {"onnxruntime": ort_quantize_static, "onnxruntime tuned": lambda *a: ort_quantize_static(*a, tuned=True),
             "nncf": nncf_quantize}
    for name, fn in peers.items():
        t0 = time.perf_counter()
        # Peers drop temporary files (uuid-named external data) into the working directory.
        with contextlib.chdir(out):
            files[name] = fn(files["fp32"].resolve(), (out / f"model.{name.replace(' ', '_')}.onnx").resolve(), calib)
        walls[name] = time.perf_counter() - t0
    row: dict = {"tag": tag, "arch": loaded.arch, "walls": walls, "sizes": {k: p.stat().st_size for k, p in files.items()}}
    row["coverage"] = {k: int8_coverage(p)["integer_mac_share"] for k, p in files.items() if k != "fp32"}
    row["latency"] = compare_latency(files, (1, *loaded.preprocessing.input_size), threads=1, rounds=rounds)
    row["latency2"] = compare_latency(files, (1, *loaded.preprocessing.input_size), threads=2, rounds=rounds)
    if eval_dir is not None:
        eval_set = scan_images(eval_dir, require_labels=True)
        label_map = label_map_to_model(eval_set, loaded.preprocessing.class_names, loaded.num_classes)
        preds = {k: onnx_predictor(make_session(p)) for k, p in files.items()}
        logits, labels, _ = collect_logits(preds, eval_set, loaded.preprocessing, 100)
        row["accuracy"] = {k: summarize(v, labels, label_map, loaded.num_classes)["top1"] for k, v in logits.items()}
        row["agreement"] = {k: fidelity(logits["fp32"], v)["top1_agreement"] for k, v in logits.items() if k != "fp32"}
        row["images"] = int(len(labels))
    return row


def _fmt_table(rows: list[dict], with_accuracy: bool) -> list[str]:
    tools = TOOLS
    head = "| model | tool | "
    head += "top-1 % | drop | agreement % | " if with_accuracy else ""
    head += "fp32/int8 latency, 1 thread | 2 threads | int8 MAC share | size MB | quantize wall s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if with_accuracy:
            lines.append(f"| {r['tag']} | fp32 | {r['accuracy']['fp32']:.2f} | – | – | 1.00× | 1.00× | – | "
                         f"{r['sizes']['fp32'] / 1e6:.2f} | – |")
        for t in tools:
            ratio = r["latency"]["fp32"]["median_ms"] / r["latency"][t]["median_ms"]
            ratio2 = r["latency2"]["fp32"]["median_ms"] / r["latency2"][t]["median_ms"]
            cells = f"| {r['tag']} | {t} | "
            if with_accuracy:
                drop = r["accuracy"]["fp32"] - r["accuracy"][t]
                cells += f"{r['accuracy'][t]:.2f} | {drop:.2f} | {r['agreement'][t]:.2f} | "
            cells += (f"{ratio:.2f}× | {ratio2:.2f}× | {100 * r['coverage'][t]:.0f}% | {r['sizes'][t] / 1e6:.2f} | {r['walls'][t]:.1f} |")
            lines.append(cells)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_io_arguments(ap)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--skip-speed", action="store_true", help="skip the 224-px random-weight models")
    ap.add_argument("--speed-models", nargs="+", default=SPEED_MODELS, metavar="MODEL",
                    help="the random-weight models to time (default: all six of the speed issue)")
    ap.add_argument("--skip-zoo", action="store_true", help="skip the reference models (accuracy rows)")
    ap.add_argument("--section", default="bench_peers",
                    help="RESULTS.md section to write (a re-run of a subset goes to a section of its own)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    zoo, data = args.shared / "zoo", args.shared / "data" / "cifar10"
    if not zoo.is_dir():
        sys.exit(f"error: {zoo} not found (the benchmark needs the shared reference models and images)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        acc_rows = [] if args.skip_zoo else [
            run_model(z, work, data / "train", args.calib_size, data / "val", checkpoint=zoo / f"{z}.pth",
                      rounds=args.rounds) for z in ZOO_MODELS]
        speed_rows = [] if args.skip_speed else [
            run_model(m, work, data / "train", 32, None, model=m, rounds=args.rounds) for m in args.speed_models]
    import nncf
    import onnxruntime
    import timm

    flags = subprocess.run(["bash", "-c", "lscpu | grep -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni|amx_int8' | sort -u | tr '\\n' ' '"],
                           capture_output=True, text=True).stdout.strip()
    lines = [
        "## W8A8 side by side: vitcompress minmax vs onnxruntime quantize_static vs NNCF"
        + ("" if args.section == "bench_peers" else f" (re-run of a subset: {args.section})"), "",
        f"Command: `python {' '.join(['benchmarks/bench_peers.py', *sys.argv[1:]])}` (`make bench` runs it with "
        f"`--out benchmarks/RESULTS.md` alone) — {dt.date.today().isoformat()}", "",
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, nncf {nncf.__version__}, timm {timm.__version__}, "
        f"python {platform.python_version()}; CPU flags: {flags}", "",
        f"Calibration: {args.calib_size} images sampled (seed 0) from `shared/data/cifar10/train`, the same tensor for every tool. "
        "Accuracy: all of `shared/data/cifar10/val`, each exported ONNX file run in onnxruntime. "
        "Latency: onnxruntime CPU, 1 (then 2) intra-op threads, batch 1, median of "
        f"{args.rounds} alternated runs after 5 warm-ups; ratio = fp32 median / int8 median (> 1 is faster). "
        "fp32: the plain torch export (no onnxsim), which every tool quantizes. "
        "int8 MAC share: MACs of MatMul/Gemm/Conv that onnxruntime's optimized graph runs in integer kernels. "
        "Peers use their defaults (onnxruntime: QDQ, per-tensor S8S8 MinMax; NNCF: default preset, ONNX backend); "
        "`onnxruntime tuned` adds its shape pre-processing, per-channel weights, uint8 activations and "
        "QDQKeepRemovableActivations (the fastest settings we found for it). "
        "vitcompress: per-channel symmetric int8 weights, per-tensor asymmetric uint8 activations (with VNNI, "
        "the second operand of attention products on the int8 grid, run with the session entry the artifact's "
        "metadata names; every other artifact runs with onnxruntime's defaults, the peers' fastest); placement "
        "`partial` quantizes Linear/Conv inputs (everything else float); `vitcompress speed` (placement `speed`) also "
        "quantizes conv outputs, the sigmoid of SiLUs and the attention products so onnxruntime fuses integer chains "
        "(a 3×3 RGB stem conv float, a patch embedding quantized).", "",
    ]
    if acc_rows:
        lines += ["### Reference models (CIFAR-10, 32 px): accuracy and speed", "", *_fmt_table(acc_rows, True), ""]
    if speed_rows:
        lines += ["### timm models at native size, random weights: speed only", "", *_fmt_table(speed_rows, False), ""]
    text = "\n".join(lines) + "\n"
    write_section(args.out, text, args.section)
    print(text)


if __name__ == "__main__":
    main()
