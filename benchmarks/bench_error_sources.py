"""Where a quantized model's error comes from: each activation quantizer turned off alone.

A reference model is quantized by the Python API's defaults, ``quantize_(model, QuantConfig(method=M,
wbits=B, abits=B))`` (torch simulation, 128 calibration images from the train split; the CLI adds the
target CPU's weight range); then, one at a time, every activation
quantizer passes its input through unquantized, and the KL(float || quantized) of the logits and
the top-1 agreement with the float model are measured on half A of val (the tuning half: this
says where to look next, it chooses nothing reported). The rows are sorted by how much KL each
quantizer alone carries (the whole model's KL minus the KL with it off). Weights stay quantized.

    python benchmarks/bench_error_sources.py --model cifar10_vit_tiny --method mptq --bits 6 --out SCRATCH.md
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from common import ROOT, add_io_arguments, publish, val_halves  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress import load  # noqa: E402
from vitcompress.data import load_tensor, sample, scan_images  # noqa: E402
from vitcompress.quant import QuantConfig, quantize_  # noqa: E402
from vitcompress.quant.calibration import batched_logits, kl_and_agreement  # noqa: E402
from vitcompress.quant.modules import TensorQuantizer  # noqa: E402


BATCH = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar10_vit_tiny")
    ap.add_argument("--method", default="mptq")
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--top", type=int, default=12, help="rows to publish")
    add_io_arguments(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = args.shared / "data" / "cifar10"
    loaded = load(checkpoint=args.shared / "zoo" / f"{args.model}.pth")
    calib = load_tensor(sample(scan_images(data / "train"), args.calib_size, 0), loaded.preprocessing)
    half_a, _ = val_halves(scan_images(data / "val", require_labels=True))
    x = load_tensor(half_a, loaded.preprocessing)
    model = loaded.model.eval()
    ref = batched_logits(model, x, BATCH)
    q = copy.deepcopy(model)
    start = time.perf_counter()
    quantize_(q, QuantConfig(method=args.method, wbits=args.bits, abits=args.bits), [calib])
    seconds = time.perf_counter() - start
    whole_kl, whole_agreement = kl_and_agreement(ref, batched_logits(q, x, BATCH))
    rows = []
    for name, quantizer in q.named_modules():
        if not isinstance(quantizer, TensorQuantizer) or name.endswith("weight_quantizer"):
            continue
        quantizer.forward = lambda t: t  # this one alone passes its input through
        kl, agreement = kl_and_agreement(ref, batched_logits(q, x, BATCH))
        del quantizer.forward  # back to the class's forward
        rows.append((whole_kl - kl, name, kl, agreement))
    rows.sort(key=lambda r: -r[0])
    table = [f"| (none off) | {whole_kl:.6f} | – | {whole_agreement:.2f} |"]
    table += [f"| `{name}` | {kl:.6f} | {carried:.6f} ({carried / whole_kl:.0%}) | {agreement:.2f} |"
              for carried, name, kl, agreement in rows[:args.top]]
    publish(args.out, f"error_sources_{args.model}_{args.method}_w{args.bits}a{args.bits}",
            f"Where the error of {args.method} W{args.bits}A{args.bits} on {args.model} comes from",
            f"Torch simulation, {args.calib_size} calibration images (train, seed 0), quantized in {seconds:.0f} s; "
            f"measured on half A of val ({len(half_a)} images, the tuning half). Each row turns one activation "
            f"quantizer off alone; {len(rows)} quantizers, the {min(args.top, len(rows))} carrying the most KL shown.",
            ["activation quantizer off", "KL (float ‖ quantized)", "KL it carries alone", "agreement with float %"], table)


if __name__ == "__main__":
    main()
