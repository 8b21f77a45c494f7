"""Side-by-side W8A8 benchmark on both runtimes: vitcompress (default and each placement) vs
onnxruntime quantize_static vs NNCF (ONNX, and OpenVINO-targeted), one section per CPU ISA.

Every tool gets the same calibration tensor (seeded sample of the train split) and every
artifact is evaluated in one pass over the same validation images on each runtime; latencies of
every (file, runtime) pair are timed alternately in one process (ratios of medians, 1 thread,
batch 1), against each runtime's fp32 and against the fastest fp32.

    python benchmarks/bench_peers.py --out benchmarks/RESULTS.md
    python benchmarks/bench_peers.py --skip-zoo --speed-models deit_tiny_patch16_224 --section NAME  # a subset, its own section
"""
from __future__ import annotations

import argparse
import contextlib
import pickle
import datetime as dt
import platform
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
from vitcompress.cpu import this_cpu  # noqa: E402
from vitcompress.errors import VitcompressError  # noqa: E402
from vitcompress.quant.placement import CANDIDATES  # noqa: E402
from vitcompress.export import compare_latency, int8_coverage, open_session  # noqa: E402

ZOO_MODELS = ["cifar10_vit_tiny", "cifar10_mobilevit_xxs", "cifar10_mobilevitv2_050"]
SPEED_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "mobilevitv2_050", "mobilevitv2_100",
                "efficientformerv2_s0", "efficientformer_l1"]
# vitcompress rows: tool name -> (placement or candidate, the runtime its quantize job measures on);
# "default" is what the CLI does without a placement flag (see vitcompress/quant/placement.py)
OURS = {"vitcompress default": ("default", "onnxruntime"), "vitcompress default --runtime openvino": ("default", "openvino"),
        "vitcompress partial": ("partial", "onnxruntime"), "vitcompress speed": ("speed", "onnxruntime"),
        "vitcompress linear": ("linear", "onnxruntime"), "vitcompress matmul-int8": ("matmul-int8", "openvino"),
        "vitcompress eltwise": ("eltwise", "openvino")}
ONNX_PEERS = ["onnxruntime", "onnxruntime tuned", "nncf onnx"]
RUNTIMES = ["onnxruntime", "openvino"]
# (tool, runtime) rows: every QDQ ONNX file on both runtimes, but a file made for one runtime (the
# default on OpenVINO, NNCF's OpenVINO IR) only on that one
ROWS = ([(t, rt) for t, (_, job_rt) in OURS.items() for rt in RUNTIMES if t == "vitcompress default" or job_rt == "onnxruntime"
         or rt == job_rt] + [(t, rt) for t in ONNX_PEERS for rt in RUNTIMES] + [("nncf openvino", "openvino")])


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


def nncf_openvino_quantize(fp32: Path, out: Path, calib: torch.Tensor) -> Path:
    """NNCF's OpenVINO-targeted flow, as its docs give it: convert to OpenVINO IR, quantize, save."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32))
    dataset = nncf.Dataset([x[None].numpy() for x in calib])
    q = nncf.quantize(model, dataset, subset_size=len(calib))
    xml = out.with_suffix(".xml")
    ov.save_model(q, str(xml))
    return xml


def _size(path: Path) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def run_model(tag: str, workdir: Path, calib_dir: Path, calib_size: int, eval_dir: Path | None,
              model: str | None = None, checkpoint: Path | None = None, rounds: int = 30, cache: Path | None = None,
              min_seconds: float = 0.0) -> dict:
    """One model's row; with ``cache``, a row measured before (same tag) is read back instead."""
    cached = cache / f"{tag}.pkl" if cache else None
    if cached is not None and cached.exists():
        return pickle.loads(cached.read_bytes())
    row = _measure_model(tag, workdir, calib_dir, calib_size, eval_dir, model, checkpoint, rounds, min_seconds)
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(pickle.dumps(row))
    return row


def _measure_model(tag: str, workdir: Path, calib_dir: Path, calib_size: int, eval_dir: Path | None,
                   model: str | None, checkpoint: Path | None, rounds: int, min_seconds: float) -> dict:
    out = workdir / tag
    files, walls, chosen, failed_tools = {}, {}, {}, {}
    for tool, (placement, runtime) in OURS.items():
        t0 = time.perf_counter()
        folder = out / f"{placement}_{runtime}"
        candidate = CANDIDATES.get(placement)
        config = (QuantConfig(placement=candidate.placement, act_symmetric=candidate.act_symmetric) if candidate
                  else QuantConfig(placement=placement))
        job = QuantizeJob(out=folder, model=model, checkpoint=checkpoint, pretrained=checkpoint is not None,
                          config=config, calib_dir=calib_dir, calib_size=calib_size,
                          latency_rounds=rounds if placement == "default" else 3, force=True, runtime=runtime)
        # no eval_dir: the default chooses on held-out train images, never on the val it is reported on
        try:
            report = quantize(job)
        except VitcompressError as e:  # e.g. no candidate keeps the budget: a row that says so
            failed_tools[tool] = str(e)[:160]
            continue
        if placement == "default":
            chosen[tool] = report["placement_auto"]["chosen"]
        walls[tool] = time.perf_counter() - t0
        files.setdefault("fp32", folder / "model.fp32.onnx")
        files[tool] = folder / "model.int8.onnx"
    loaded = load(model, checkpoint, pretrained=checkpoint is not None)
    calib = load_tensor(sample(scan_images(calib_dir), calib_size, 0), loaded.preprocessing)
    peers = {"onnxruntime": ort_quantize_static, "onnxruntime tuned": lambda *a: ort_quantize_static(*a, tuned=True),
             "nncf onnx": nncf_quantize, "nncf openvino": nncf_openvino_quantize}
    for name, fn in peers.items():
        t0 = time.perf_counter()
        # Peers drop temporary files (uuid-named external data) into the working directory.
        with contextlib.chdir(out):
            files[name] = fn(files["fp32"].resolve(), (out / f"model.{name.replace(' ', '_')}.onnx").resolve(), calib)
        walls[name] = time.perf_counter() - t0
    row: dict = {"tag": tag, "arch": loaded.arch, "walls": walls, "chosen": chosen,
                 "sizes": {k: _size(p) for k, p in files.items()},
                 "failed": {(t, rt): f"quantize failed: {failed_tools[t]}" for t, rt in ROWS if t in failed_tools}}
    entries = {("fp32", rt): (files["fp32"], rt) for rt in RUNTIMES} | {(t, rt): (files[t], rt) for t, rt in ROWS if t in files}
    for key, (path, rt) in list(entries.items()):  # a file a runtime cannot load is a row that says so, not a crash
        try:
            open_session(path, rt, 1)
        except VitcompressError as e:
            row["failed"][key] = f"{rt} cannot load it: " + (str(e).split(": ", 2)[-1][:80] or "?")
            del entries[key]
    row["coverage"] = {(t, rt): int8_coverage(files[t], rt)["integer_mac_share"] for t, rt in ROWS
                       if (t, rt) in entries and files[t].suffix == ".onnx"}
    lat = compare_latency({f"{t}@{rt}": v for (t, rt), v in entries.items()}, (1, *loaded.preprocessing.input_size),
                          threads=1, rounds=rounds, min_seconds=min_seconds)
    row["latency"] = {key: lat[f"{key[0]}@{key[1]}"]["median_ms"] for key in entries}
    row["versions"] = {rt: lat[f"fp32@{rt}"]["runtime"]["version"] for rt in RUNTIMES}
    if eval_dir is not None:
        eval_set = scan_images(eval_dir, require_labels=True)
        label_map = label_map_to_model(eval_set, loaded.preprocessing.class_names, loaded.num_classes)
        preds = {key: onnx_predictor(open_session(p, rt)) for key, (p, rt) in entries.items()}
        logits, labels, _ = collect_logits(preds, eval_set, loaded.preprocessing, 100)
        row["accuracy"] = {k: summarize(v, labels, label_map, loaded.num_classes)["top1"] for k, v in logits.items()}
        row["agreement"] = {(t, rt): fidelity(logits[("fp32", rt)], logits[(t, rt)])["top1_agreement"] for t, rt in ROWS
                            if (t, rt) in entries}
        row["images"] = int(len(labels))
    return row


def _fmt_table(rows: list[dict], with_accuracy: bool) -> list[str]:
    head = "| model | tool | runtime | "
    head += "top-1 % | drop | agreement % | " if with_accuracy else ""
    head += "fp32/int8, same runtime | vs fastest fp32 | int8 MAC share | size MB | quantize wall s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lat = r["latency"]
        best_fp32 = min(lat[("fp32", rt)] for rt in RUNTIMES)
        for rt in RUNTIMES:
            cells = f"| {r['tag']} | fp32 | {rt} | "
            if with_accuracy:
                cells += f"{r['accuracy'][('fp32', rt)]:.2f} | – | – | "
            lines.append(cells + f"1.00× | {best_fp32 / lat[('fp32', rt)]:.2f}× | – | {r['sizes']['fp32'] / 1e6:.2f} | – |")
        for t, rt in ROWS:
            name = f"{t} ({r['chosen'][t]})" if t in r["chosen"] else t
            cells = f"| {r['tag']} | {name} | {rt} | "
            if (t, rt) in r["failed"]:
                lines.append(cells + f"{'– | – | – | ' if with_accuracy else ''}{r['failed'][(t, rt)]} | | | | |")
                continue
            if with_accuracy:
                acc = r["accuracy"][(t, rt)]
                cells += f"{acc:.2f} | {r['accuracy'][('fp32', rt)] - acc:.2f} | {r['agreement'][(t, rt)]:.2f} | "
            cov = r["coverage"].get((t, rt))
            cells += (f"{lat[('fp32', rt)] / lat[(t, rt)]:.2f}× | {best_fp32 / lat[(t, rt)]:.2f}× | "
                      f"{'–' if cov is None else f'{100 * cov:.0f}%'} | {r['sizes'][t] / 1e6:.2f} | {r['walls'][t]:.1f} |")
            lines.append(cells)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_io_arguments(ap)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--min-seconds", type=float, default=20.0,
                    help="more rounds where needed for one model's alternated timing to last about this long (a 32-px "
                         "model runs in under a millisecond: 30 rounds of it swing the ratios by about 10 %%)")
    ap.add_argument("--skip-speed", action="store_true", help="skip the 224-px random-weight models")
    ap.add_argument("--speed-models", nargs="+", default=SPEED_MODELS, metavar="MODEL",
                    help="the random-weight models to time (default: all six of the speed issue)")
    ap.add_argument("--skip-zoo", action="store_true", help="skip the reference models (accuracy rows)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep each model's measured row here and read it back on a re-run (pickles this script wrote)")
    ap.add_argument("--section", default=None,
                    help="RESULTS.md section to write (default bench_peers_<ISA>: one table per CPU ISA; a re-run of a "
                         "subset goes to a section of its own)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cpu = this_cpu()
    section = args.section or f"bench_peers_{cpu['isa']}"
    zoo, data = args.shared / "zoo", args.shared / "data" / "cifar10"
    if not zoo.is_dir():
        sys.exit(f"error: {zoo} not found (the benchmark needs the shared reference models and images)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        acc_rows = [] if args.skip_zoo else [
            run_model(z, work, data / "train", args.calib_size, data / "val", checkpoint=zoo / f"{z}.pth",
                      rounds=args.rounds, cache=args.cache, min_seconds=args.min_seconds) for z in ZOO_MODELS]
        speed_rows = [] if args.skip_speed else [
            run_model(m, work, data / "train", 32, None, model=m, rounds=args.rounds, cache=args.cache,
                      min_seconds=args.min_seconds) for m in args.speed_models]
    import nncf
    import onnxruntime
    import openvino
    import timm

    lines = [
        f"## W8A8 side by side on {cpu['model']} ({cpu['isa']}): vitcompress vs onnxruntime quantize_static vs NNCF, "
        "on onnxruntime and OpenVINO" + ("" if args.section is None else f" (re-run of a subset: {args.section})"), "",
        f"Command: `python {' '.join(['benchmarks/bench_peers.py', *sys.argv[1:]])}` (`make bench` runs it with "
        f"`--out benchmarks/RESULTS.md` alone) — {dt.date.today().isoformat()}", "",
        f"CPU: {cpu['model']}, int8 ISA {cpu['isa']} (int8 products accumulated in int32: {cpu['int32_dot']}); "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}, "
        f"nncf {nncf.__version__}, timm {timm.__version__}, python {platform.python_version()}.", "",
        f"Calibration: {args.calib_size} images sampled (seed 0) from `shared/data/cifar10/train`, the same tensor for every tool. "
        "Accuracy: all of `shared/data/cifar10/val`, each file run in the runtime of its row (agreement and drop against "
        "the fp32 file on the same runtime). "
        f"Latency: 1 intra-op thread, batch 1, median of at least {args.rounds} alternated runs of every (file, runtime) pair "
        f"in one process after 5 warm-ups, and as many more as make about {args.min_seconds:g} s of timed rounds per model; `fp32/int8, same runtime` = that runtime's fp32 median / the row's median; `vs fastest "
        "fp32` = the faster fp32 of the two runtimes / the row's median (> 1 is faster). OpenVINO compiles with "
        "INFERENCE_PRECISION_HINT=f32 (fp32 stays fp32 on bf16-capable CPUs), PERFORMANCE_HINT=LATENCY, one stream. "
        "int8 MAC share: MACs of MatMul/Gemm/Conv that the row's runtime runs on integer kernels (onnxruntime: its "
        "optimized graph; OpenVINO: its execution graph's u8/i8 layers). "
        "Peers use their defaults (onnxruntime: QDQ, per-tensor S8S8 MinMax; NNCF: default preset, ONNX backend, and "
        "`nncf openvino`: the model converted to OpenVINO IR and quantized by NNCF's OpenVINO backend, timed in OpenVINO); "
        "`onnxruntime tuned` adds its shape pre-processing, per-channel weights, uint8 activations and "
        "QDQKeepRemovableActivations (the fastest settings we found for it). "
        "vitcompress: per-channel symmetric int8 weights, per-tensor asymmetric uint8 activations, `--target-cpu auto`; "
        "`vitcompress default` is what `vitcompress quantize` does without a placement flag (the placement it chose in "
        "brackets, judged on held-out train images, never on val); the other rows force one placement "
        "(see docs/quantization.md; `matmul-int8`: Linear/Conv and attention products with signed symmetric int8 "
        "activations, a candidate of the default on OpenVINO; `eltwise`: `partial` plus the attention products and "
        "signed int8 operands of residual adds, attention products and norms, where the placement knows the block "
        "(MobileViT v2), norm inputs elsewhere).", "",
    ]
    if acc_rows:
        lines += ["### Reference models (CIFAR-10, 32 px): accuracy and speed", "", *_fmt_table(acc_rows, True), ""]
    if speed_rows:
        lines += ["### timm models at native size, random weights: speed only", "", *_fmt_table(speed_rows, False), ""]
    text = "\n".join(lines) + "\n"
    write_section(args.out, text, section)
    print(text)


if __name__ == "__main__":
    main()
