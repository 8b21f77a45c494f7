"""How much of a quantized model's accuracy is the luck of its grid? And can the calibration set tell?

Takes a quantized checkpoint (the ``model.*.pth`` a ``vitcompress quantize`` run writes) and the float
model it came from, then re-draws its activation grids many times: every activation scale is
multiplied by exp(ε·N(0,1)) (ε = 1e-3 by default, far below any step a search or tuning makes).
For each draw: KL to the float model on the calibration images and on their augmented views
(what Q-HyViT's post-search steps are judged on), and KL and top-1 agreement on the val images.
All in the torch simulation (its exported ONNX agrees with it on ≥ 99 % of images).

Reported: the spread of each measure over the draws, and the correlation of the calibration
measures with the val ones. A near-zero correlation means choices made on the calibration KL
between candidates of equal quality select noise.

    vitcompress quantize --checkpoint ../shared/zoo/cifar10_mobilevit_xxs.pth --method qhyvit --bits 6 \\
        --calib ../shared/data/cifar10/train --calib-size 128 --out /tmp/xxs_w6
    python benchmarks/bench_grid_noise.py --quantized /tmp/xxs_w6/model.w6a6.pth \\
        --float ../shared/zoo/cifar10_mobilevit_xxs.pth --calib-size 128 --out benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from common import ROOT, add_checkpoint_pair_arguments, add_io_arguments, load_checkpoint_pair, publish  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress.quant.calibration import batched_logits, logits_kl  # noqa: E402
from vitcompress.quant.modules import quantizers as all_quantizers  # noqa: E402
from vitcompress.quant.scale_tuning import augmented  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--jitter", type=float, default=1e-3)
    add_checkpoint_pair_arguments(ap)
    add_io_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, fp, calib, val = load_checkpoint_pair(args)
    views = augmented(calib)
    sets = {"calib": calib, "augmented": views, "val": val}
    ref = {k: batched_logits(fp, x, 250) for k, x in sets.items()}
    quantizers = [q for n, q in all_quantizers(model) if q.mode == "quantize" and not n.endswith("weight_quantizer")]
    start = [q.scale.clone() for q in quantizers]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for draw in range(args.draws + 1):  # draw 0: the checkpoint's own grids
        for q, s in zip(quantizers, start):
            noise = torch.randn(s.shape, generator=generator) if draw else torch.zeros(s.shape)
            q.set_qparams(s * torch.exp(args.jitter * noise), q.zero_point)
        out = {k: batched_logits(model, x, 250) for k, x in sets.items()}
        agree = float((out["val"].argmax(-1) == ref["val"].argmax(-1)).double().mean() * 100)
        rows.append([logits_kl(ref[k], out[k]) for k in sets] + [agree])
        print(draw, [round(v, 5) for v in rows[-1]], flush=True)
    a = np.array(rows)
    corr = lambda i, j: float(np.corrcoef(a[1:, i], a[1:, j])[0, 1])  # noqa: E731
    fmt = lambda i, v: f"{v:.2f}" if i == 3 else f"{v:.5f}"  # noqa: E731  (agreement in %, KLs to 5 places)
    stats = lambda i: (f"{fmt(i, a[1:, i].mean())} ± {fmt(i, a[1:, i].std())} "  # noqa: E731
                       f"({fmt(i, a[1:, i].min())}–{fmt(i, a[1:, i].max())})")
    names = ["KL, calibration images", "KL, augmented views", "KL, val", "top-1 agreement, val %"]
    publish(args.out, f"grid_noise_{args.quantized.parent.name}",
            f"Grid noise: {args.quantized.parent.name}/{args.quantized.name}",
            f"{args.draws} draws of every activation scale × exp({args.jitter:g}·N(0,1)) on the checkpoint "
            f"({len(quantizers)} activation quantizers); torch simulation; {len(calib)} calibration images "
            f"(seed 0, train), their {len(views)} augmented views, {len(val)} val images.",
            ["measure", "checkpoint", "over the draws: mean ± std (min–max)"],
            [f"| {n} | {fmt(i, a[0, i])} | {stats(i)} |" for i, n in enumerate(names)],
            f"Correlation over the draws with the val KL: calibration KL {corr(0, 2):+.2f}, augmented-views KL "
            f"{corr(1, 2):+.2f}; with val agreement: calibration KL {corr(0, 3):+.2f}, augmented-views KL {corr(1, 3):+.2f}.")

if __name__ == "__main__":
    main()
