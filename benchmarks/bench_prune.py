"""Pruning benchmark: OFB vs LPViT vs uniform magnitude pruning at the same *measured* speedup.

For each target speedup every method runs the full `prune` pipeline (measured search in
onnxruntime, 1 thread, batch 1, alternated medians), then the same distillation recovery, and are
evaluated on the same validation images in onnxruntime. A second model (timm
deit_small_patch16_224, random weights, 224 px) is pruned for speed only.

    python benchmarks/bench_prune.py --out benchmarks/RESULTS.md [--recover-minutes 10] [--methods ofb lpvit magnitude]
    python benchmarks/bench_prune.py --reports A/report.json B/report.json   # table from `prune` runs

Writes its own section of RESULTS.md (between the bench_prune markers), keeping the rest.
"""
from __future__ import annotations

import argparse
import os
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

from vitcompress.errors import VitcompressError  # noqa: E402
from vitcompress.prune_api import PruneJob, prune  # noqa: E402

MODELS = {"cifar10_vit_tiny": "the ViT reference model, 32 px", "deit_small_patch16_224": "timm, random weights, 224 px"}


COLUMNS = ["model", "method", "target", "speedup final, medians (minima)", "speedup search", "MACs reduction", "params",
           "search", "fp32 top-1", "before recovery", "after recovery", "drop", "recovery steps / time"]  # of the table _write makes


def _row(tag: str, r: dict) -> str:
    acc = r.get("accuracy")
    it = [i for i in r["iterations"] if i["meets_target"] and not i.get("probe")]
    alloc = r["pruning"].get("allocation") or {}
    if "rounds" in alloc:  # OFB: search steps and time, then its measured rounds
        search = f"{alloc['search_steps']} steps / {alloc['search_seconds']:.0f} s, {len(alloc['rounds'])} round(s)"
    else:
        search = f"{len(r['iterations'])} trials" if r["iterations"] else "-"
    method = r["method"] + (" + pmim" if (r["pruning"].get("config") or {}).get("pmim") else "")
    cells = [tag, method, f"{r['target'].get('speedup', '-')}x",
             f"{r['latency']['speedup']:.2f}x ({r['latency'].get('speedup_of_minima', float('nan')):.2f}x)", f"{min(i['measured_speedup'] for i in it):.2f}x" if it else "-",
             f"{r['pruning']['macs_reduction']:.2f}x", f"{r['pruning']['params_pruned'] / 1e6:.2f} M", search]
    if acc:
        cells += [f"{acc['fp32']['top1']:.2f}", f"{acc['before_recovery']['top1']:.2f}", f"{acc['after_recovery']['top1']:.2f}",
                  f"{acc['drop_after_recovery']:.2f}", f"{r['recovery'].get('steps', 0)} / {r['recovery'].get('seconds', 0):.0f} s"]
    else:
        cells += ["-"] * (len(COLUMNS) - len(cells))
    return "| " + " | ".join(cells) + " |"


def _run(tag: str, job: PruneJob) -> str:
    """The row of one `prune` run; a run that fails (an unreachable target) is a row too."""
    try:
        row = _row(tag, prune(job))
    except VitcompressError as e:
        row = "| " + " | ".join([tag, job.method, f"{job.target_speedup}x", f'failed: "{e}"'] + ["-"] * (len(COLUMNS) - 4)) + " |"
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    add_io_arguments(ap)
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--methods", nargs="+", default=["ofb", "lpvit", "magnitude"])
    ap.add_argument("--recover-minutes", type=float, default=10.0)
    ap.add_argument("--recover-steps", type=int, default=4000)
    ap.add_argument("--recover-size", type=int, default=50000)
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="the reference model (accuracy and speed) and/or deit_small (random weights, speed only)")
    ap.add_argument("--reports", type=Path, nargs="+", help="build the table from report.json files of `prune` runs")
    ap.add_argument("--work", type=Path, default=None, help="keep each run's output folder here (default: a temp dir)")
    ap.add_argument("--note", default="", help="text added under the table")
    ap.add_argument("--section", default="bench_prune", help="RESULTS.md section to (re)write")
    args = ap.parse_args()
    if args.reports:
        import json

        rows = [_row(json.loads(p.read_text())["model"]["source"].split("/")[-1], json.loads(p.read_text()))
                for p in args.reports]
        _write(args, rows, 0.0)
        return
    torch.set_num_threads(2)
    ckpt = args.shared / "zoo" / "cifar10_vit_tiny.pth"
    train, val = args.shared / "data" / "cifar10" / "train", args.shared / "data" / "cifar10" / "val"
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work or Path(scratch)
        for target in args.targets if "cifar10_vit_tiny" in args.models else ():
            for method in args.methods:
                job = PruneJob(out=Path(tmp) / f"{method}{target}", checkpoint=ckpt, method=method, target_speedup=target,
                               calib_dir=train, calib_size=args.calib_size, eval_dir=val, eval_size=args.eval_size,
                               recover_steps=args.recover_steps, recover_size=args.recover_size,
                               recover_minutes=args.recover_minutes, force=True)
                rows.append(_run("cifar10_vit_tiny", job))
        if "deit_small_patch16_224" in args.models:
            for target in args.targets:
                for method in args.methods:  # speed only: OFB searches a few steps on random weights
                    job = PruneJob(out=Path(tmp) / f"deits{method}{target}", model="deit_small_patch16_224", pretrained=False,
                                   method=method, target_speedup=target, calib_dir=train, calib_size=32, batch_size=16,
                                   recover_size=256, search_steps=60, latency_rounds=20, force=True)
                    rows.append(_run("deit_small_patch16_224 (random, 224 px)", job))
    _write(args, rows, started)


def _write(args, rows: list[str], started: float) -> None:
    import onnxruntime
    import timm

    flags = subprocess.run(["bash", "-c", "lscpu | grep -o 'avx512[a-z_]*' | sort -u | tr '\\n' ' '"],
                           capture_output=True, text=True).stdout.strip()
    argv = sys.argv[1:]
    if "--note" in argv:  # the note is printed under the table, not in the command line
        i = argv.index("--note")
        argv = argv[:i] + argv[i + 2:]
    cmd = "python benchmarks/bench_prune.py " + " ".join(argv)
    text = f"""## Pruning: OFB vs LPViT vs magnitude baseline at the same measured speedup

Command: `{cmd}` — {dt.date.today().isoformat()}{f", {(time.time() - started) / 60:.0f} min" if started else ""}.
torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, timm {timm.__version__}, Python {platform.python_version()};
CPU flags: {flags or 'n/a'}; load average when the table was written: {os.getloadavg()[0]:.2f} (1 min).
Speedups are ratios of medians of alternated runs in one process (1 thread, batch 1), re-measured
for the final artifact ("final"); the search's own measurement ("search") is the one the budget
was chosen on. Recovery is capped by wall time, so a busy machine gets fewer steps.

Calibration: seeded sample of {args.calib_size} images of cifar10/train; recovery: distillation from the float
model on {args.recover_size} train images, at most {args.recover_steps} steps / {args.recover_minutes:g} min on 2 threads;
top-1 on cifar10/val ({args.eval_size or 'all 5000'} images) of the exported ONNX files in onnxruntime.

| {" | ".join(COLUMNS)} |
|{"---|" * len(COLUMNS)}
""" + "\n".join(rows) + "\n" + (f"\n{args.note}\n" if args.note else "")
    write_section(args.out, text, args.section)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
