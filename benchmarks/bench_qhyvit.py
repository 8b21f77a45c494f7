"""Q-HyViT on the hybrid reference models, side by side with min-max, onnxruntime and NNCF.

Every row is an exported ONNX file evaluated in onnxruntime on the same validation images, after
calibration on the same seeded sample of the train split. Also: the paper's ablation (scale
search only -> + granularity -> + scheme -> + bridge-block reconstruction) and the search's wall
time on this machine.

    python benchmarks/bench_qhyvit.py --out benchmarks/RESULTS.md [--calib-sizes 32 128] [--bits 8 6 4]
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, add_io_arguments, write_section  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

import bench_peers  # noqa: E402
from vitcompress import QuantConfig, QuantizeJob, load, quantize  # noqa: E402
from vitcompress.data import label_map_to_model, load_tensor, sample, scan_images  # noqa: E402
from vitcompress.evaluate import collect_logits, fidelity, onnx_predictor, summarize  # noqa: E402
from vitcompress.export import make_session  # noqa: E402

MODELS = ["cifar10_mobilevit_xxs", "cifar10_mobilevitv2_050"]
_OURS_OFF = {"crossfit": False, "keep_best_round": False, "gptq": False, "bias_correction": False, "scale_tuning_steps": 0}
_OFF = {"search_granularity": False, "search_scheme": False, "activation_granularity": "none",
        "bridge_reconstruction": False, **_OURS_OFF}
_NATURAL = {"crossfit": False, "gptq_act_order": False}  # GPTQ rows before the cross-fit and act-order
ABLATION = [
    ("scale search only", _OFF),
    ("+ weight granularity", {**_OFF, "search_granularity": True}),
    ("+ activation granularity (depthwise inputs)", {**_OFF, "search_granularity": True, "activation_granularity": "depthwise"}),
    ("+ scheme", {**_OFF, "search_granularity": True, "activation_granularity": "depthwise", "search_scheme": True}),
    ("+ bridge-block reconstruction (the paper's method)", _OURS_OFF),
    ("+ best round by calibration KL (ours)", {**_OURS_OFF, "keep_best_round": True}),
    ("+ GPTQ weight rounding (ours)", {**_NATURAL, "bias_correction": False, "scale_tuning_steps": 0, "gptq_target": "own"}),
    ("+ bias correction (ours)", {**_NATURAL, "scale_tuning_steps": 0, "gptq_target": "own"}),
    ("+ activation-scale tuning (ours)", {**_NATURAL, "gptq_target": "own"}),
    ("+ GPTQ towards the float model's outputs (ours; the default below 8 bits)", _NATURAL),
    ("+ activation candidates scored by 2-fold cross-fit (ours)", {"gptq_act_order": False}),
    ("+ GPTQ act-order (ours; the default)", {}),
]


def _run(work: Path, tag: str, ckpt: Path, calib_dir: Path, n: int, cfg: QuantConfig) -> tuple[Path, float, dict]:
    r = quantize(QuantizeJob(out=work / tag, checkpoint=ckpt, config=cfg, calib_dir=calib_dir, calib_size=n,
                             latency_rounds=3, force=True))
    return work / tag / r["artifacts"]["quantized"]["path"], r["quantization"]["seconds"], r


def main() -> None:
    ap = argparse.ArgumentParser()
    add_io_arguments(ap)
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS,
                    help="one section of RESULTS.md per model, so models can run in separate processes")
    ap.add_argument("--calib-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--eval-size", type=int, default=None, help="seeded subset of val (default: all 5,000)")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--no-table", action="store_true", help="only the ablation (no min-max/peer/bit-width table)")
    ap.add_argument("--ablation-rows", type=int, nargs="+", default=None,
                    help="1-based rows of the ablation to run (default: all); the runs are deterministic")
    ap.add_argument("--work", type=Path, default=None, help="keep each run's output folder here (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.shared / "data" / "cifar10"
    head = [f"Command: `python benchmarks/bench_qhyvit.py {' '.join(sys.argv[1:])}` — {dt.date.today().isoformat()}. "
             "Partial quantization (Linear/Conv weights and inputs), BatchNorm folded, exported QDQ ONNX evaluated in "
             f"onnxruntime on {'all' if args.eval_size is None else args.eval_size} `cifar10/val` images; calibration "
             "images sampled (seed 0) from `cifar10/train`, identical for every tool. onnxruntime/NNCF: 8-bit only, "
             "their defaults. Q-HyViT: 40 scale candidates, 3 rounds. Agreement = top-1 agreement with the float ONNX. "
             "Wall: the method itself (calibration and search; `quantization.seconds` of the report), "
             f"{args.threads} torch thread(s) on this 2-core machine.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for z in args.models:
            lines = [f"## Q-HyViT on {z}", ""] + head
            ckpt = args.shared / "zoo" / f"{z}.pth"
            loaded = load(checkpoint=ckpt)
            eval_set = sample(scan_images(data / "val", require_labels=True), args.eval_size, 0)
            label_map = label_map_to_model(eval_set, loaded.preprocessing.class_names, loaded.num_classes)
            rows = []  # (calib, method, bits, path, wall)
            fp32 = None
            for n in ([] if args.no_table else args.calib_sizes):
                for bits in args.bits:
                    for method in ("minmax", "qhyvit"):
                        cfg = QuantConfig(method=method, wbits=bits, abits=bits)
                        path, wall, r = _run(work, f"{z}_{n}_{method}_{bits}", ckpt, data / "train", n, cfg)
                        fp32 = fp32 or path.parent / "model.fp32.onnx"
                        rows.append((n, method, f"W{bits}A{bits}", path, wall))
                calib = load_tensor(sample(scan_images(data / "train"), n, 0), loaded.preprocessing)
                for name, fn in (("onnxruntime", bench_peers.ort_quantize_static), ("nncf", bench_peers.nncf_quantize)):
                    t0 = time.perf_counter()
                    path = fn(fp32, work / f"{z}_{n}_{name}.onnx", calib)
                    rows.append((n, name, "W8A8", path, time.perf_counter() - t0))
            ablation = []
            if not args.no_ablation:
                for i, (label, opts) in enumerate(ABLATION, 1):
                    if args.ablation_rows and i not in args.ablation_rows:
                        continue
                    cfg = QuantConfig(method="qhyvit", wbits=6, abits=6, method_options=opts)
                    path, wall, _ = _run(work, f"{z}_abl_{i}", ckpt, data / "train", args.calib_sizes[0], cfg)
                    fp32 = fp32 or path.parent / "model.fp32.onnx"
                    ablation.append((f"{i}. {label}", path, wall))
            files = {"fp32": fp32, **{f"r{i}": r[3] for i, r in enumerate(rows)}, **{f"a{i}": a[1] for i, a in enumerate(ablation)}}
            logits, labels, _ = collect_logits({k: onnx_predictor(make_session(p)) for k, p in files.items()},
                                               eval_set, loaded.preprocessing, 100)
            top1 = {k: summarize(v, labels, label_map, loaded.num_classes)["top1"] for k, v in logits.items()}
            close = {k: fidelity(logits["fp32"], v) for k, v in logits.items()}
            agree = {k: c["top1_agreement"] for k, c in close.items()}
            lines += [f"### {z} (float {top1['fp32']:.2f})", ""]
            lines += [] if args.no_table else [
                      "| calib images | method | bits | top-1 | drop | agreement % | wall s |", "|---|---|---|---|---|---|---|"]
            for i, (n, method, bits, _, wall) in enumerate(rows):
                k = f"r{i}"
                lines.append(f"| {n} | {method} | {bits} | {top1[k]:.2f} | {top1['fp32'] - top1[k]:.2f} | {agree[k]:.2f} | {wall:.0f} |")
            if ablation:
                lines += ["", f"Ablation at W6A6, {args.calib_sizes[0]} calibration images:", "",
                          "| step | top-1 | drop | agreement % | val KL | wall s |", "|---|---|---|---|---|---|"]
                for i, (label, _, wall) in enumerate(ablation):
                    k = f"a{i}"
                    lines.append(f"| {label} | {top1[k]:.2f} | {top1['fp32'] - top1[k]:.2f} | {agree[k]:.2f} | "
                                 f"{close[k]['kl']:.5f} | {wall:.0f} |")
            text = "\n".join(lines) + "\n"
            write_section(args.out, text, f"bench_qhyvit_{z}")
            print(text, flush=True)


if __name__ == "__main__":
    main()
