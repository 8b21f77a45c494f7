"""`check` in one process vs on Ray workers: wall time, identical numbers, Ray start-up, memory.

    python benchmarks/bench_workers.py --out benchmarks/RESULTS.md [--workers 2] [--large] [--repeat 5] [--model deit_tiny]

Quantizes the ViT reference model (W8A8, speed placement) once, then gates the artifact against
its fp32 file on all of cifar10/val (5,000 images) in this process and with each --workers count
(local Ray, started by the check and counted in its wall time); --large repeats it on the 50,000
labelled images of cifar10/train, a stand-in for an ImageNet-size evaluation set; --model gates a timm
model at its native size instead (the images resized to it, as for an ImageNet model). Peak memory is
sampled from the worker processes while they run. Nothing else should load the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, add_io_arguments, publish  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402  (a dependency of ray)

from vitcompress import Gate, QuantConfig, QuantizeJob, check, quantize  # noqa: E402
from vitcompress.workers import Workers  # noqa: E402

METRICS = ("artifact_accuracy", "baseline_accuracy", "drop", "top1_agreement", "kl", "images")


class PeakMemory:
    """Peak resident memory of this process and of each Ray worker process, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.driver = 0
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if any("ray::" in part for part in (p.info["cmdline"] or [])) and "IDLE" not in " ".join(p.info["cmdline"] or []):
                        self.workers[p.pid] = max(self.workers.get(p.pid, 0), p.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self._stop.wait(0.2)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_io_arguments(ap)
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="Ray worker counts to compare with one process")
    ap.add_argument("--large", action="store_true", help="also gate on the 50,000 train images")
    ap.add_argument("--repeat", type=int, default=5, help="rounds, each running every count once, alternated")
    ap.add_argument("--model", default=None,
                    help="a timm model at its native size, random weights (default: the 32-px ViT reference model)")
    args = ap.parse_args()
    data = args.shared / "data" / "cifar10"
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    source = (dict(model=args.model, pretrained=False) if args.model
              else dict(checkpoint=args.shared / "zoo" / "cifar10_vit_tiny.pth"))
    quantize(QuantizeJob(out=work / "q", config=QuantConfig(placement="speed"), calib_dir=data / "train", calib_size=256,
                         latency_rounds=5, **source))
    artifact, baseline = work / "q" / "model.int8.onnx", work / "q" / "model.fp32.onnx"
    sets = [("val", data / "val")] + ([("train (as a large set)", data / "train")] if args.large else [])
    rows = []
    for set_name, folder in sets:
        runs: dict[int, list[tuple[dict, float, PeakMemory]]] = {}
        for _ in range(args.repeat):  # alternated: a slow phase of the machine meets every count alike
            for count in [1, *args.workers]:
                with PeakMemory() as memory:
                    t0 = time.perf_counter()
                    report = check(artifact, folder, Gate(max_drop=100.0), baseline=baseline, workers=Workers(count))
                    wall = time.perf_counter() - t0
                runs.setdefault(count, []).append((report, wall, memory))
                print(set_name, count, f"{wall:.2f}s", flush=True)
        reference = runs[1][0][0]
        one_walls = [w for _, w, _ in runs[1]]
        for count, done in runs.items():
            walls = [w for _, w, _ in done]
            ratios = [a / b for a, b in zip(one_walls, walls)]  # each round's pair, side by side
            same = all(r[k] == reference[k] for r, _, _ in done for k in METRICS)
            info = done[0][0]["workers"]
            startup = [r["workers"]["startup_seconds"] or 0.0 for r, _, _ in done]
            per_worker = max((max(m.workers.values(), default=0) for _, _, m in done), default=0) / 2**20
            driver = max(m.driver for _, _, m in done) / 2**20
            rows.append(f"| {set_name} | {reference['images']} | {info['backend']} | {info['workers']} | "
                        f"{statistics.median(walls):.1f} ({min(walls):.1f}–{max(walls):.1f}) | "
                        f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | "
                        f"{statistics.median(startup):.1f} | {driver:.0f} | {f'{per_worker:.0f}' if per_worker else '–'} | "
                        f"{reference['artifact_accuracy']['top1']:.2f} | {reference['kl']:.6g} | {'yes' if same else 'NO'} |")
            print(rows[-1], flush=True)
    subject = f"{args.model} (timm, random weights, native input size)" if args.model else "ViT reference model (32 px)"
    publish(args.out, f"bench_workers_{args.model}" if args.model else "bench_workers",
            f"`check` in one process and on local Ray workers: {subject}",
            f"{subject} at W8A8 (speed placement, 256 calibration images), gated against its fp32 file; "
            f"wall time of the whole `check` call (Ray start-up included), median of {args.repeat} rounds (range), the counts "
            "alternated within each round; speed-up: the median of each round's in-process wall over this row's (range); "
            "Ray start-up: `ray.init` on the driver, which evaluates shards meanwhile; peak resident "
            "memory sampled every 0.2 s. The evaluation is cut into fixed shards of 8 batches of 64 images, so every row "
            "computes the same logits: 'identical' compares top-1, top-5, drop, agreement and KL with the in-process row.",
            ["images from", "images", "backend", "workers", "wall s", "vs in-process (per round)", "Ray start-up s", "driver MiB",
             "per worker MiB", "top-1 %", "KL", "identical"], rows)


if __name__ == "__main__":
    main()
