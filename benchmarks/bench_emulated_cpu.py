"""The same int8 artifacts on this CPU's kernels and on an AVX2-only view of it (emulated).

    python benchmarks/bench_emulated_cpu.py --out benchmarks/RESULTS.md [--models M ...] [--images N] [--qemu-cpu Haswell]

Builds each reference model's W8A8 artifact (speed placement) for both ``--target-cpu`` values,
then runs every file on the val images twice: natively, and in a child process under
``qemu-x86_64 -cpu Haswell`` (Debian/Ubuntu package ``qemu-user``), where CPUID reports AVX2 without
AVX-512 or VNNI, so onnxruntime dispatches its AVX2 integer kernels (vpmaddubsw: u8·s8 pairs added
in int16) exactly as on an AVX2-only machine; only the speed is not that machine's. Compares each
run's logits with the native run of the same file and records what vitcompress's own check
(``cpu.compatibility``) says of the file in that process. Needs a CPU whose native ISA is VNNI for
the comparison to mean anything (the table names it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, add_io_arguments, cpu_line, publish  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MODELS = ("cifar10_vit_tiny", "cifar10_mobilevit_xxs")
TARGETS = ("vnni", "portable")


def run_child(artifact: Path, images: Path, out: Path) -> None:
    """In the (native or emulated) child: the artifact's logits, and what this process's CPU is."""
    from vitcompress.cpu import compatibility, this_cpu
    from vitcompress.export import make_session
    from vitcompress.export.onnx_export import artifact_numerics
    from vitcompress.export.runtime import run_session

    x = np.load(images)
    session = make_session(artifact, threads=1)
    logits = np.concatenate([run_session(session, x[i:i + 100]) for i in range(0, len(x), 100)])
    np.save(out.with_suffix(".npy"), logits)
    out.with_suffix(".json").write_text(json.dumps({"cpu": this_cpu(), "exact": compatibility(artifact_numerics(artifact))["exact"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_io_arguments(ap)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--images", type=int, default=500, help="val images each file runs on (seeded sample)")
    ap.add_argument("--qemu-cpu", default="Haswell", help="the CPU model qemu-x86_64 emulates (AVX2, no AVX-512)")
    ap.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(*args.child)
        return
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("qemu-x86_64 is not installed: apt-get install qemu-user")
    from vitcompress import QuantConfig, QuantizeJob, quantize
    from vitcompress.artifacts import evaluation_images
    from vitcompress.checkpoints import load
    from vitcompress.data import load_tensor

    data = args.shared / "data" / "cifar10"
    work = Path(tempfile.mkdtemp(prefix="bench-emulated-"))
    rows = []
    for model in args.models:
        checkpoint = args.shared / "zoo" / f"{model}.pth"
        loaded = load(checkpoint=checkpoint)
        picked, label_map = evaluation_images(loaded, data / "val", args.images, 0)
        images = work / f"{model}.npy"
        np.save(images, load_tensor(picked, loaded.preprocessing).numpy())
        labels = np.asarray(label_map)[list(picked.labels)]
        for target in TARGETS:
            out = work / f"{model}_{target}"
            quantize(QuantizeJob(out=out, checkpoint=checkpoint, config=QuantConfig(placement="speed"), calib_dir=data / "train",
                                 calib_size=128, latency_rounds=3, target_cpu=target))
            artifact = out / "model.int8.onnx"
            results = {}
            for view, prefix in (("native", []), (f"qemu -cpu {args.qemu_cpu}", [qemu, "-cpu", args.qemu_cpu])):
                stem = work / f"{model}_{target}_{'native' if not prefix else 'emulated'}"
                child = subprocess.run([*prefix, sys.executable, __file__, "--child", str(artifact), str(images), str(stem)],
                                       capture_output=True, text=True)
                if child.returncode != 0:
                    sys.exit(f"{view} run of {artifact} failed: {(child.stderr.strip().splitlines() or ['?'])[-1]}")
                results[view] = (np.load(stem.with_suffix(".npy")), json.loads(stem.with_suffix(".json").read_text()))
            native = results["native"][0]
            for view, (logits, info) in results.items():
                agree = 100.0 * (logits.argmax(1) == native.argmax(1)).mean()
                top1 = f"{100.0 * (logits.argmax(1) == labels).mean():.2f}"
                rows.append(f"| {model} | {target} | {view} | {info['cpu']['isa']} | {'yes' if info['exact'] else 'no'} | "
                            f"{agree:.2f} | {float(np.abs(logits - native).max()):.4f} | {top1} |")
                print(rows[-1], flush=True)
    publish(args.out, "bench_emulated_cpu", "The same int8 artifacts on AVX2 kernels (emulated) and natively",
            f"{cpu_line()} W8A8 `speed` artifacts of the reference models (128 calibration images, seed 0, from "
            f"`cifar10/train`), one per `--target-cpu`, each run on {args.images} val images (seed 0) natively and under "
            f"`qemu-x86_64 -cpu {args.qemu_cpu}` (CPUID: AVX2, no AVX-512/VNNI, so onnxruntime runs its AVX2 integer "
            "kernels). 'kernels' is the ISA vitcompress sees in that process; 'exact' is its own verdict on the file there "
            "(`cpu.compatibility`); agreement and max |logit diff| are against the native run of the same file.",
            ["model", "target", "run", "kernels", "vitcompress: exact here", "top-1 agreement with native %",
             "max abs logit diff", "top-1 %"], rows)


if __name__ == "__main__":
    main()
