"""Does a search overfit its calibration images? Fit on one half, measure on the other.

The calibration sample (seed 0, train) is split in two halves A and B. Min-max and the Q-HyViT
search (no post-search steps) are fitted on A alone; each result's KL to the float model is
measured on A, on B (train images the fit never saw) and on val. When B ranks two fits as val does
and A does not, the fit overfits A, and a held-out half is enough to see it.

    python benchmarks/bench_holdout.py --model cifar10_mobilevit_xxs --calib-size 32 --bits 8
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from common import ROOT, add_io_arguments, publish  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress import load  # noqa: E402
from vitcompress.data import load_tensor, sample, scan_images  # noqa: E402
from vitcompress.quant import QuantConfig, quantize_  # noqa: E402
from vitcompress.quant.calibration import batched_logits, logits_kl  # noqa: E402

SEARCH_ONLY = {"gptq": False, "bias_correction": False, "scale_tuning_steps": 0}
FITS = [("min-max", "minmax", {}),
        ("Q-HyViT search, candidates scored in sample", "qhyvit", {**SEARCH_ONLY, "crossfit": False}),
        ("Q-HyViT search, no per-channel activation candidates", "qhyvit",
         {**SEARCH_ONLY, "crossfit": False, "activation_granularity": "none"}),
        ("Q-HyViT search, candidates scored by 2-fold cross-fit (default)", "qhyvit", SEARCH_ONLY)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a zoo model name, e.g. cifar10_mobilevit_xxs")
    ap.add_argument("--calib-size", type=int, required=True, help="split in two halves: fit on A, hold out B")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=None, help="seeded sample of val (default: all of it)")
    add_io_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = args.shared / "data" / "cifar10"
    loaded = load(checkpoint=args.shared / "zoo" / f"{args.model}.pth")
    fp = loaded.model.eval()
    calib = load_tensor(sample(scan_images(data / "train"), args.calib_size, 0), loaded.preprocessing)
    half = len(calib) // 2
    sets = {"A (fitted)": calib[:half], "B (held out)": calib[half:],
            "val": load_tensor(sample(scan_images(data / "val", require_labels=True), args.eval_size, 0), loaded.preprocessing)}
    ref = {k: batched_logits(fp, x, 250) for k, x in sets.items()}
    rows = []
    for label, method, opts in FITS:
        m = copy.deepcopy(fp)
        quantize_(m, QuantConfig(method=method, wbits=args.bits, abits=args.bits, method_options=opts),
                  list(sets["A (fitted)"].split(32)))
        m.eval()
        rows.append((label, opts, [logits_kl(ref[k], batched_logits(m, x, 250)) for k, x in sets.items()]))
        print(rows[-1], flush=True)
    publish(args.out, f"holdout_{args.model}_{args.calib_size}_w{args.bits}",
            f"Held-out half: {args.model}, W{args.bits}A{args.bits}, {half} + {len(calib) - half} calibration images",
            f"Fitted on half A of the seeded {len(calib)}-image train sample, KL(float ‖ quantized) on A, on the other "
            f"half B and on {len(sets['val'])} val images; torch simulation.",
            ["fit on A", "method options", "KL, A", "KL, B", "KL, val"],
            [f"| {label} | `{json.dumps(opts)}` | {a:.6f} | {b:.6f} | {v:.6f} |" for label, opts, (a, b, v) in rows])


if __name__ == "__main__":
    main()
