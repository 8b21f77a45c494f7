"""What GPTQ should round towards: each layer's own output (plain GPTQ) or the float model's (GPTAQ).

Takes a quantized checkpoint (the ``model.*.pth`` a ``vitcompress quantize`` run writes) and the
float model it came from, puts the float weights and biases back under the checkpoint's grids (so
every scale, granularity and scheme stays as the run chose them), then re-rounds the weights with
GPTQ once per target and measures each result in the torch simulation: KL to the float model on
the calibration images, and KL and top-1 agreement on the val images. Only the rounding step
differs between the rows, so this isolates it (no bias correction, no scale tuning after it).

    python benchmarks/bench_gptq_target.py --quantized /tmp/xxs_w8/model.int8.pth \\
        --float ../shared/zoo/cifar10_mobilevit_xxs.pth --calib-size 128
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from common import ROOT, add_checkpoint_pair_arguments, add_io_arguments, load_checkpoint_pair, publish  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress.quant.calibration import batched_logits, float_copy, logits_kl  # noqa: E402
from vitcompress.quant.bridge import layer_order  # noqa: E402
from vitcompress.quant.fold import fold_batchnorm  # noqa: E402
from vitcompress.quant.gptq import gptq_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_pair_arguments(ap)
    add_io_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, fp, calib, val = load_checkpoint_pair(args)
    ref = {"calib": batched_logits(fp, calib, 250), "val": batched_logits(fp, val, 250)}
    fold_batchnorm(fp, calib[:8])  # the float weights as the quantized model holds them (BatchNorm folded)
    float_params = fp.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith((".weight", ".bias")) and key in float_params and float_params[key].shape == value.shape:
                value.copy_(float_params[key])
    layers = [n for n, m in model.named_modules()
              if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.mode == "quantize"]
    order = [n for n, _ in layer_order(model, layers, calib[:2])]
    float_model = float_copy(model)

    def measure(m) -> list[float]:
        out = {k: batched_logits(m, x, 250) for k, x in (("calib", calib), ("val", val))}
        agree = float((out["val"].argmax(-1) == ref["val"].argmax(-1)).double().mean() * 100)
        return [logits_kl(ref["calib"], out["calib"]), logits_kl(ref["val"], out["val"]), agree]

    rows = [("float weights under the checkpoint's grids (nearest rounding)", measure(model))]
    for label, target in (("GPTQ, own output (plain)", None), ("GPTQ, float model's output (GPTAQ)", float_model)):
        m = copy.deepcopy(model)
        gptq_layers(m, order, list(calib.split(32)), target)
        rows.append((label, measure(m)))
        print(rows[-1], flush=True)
    publish(args.out, f"gptq_target_{args.quantized.parent.name}",
            f"GPTQ target: {args.quantized.parent.name}/{args.quantized.name}",
            f"The checkpoint's grids with the float weights put back, then re-rounded; torch simulation; "
            f"{len(calib)} calibration images (seed 0, train), {len(val)} val images.",
            ["weights", "KL, calibration images", "KL, val", "top-1 agreement, val %"],
            [f"| {label} | {c:.6f} | {v:.6f} | {a:.2f} |" for label, (c, v, a) in rows])

if __name__ == "__main__":
    main()
