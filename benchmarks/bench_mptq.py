"""MPTQ-ViT on the CIFAR-10 ViT reference: min-max vs MPTQ at W8A8/W6A6/W4A4, greedy mixed precision at
6 and 5 average bits, the W4A4 ablation (min-max -> +SQ-b -> +OPT-m -> +range search), and full
quantization (--full) at 5 bits. Every row is one run of the `quantize` pipeline on the same calibration
images, measured on the exported ONNX artifact in onnxruntime over the same validation images.

    python benchmarks/bench_mptq.py --out benchmarks/RESULTS.md [--eval-size N] [--calib-size 128]
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, add_io_arguments, write_section  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

import bench_peers  # noqa: E402  (the peers, run as the peers benchmark runs them)
from vitcompress import QuantConfig, QuantizeJob, quantize  # noqa: E402

FULL = {"placement": "partial+matmul"}

# (group, row label, QuantConfig kwargs)
RUNS: list[tuple[str, str, dict]] = [  # most informative first: the section is rewritten after every run
    ("uniform", "minmax W4A4", dict(wbits=4, abits=4)),
    ("uniform", "mptq W4A4", dict(method="mptq", wbits=4, abits=4)),
    ("uniform", "minmax W6A6", dict(wbits=6, abits=6)),
    ("uniform", "mptq W6A6", dict(method="mptq", wbits=6, abits=6)),
    ("mixed", "mptq greedy MP, 5 avg bits", dict(method="mptq", method_options={"target_bits": 5})),
    ("uniform", "mptq W5A5", dict(method="mptq", wbits=5, abits=5)),
    ("ablation", "+ SQ-b", dict(method="mptq", wbits=4, abits=4, method_options={"parts": ["sqb"]})),
    ("ablation", "+ SQ-b + OPT-m (the paper's parts)", dict(method="mptq", wbits=4, abits=4, method_options={"parts": ["sqb", "optm"]})),
    ("ablation", "+ SQ-b + OPT-m + SQ-b on v->proj (ours)", dict(method="mptq", wbits=4, abits=4,
                                                                method_options={"parts": ["sqb", "optm", "sqb-v"]})),
    ("ablation", "+ SQ-b + OPT-m + SQ-b on v->proj + range search (ours)",
     dict(method="mptq", wbits=4, abits=4, method_options={"parts": ["sqb", "optm", "sqb-v", "range"]})),
    ("ablation", "minmax W4A4 with a 4-bit image input (the default keeps it 8-bit)", dict(wbits=4, abits=4, image_input_bits=4)),
    ("mixed", "mptq greedy MP, 6 avg bits", dict(method="mptq", method_options={"target_bits": 6})),
    ("uniform", "minmax W5A5", dict(wbits=5, abits=5)),
    ("full", "full minmax W5A5", dict(method="mptq", wbits=5, abits=5, **FULL, method_options={"full": True, "parts": []})),
    ("full", "full mptq W5A5", dict(method="mptq", wbits=5, abits=5, **FULL, method_options={"full": True})),
    ("full", "full mptq greedy MP, 5 avg bits", dict(method="mptq", **FULL, method_options={"full": True, "target_bits": 5})),
    ("uniform", "minmax W8A8", dict(wbits=8, abits=8)),
    ("uniform", "mptq W8A8", dict(method="mptq", wbits=8, abits=8)),
    ("peers", "onnxruntime W8A8 (defaults)", dict(peer="onnxruntime")),
    ("peers", "NNCF W8A8, model_type=TRANSFORMER (SmoothQuant on)", dict(peer="nncf", smooth_quant=True)),
    ("peers", "NNCF W8A8, model_type=TRANSFORMER, SmoothQuant off", dict(peer="nncf", smooth_quant=False)),
]


def nncf_transformer(fp32: Path, out: Path, calib: torch.Tensor, smooth_quant: bool) -> Path:
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    dataset = nncf.Dataset([{"input": x[None].numpy()} for x in calib])
    advanced = None if smooth_quant else AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))  # a negative alpha switches SmoothQuant off
    q = nncf.quantize(onnx.load(str(fp32)), dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib),
                      advanced_parameters=advanced)
    onnx.save(q, str(out))
    return out


def run_peer(label: str, kwargs: dict, work: Path, ckpt: Path, calib_dir: Path, val: Path, calib_size: int,
             eval_size: int | None) -> dict:
    """A peer's W8A8 artifact of the same fp32 export, calibrated on the same images, evaluated the same way."""
    from vitcompress import load
    from vitcompress.api import export
    from vitcompress.data import label_map_to_model, load_tensor, sample, scan_images
    from vitcompress.evaluate import collect_logits, fidelity, onnx_predictor, summarize
    from vitcompress.export import int8_coverage, make_session

    t0 = time.perf_counter()
    fp32 = Path(export(work / "fp32", checkpoint=ckpt, force=True)["artifact"])
    loaded = load(checkpoint=ckpt)
    calib = load_tensor(sample(scan_images(calib_dir), calib_size, 0), loaded.preprocessing)
    out = work / f"{label.split()[0]}_{len(list(work.iterdir()))}.onnx"
    if kwargs["peer"] == "onnxruntime":
        bench_peers.ort_quantize_static(fp32, out, calib)
    else:
        nncf_transformer(fp32, out, calib, kwargs["smooth_quant"])
    wall = time.perf_counter() - t0
    eval_set = sample(scan_images(val, require_labels=True), eval_size, 0)
    label_map = label_map_to_model(eval_set, loaded.preprocessing.class_names, loaded.num_classes)
    logits, labels, _ = collect_logits({"fp32": onnx_predictor(make_session(fp32)), "q": onnx_predictor(make_session(out))},
                                       eval_set, loaded.preprocessing, 100)
    top1 = {k: summarize(v, labels, label_map, loaded.num_classes)["top1"] for k, v in logits.items()}
    fid = fidelity(logits["fp32"], logits["q"])
    return {"label": label, "wall": wall, "fp32": top1["fp32"], "top1": top1["q"], "drop": top1["fp32"] - top1["q"],
            "agreement": fid["top1_agreement"], "kl": fid["kl"], "export_vs_torch": None,
            "int_share": int8_coverage(out)["integer_mac_share"], "avg_bits": None, "images": int(len(labels))}


def run(label: str, kwargs: dict, work: Path, ckpt: Path, calib: Path, val: Path, calib_size: int, eval_size: int | None) -> dict:
    if "peer" in kwargs:
        return run_peer(label, kwargs, work, ckpt, calib, val, calib_size, eval_size)
    t0 = time.perf_counter()
    job = QuantizeJob(out=work / label.replace(" ", "_").replace(",", ""), checkpoint=ckpt, config=QuantConfig(**kwargs),
                      calib_dir=calib, calib_size=calib_size, eval_dir=val, eval_size=eval_size, latency_rounds=3, force=True)
    r = quantize(job)
    acc = r["accuracy"]
    mp = r["quantization"].get("mixed_precision") or {}
    return {
        "label": label, "wall": time.perf_counter() - t0, "fp32": acc["fp32"]["top1"], "top1": acc["quantized"]["top1"],
        "drop": acc["drop"], "agreement": acc["top1_agreement"], "kl": acc["kl"], "export_vs_torch": acc["export_vs_torch_agreement"],
        "int_share": r["coverage"]["integer_mac_share"], "avg_bits": mp.get("average_bits"), "images": acc["images"],
    }


def table(rows: list[dict]) -> list[str]:
    lines = ["| run | avg bits | top-1 % | drop | agreement % | KL | ONNX vs torch agreement % | int MAC share | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bits = f"{r['avg_bits']:.3f}" if r["avg_bits"] is not None else "–"
        vs_torch = "–" if r["export_vs_torch"] is None else f"{r['export_vs_torch']:.2f}"
        lines.append(f"| {r['label']} | {bits} | {r['top1']:.2f} | {r['drop']:.2f} | {r['agreement']:.2f} | {r['kl']:.4f} | "
                     f"{vs_torch} | {100 * r['int_share']:.0f}% | {r['wall']:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_io_arguments(ap)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=None, help="seeded sample of the val split (default: all of it)")
    ap.add_argument("--only", default=None, help="comma-separated groups to run (uniform, mixed, ablation, full)")
    ap.add_argument("--match", default=None, help="only the rows whose label contains this text (e.g. W6A6)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ckpt = args.shared / "zoo" / "cifar10_vit_tiny.pth"
    data = args.shared / "data" / "cifar10"
    if not ckpt.is_file():
        sys.exit(f"error: {ckpt} not found (the benchmark needs the shared reference model and images)")
    groups = set(args.only.split(",")) if args.only else None
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for group, label, kwargs in RUNS:
            if (groups and group not in groups) or (args.match and args.match not in label):
                continue
            row = run(label, kwargs, Path(tmp), ckpt, data / "train", data / "val", args.calib_size, args.eval_size)
            rows.setdefault(group, []).append(row)
            print(f"{label}: top-1 {row['top1']:.2f} agreement {row['agreement']:.2f} ({row['wall']:.0f} s)", flush=True)
            write_results(args, rows, done=sum(len(r) for r in rows.values()),
                          total=sum(1 for g, lab, _ in RUNS if (not groups or g in groups) and (not args.match or args.match in lab)))


def write_results(args: argparse.Namespace, rows: dict[str, list[dict]], done: int, total: int) -> None:
    import onnxruntime
    import timm

    flags = subprocess.run(["bash", "-c", "lscpu | grep -o -w -E 'avx2|avx512f|avx512_vnni' | sort -u | tr '\\n' ' '"],
                           capture_output=True, text=True).stdout.strip()
    any_row = next(iter(rows.values()))[0]
    cmd = "python benchmarks/bench_mptq.py --out benchmarks/RESULTS.md" + (f" --eval-size {args.eval_size}" if args.eval_size else "") \
        + (f" --calib-size {args.calib_size}" if args.calib_size != 128 else "") + (f" --only {args.only}" if args.only else "") \
        + (f" --match {args.match}" if args.match else "")
    lines = [
        "## MPTQ-ViT (SQ-b, OPT-m, greedy mixed precision) on cifar10_vit_tiny", "",
        f"Command: `{cmd}` — {dt.date.today().isoformat()}" + ("" if done == total else f" (partial: {done} of {total} runs finished)"), "",
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, timm {timm.__version__}, python {platform.python_version()}; "
        f"CPU flags: {flags}", "",
        f"Calibration: {args.calib_size} images sampled (seed 0) from `shared/data/cifar10/train`. Accuracy: {any_row['images']} images "
        f"of `shared/data/cifar10/val` (seeded sample; float ONNX top-1 {any_row['fp32']:.2f} on them), each exported QDQ artifact run in "
        "onnxruntime; agreement and KL are against the float ONNX model. Partial placement (Linear/Conv weights per channel, their inputs "
        "per tensor) unless marked full (also attention products, Softmax/GELU outputs, LayerNorm and GELU inputs). Widths below 8 are "
        "simulated on the int8 grid. Mixed precision: MAC-weighted average over widths {4, 5, 6, 8}. Wall time: the whole `quantize` run "
        "(calibration, search, export, evaluation of both artifacts and of the torch simulation, 3 latency rounds) on a shared 2-core "
        "machine under load from other jobs: compare walls within this table only.", "",
    ]
    titles = {"uniform": "Uniform widths, partial quantization", "mixed": "Greedy mixed precision, partial quantization",
              "ablation": "Ablation at W4A4 (start: minmax W4A4 above; last step: mptq W4A4 above, which adds GPTQ weight rounding (ours) to the rows below; every row but the last keeps the image input at 8 bits)",
              "full": "Full quantization (--full)",
              "peers": "Peers at W8A8: the same fp32 export and calibration images (ONNX vs torch: not applicable)"}
    for group in ("uniform", "mixed", "ablation", "full", "peers"):
        if group in rows:
            lines += [f"### {titles[group]}", "", *table(rows[group]), ""]
    text = "\n".join(lines) + "\n"
    section = ("bench_mptq" + (f"_calib{args.calib_size}" if args.calib_size != 128 else "")
               + (f"_{args.only}" if args.only else "") + (f"_{args.match}" if args.match else ""))
    write_section(args.out, text, section)
    print(text, flush=True)


if __name__ == "__main__":
    main()
