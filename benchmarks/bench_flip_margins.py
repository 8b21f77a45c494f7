"""Where an artifact's disagreements with its float model sit: the float model's top-1/top-2 margins.

An image whose float logits put two classes almost level flips at the slightest noise; one with a
wide margin flips only if the quantized model is badly off. For an exported artifact and the fp32
file next to it (as `vitcompress quantize` writes them), both run in onnxruntime on half B of val
(the half no variant was tuned on, ``common.val_halves``), this counts the images under each float
margin and how many of them the artifact flips, and sets that against the size of its logit error.
It says how far an agreement bar is from the noise floor of near-ties; it changes nothing.

    python benchmarks/bench_frontier.py --models cifar10_vit_tiny --bits 6 --variants reconstruction --work W
    python benchmarks/bench_flip_margins.py W/cifar10_vit_tiny_reconstruction_6/model.w6a6.onnx \\
        --checkpoint ../shared/zoo/cifar10_vit_tiny.pth --bar 99.0 --out benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common import ROOT, add_io_arguments, publish, val_halves  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress import load  # noqa: E402
from vitcompress.data import scan_images  # noqa: E402
from vitcompress.evaluate import collect_logits, onnx_predictor  # noqa: E402
from vitcompress.export import make_session  # noqa: E402

MARGINS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path, help="an exported artifact; its folder holds model.fp32.onnx")
    ap.add_argument("--checkpoint", type=Path, required=True, help="the float model it was made from (its preprocessing)")
    ap.add_argument("--bar", type=float, default=None, help="an agreement bar (%%) to count the disagreements it allows")
    add_io_arguments(ap)
    args = ap.parse_args()
    val = scan_images(args.shared / "data" / "cifar10" / "val", require_labels=True)
    _, half_b = val_halves(val)
    loaded = load(checkpoint=args.checkpoint)
    files = {"fp32": args.artifact.parent / "model.fp32.onnx", "artifact": args.artifact}
    logits, _, _ = collect_logits({k: onnx_predictor(make_session(p)) for k, p in files.items()}, half_b,
                                  loaded.preprocessing, 100)
    ref, out = logits["fp32"], logits["artifact"]
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    flipped = ref.argmax(1) != out.argmax(1)
    error = np.abs(out - ref).max(1)
    n = len(ref)
    rows = [f"| < {t:g} | {int((margin < t).sum())} | {int((flipped & (margin < t)).sum())} | "
            f"{100 * (flipped & (margin < t)).sum() / max(1, flipped.sum()):.0f}% |" for t in MARGINS]
    rows.append(f"| all | {n} | {int(flipped.sum())} | 100% |")
    allowed = "" if args.bar is None else (
        f" An agreement bar of {args.bar:g}% allows {int(np.floor(n * (1 - args.bar / 100) + 1e-9))} disagreements here.")
    about = (f"Artifact `{args.artifact.parent.name}/{args.artifact.name}` against `model.fp32.onnx` beside it, both in "
             f"onnxruntime, on half B of `shared/data/cifar10/val` ({n} images, `common.val_halves`). Agreement "
             f"{100 * (1 - flipped.mean()):.2f}% ({int(flipped.sum())} disagreements). Float top-1/top-2 logit margin: "
             f"median {np.median(margin):.3f}; the artifact's largest logit error per image: median {np.median(error):.3f}, "
             f"90th percentile {np.percentile(error, 90):.3f}.{allowed}")
    publish(args.out, f"flip_margins_{args.artifact.parent.name}", f"Where the disagreements sit: {args.artifact.parent.name}",
            about, ["float margin", "images", "of them disagreeing", "share of all disagreements"], rows)


if __name__ == "__main__":
    main()
