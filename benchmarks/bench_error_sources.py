"""Where a quantized model's error comes from: each activation quantizer turned off alone.

A reference model is quantized by the Python API's defaults, ``quantize_(model, QuantConfig(method=M,
wbits=B, abits=B))`` (torch simulation, 128 calibration images from the train split; the CLI adds the
target CPU's weight range); then, one at a time, every activation
quantizer passes its input through unquantized (a two-region OPT-m quantizer: both regions), and
the KL(float || quantized) of the logits and the top-1 agreement with the float model are measured
on half A of val (the tuning half: this says where to look next, it chooses nothing reported). The
rows are sorted by how much KL each quantizer alone carries (the whole model's KL minus the KL with
it off); then the quantizers of each kind (the same name in every block) are turned off together,
and all of them. Weights stay quantized.

For a model whose head reads prefix tokens (timm's ``num_prefix_tokens``: the class token), a
second table asks how much of the error those tokens' Linear inputs carry: the prefix tokens' rows
of every Linear reading the token sequence get a float input (by layer kind, then all), or their
own 8-bit min-max grid, or their own grid at the model's width, while the other tokens keep theirs.

    python benchmarks/bench_error_sources.py --model cifar10_vit_tiny --method mptq --bits 6 --out SCRATCH.md
"""
from __future__ import annotations

import argparse
import copy
import re
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
from vitcompress.quant.optm import TwoRegionQuantizer  # noqa: E402
from vitcompress.quant.spec import QuantSpec, fake_quantize, qparams_from_range  # noqa: E402
from vitcompress.quant.tracing import forward_with_hooks  # noqa: E402
from vitcompress.prune.structure import token_count  # noqa: E402


BATCH = 256


def token_linears(model: torch.nn.Module, example: torch.Tensor, tokens: int) -> list[tuple[str, torch.nn.Module]]:
    """The quantized Linears whose input is the token sequence ([batch, tokens, channels])."""
    seen: list[str] = []
    forward_with_hooks(model, example, [
        m.register_forward_pre_hook(lambda mod, inp, n=n: seen.append(n) if inp[0].dim() == 3 and inp[0].shape[1] == tokens else None)
        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "input_quantizer")])
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in dict.fromkeys(seen)]


def prefix_rows(q: torch.nn.Module, ref: torch.Tensor, x: torch.Tensor, calib: torch.Tensor, prefix: int,
                bits: int, whole: tuple[float, float]) -> list[str]:
    """KL and agreement with the prefix tokens' Linear inputs float, or on a grid of their own."""
    linears = token_linears(q, calib[:1], token_count(q))
    ranges: dict[str, tuple[float, float]] = {}  # the prefix rows' min-max range per Linear (0 included)
    forward_with_hooks(q, calib, [m.register_forward_pre_hook(lambda mod, inp, n=n: ranges.__setitem__(n, (
        min(ranges.get(n, (0.0, 0.0))[0], inp[0][:, :prefix].min().item()),
        max(ranges.get(n, (0.0, 0.0))[1], inp[0][:, :prefix].max().item())))) for n, m in linears])

    def measured(kinds: tuple[str, ...] | None, width: int | None) -> tuple[float, float]:
        """The prefix rows of the chosen Linears recomputed: float input (width None) or own grid."""
        chosen = [(n, m) for n, m in linears if kinds is None or n.rsplit(".", 1)[-1] in kinds]
        for n, m in chosen:
            spec = QuantSpec(width, symmetric=False) if width else None
            grid = qparams_from_range(torch.tensor(ranges[n][0]), torch.tensor(ranges[n][1]), spec) if spec else None

            def forward(t: torch.Tensor, m=m, spec=spec, grid=grid) -> torch.Tensor:
                out = type(m).forward(m, t)
                head = t[:, :prefix] if spec is None else fake_quantize(t[:, :prefix], grid[0], grid[1], spec)
                return torch.cat([torch.nn.functional.linear(head, m.weight_quantizer(m.weight), m.bias), out[:, prefix:]], dim=1)
            m.forward = forward
        try:
            return kl_and_agreement(ref, batched_logits(q, x, BATCH))
        finally:
            for _, m in chosen:
                del m.forward

    kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
    rows = [f"| (none: every token on the layer's grid) | {whole[0]:.6f} | – | {whole[1]:.2f} |"]
    variants = [(f"float, `{k}` inputs only", (k,), None) for k in kinds]
    variants += [("float, every Linear", None, None), ("own 8-bit min-max grid, every Linear", None, 8),
                 (f"own {bits}-bit min-max grid, every Linear", None, bits)]
    for label, chosen_kinds, width in variants:
        kl, agreement = measured(chosen_kinds, width)
        rows.append(f"| {label} | {kl:.6f} | {whole[0] - kl:.6f} ({(whole[0] - kl) / whole[0]:.0%}) | {agreement:.2f} |")
    return rows


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
    regions = {id(m.coarse) for m in q.modules() if isinstance(m, TwoRegionQuantizer)}
    activations = {name: m for name, m in q.named_modules() if isinstance(m, TensorQuantizer)
                   and not name.endswith("weight_quantizer") and id(m) not in regions}

    def off(names: list[str]) -> tuple[float, float]:
        # "off" passes the input through; a two-region quantizer off turns both regions off (its Linear
        # then reads the plain input), where replacing its forward would leave the Linear's parts on
        for n in names:
            activations[n].mode = "off"
        try:
            return kl_and_agreement(ref, batched_logits(q, x, BATCH))
        finally:
            for n in names:
                activations[n].mode = "quantize"

    rows = sorted(((whole_kl - kl, name, kl, agreement) for name in activations for kl, agreement in [off([name])]),
                  key=lambda r: -r[0])
    # by kind: the quantizers whose names differ only in block numbers, together
    kinds: dict[str, list[str]] = {}
    for name in activations:
        kinds.setdefault(re.sub(r"\.\d+(?=\.)", ".*", name), []).append(name)
    groups = [(f"every `{kind}` ({len(names)})", names) for kind, names in kinds.items() if len(names) > 1]
    groups.append((f"all {len(activations)}", list(activations)))
    table = [f"| (none off) | {whole_kl:.6f} | – | {whole_agreement:.2f} |"]
    table += [f"| `{name}` | {kl:.6f} | {carried:.6f} ({carried / whole_kl:.0%}) | {agreement:.2f} |"
              for carried, name, kl, agreement in rows[:args.top]]
    for label, names in groups:
        kl, agreement = off(names)
        table.append(f"| {label} | {kl:.6f} | {whole_kl - kl:.6f} ({(whole_kl - kl) / whole_kl:.0%}) | {agreement:.2f} |")
    publish(args.out, f"error_sources_{args.model}_{args.method}_w{args.bits}a{args.bits}",
            f"Where the error of {args.method} W{args.bits}A{args.bits} on {args.model} comes from",
            f"Torch simulation, {args.calib_size} calibration images (train, seed 0), quantized in {seconds:.0f} s; "
            f"measured on half A of val ({len(half_a)} images, the tuning half). Each row turns one activation "
            f"quantizer off alone; {len(rows)} quantizers, the {min(args.top, len(rows))} carrying the most KL shown, then "
            f"the quantizers of each kind (the same name in every block) off together, and all of them.",
            ["activation quantizer off", "KL (float ‖ quantized)", "KL it carries alone", "agreement with float %"], table)
    prefix = getattr(model, "num_prefix_tokens", 0)
    if prefix and getattr(model, "global_pool", "") == "token":
        publish(args.out, f"error_sources_{args.model}_{args.method}_w{args.bits}a{args.bits}_prefix",
                f"How much of the error of {args.method} W{args.bits}A{args.bits} on {args.model} its prefix tokens' Linear inputs carry",
                f"The same quantized model and images. The {prefix} prefix token(s) (the class token the head reads) "
                f"of every Linear reading the token sequence: float input, or a per-tensor min-max grid of their own "
                f"(range from the calibration images); the other tokens keep the layer's grid, weights stay quantized. "
                f"The prefix tokens are {prefix} of {token_count(q)} tokens, so about that share of the blocks' MACs.",
                ["prefix tokens' inputs", "KL (float ‖ quantized)", "KL they carry", "agreement with float %"],
                prefix_rows(q, ref, x, calib, prefix, args.bits, (whole_kl, whole_agreement)))


if __name__ == "__main__":
    main()
