"""The accuracy frontier: min-max, each reference model's method, and the method + block
reconstruction, at W8A8/W6A6/W4A4, every row an exported artifact, reported on the half of val
that no choice was tuned on. ``--variants mixed`` (mptq models): MPTQ-ViT's greedy mixed precision
down to the row's width as a MAC-weighted average (``--target-bits``), with the default reconstruction.

Val is split once (seeded): half A is where variants are compared while developing, half B is
never used to choose anything. Each row gives agreement with the float artifact, top-1 drop and
KL on B and on all of val, the quantize run's wall time and its peak memory (each run in a
process of its own).

    python benchmarks/bench_frontier.py --models cifar10_vit_tiny --bits 4 6 --out SCRATCH.md
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, add_io_arguments, publish, val_halves  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress import QuantConfig, QuantizeJob, load, quantize  # noqa: E402
from vitcompress.data import label_map_to_model, scan_images  # noqa: E402
from vitcompress.evaluate import collect_logits, fidelity, onnx_predictor, summarize  # noqa: E402
from vitcompress.export import make_session  # noqa: E402
from vitcompress.quant import mptq, qhyvit  # noqa: E402
from vitcompress.quant.reconstruction import RECONSTRUCTION_AUGMENT  # noqa: E402

METHOD_OF = {"cifar10_mobilevit_xxs": "qhyvit", "cifar10_mobilevitv2_050": "qhyvit", "cifar10_vit_tiny": "mptq"}
VARIANTS = ["minmax", "method", "reconstruction"]
MIXED = "mixed"  # not in the default set: greedy mixed precision at the width as an average (mptq only)
OPTIONS = {"qhyvit": qhyvit.QHyViTOptions, "mptq": mptq.MptqOptions}  # each knows its default steps and widths


def _is_default(model: str, variant: str, bits: int, steps: int) -> bool:
    """Is this row what `vitcompress quantize --method M --bits B` does with no other flag?"""
    if variant in ("minmax", MIXED):
        return False
    method = METHOD_OF[model]
    auto = OPTIONS[method]().reconstruction_config(bits).steps
    return (variant == "reconstruction") == (auto > 0) and (auto == 0 or auto == steps)


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from the command line; the value read as JSON (false, 0.3, [..]), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _config(model: str, variant: str, bits: int, steps: int, extra: dict) -> QuantConfig:
    if variant == "minmax":
        return QuantConfig(wbits=bits, abits=bits)
    if variant == MIXED:  # greedy mixed precision, reconstruction as the method's default does
        return QuantConfig(method=METHOD_OF[model], wbits=8, abits=8, placement="default",
                           method_options={"target_bits": float(bits), "reconstruction_steps": steps, **extra})
    options = {"reconstruction_steps": steps if variant == "reconstruction" else 0, **extra}
    # the placement `vitcompress quantize` gives a method without --placement (api.method_placement)
    return QuantConfig(method=METHOD_OF[model], wbits=bits, abits=bits, placement="default", method_options=options)


def _quantize_in_own_process(job: QuantizeJob) -> tuple[Path, float, float, dict | None, float | None]:
    """(quantized artifact, method seconds, peak resident memory in MiB of the whole run, the narrow
    layers kept at 8 bits as the report gives them or None, the mixed-precision average width or None)."""
    import torch

    torch.set_num_threads(1)
    r = quantize(job)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return (job.out / r["artifacts"]["quantized"]["path"], r["quantization"]["seconds"], peak_mib,
            r["quantization"].get("narrow_layer_bits"), (r["quantization"].get("mixed_precision") or {}).get("average_bits"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(METHOD_OF), choices=list(METHOD_OF))
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + [MIXED])
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="reconstruction steps per block (default: each method's)")
    ap.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="a method option for every row but min-max (an ablation; the rows then say so)")
    ap.add_argument("--work", type=Path, default=None, help="keep each run's output folder here (default: a temp dir)")
    add_io_arguments(ap)
    args = ap.parse_args()
    data = args.shared / "data" / "cifar10"
    val = scan_images(data / "val", require_labels=True)
    _, held_out = val_halves(val)
    ctx = multiprocessing.get_context("spawn")
    extra = dict(args.option)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for z in args.models:
            steps = args.steps if args.steps is not None else OPTIONS[METHOD_OF[z]].auto_steps
            ckpt = args.shared / "zoo" / f"{z}.pth"
            loaded = load(checkpoint=ckpt)
            runs, narrow_note = [], None
            for bits in args.bits:
                for variant in args.variants:
                    if variant == MIXED and METHOD_OF[z] != "mptq":
                        print(f"{z}: greedy mixed precision is mptq's; no {MIXED} row", flush=True)
                        continue
                    job = QuantizeJob(out=work / f"{z}_{variant}_{bits}", checkpoint=ckpt,
                                      config=_config(z, variant, bits, steps, extra), calib_dir=data / "train",
                                      calib_size=args.calib_size, latency_rounds=1, force=True)
                    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # a fresh process: its own peak memory
                        path, seconds, peak, narrow, average = pool.submit(_quantize_in_own_process, job).result()
                    runs.append((bits, variant, path, seconds, peak, average))
                    narrow_note = narrow or narrow_note
                    print(runs[-1], flush=True)
            files = {"fp32": runs[0][2].parent / "model.fp32.onnx", **{str(i): r[2] for i, r in enumerate(runs)}}
            logits, labels, _ = collect_logits({k: onnx_predictor(make_session(p)) for k, p in files.items()},
                                               val, loaded.preprocessing, 100)
            label_map = label_map_to_model(val, loaded.preprocessing.class_names, loaded.num_classes)
            in_b = np.isin(np.asarray([str(p) for p in val.paths]), [str(p) for p in held_out.paths])

            def measured(key: str, rows: np.ndarray) -> tuple[float, float, float]:
                ref, out = logits["fp32"][rows], logits[key][rows]
                top1 = summarize(out, labels[rows], label_map, loaded.num_classes)["top1"]
                float_top1 = summarize(ref, labels[rows], label_map, loaded.num_classes)["top1"]
                close = fidelity(ref, out)
                return close["top1_agreement"], float_top1 - top1, close["kl"]

            every = np.ones(len(val), dtype=bool)
            rows = []
            for i, (bits, variant, _, seconds, peak, average) in enumerate(runs):
                (ab, db, kb), (aa, da, ka) = measured(str(i), in_b), measured(str(i), every)
                recon = (f"reconstruction ({steps} steps/block"
                         + (", images with mirrors and shifts)" if RECONSTRUCTION_AUGMENT else ")"))
                if variant == MIXED:
                    choices = "/".join(map(str, mptq.MptqOptions.bit_choices))
                    label = f"{METHOD_OF[z]} greedy mixed precision over widths {choices}, average {average:.3f} (`--target-bits {bits}`) + {recon}"
                else:
                    label = {"minmax": "min-max", "method": METHOD_OF[z], "reconstruction": f"{METHOD_OF[z]} + {recon}"}[variant]
                if extra and variant != "minmax":
                    label += ", " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in extra.items())
                label += " (the default)" if _is_default(z, variant, bits, steps) and not extra else ""
                width = f"W{bits}A{bits}" if variant != MIXED else f"mixed, {bits} avg"
                rows.append(f"| {width} | {label} | {ab:.2f} | {db:.2f} | {kb:.4f} | {aa:.2f} | {da:.2f} | {ka:.4f} "
                            f"| {seconds:.0f} | {peak:.0f} |")
            float_b = summarize(logits["fp32"][in_b], labels[in_b], label_map, loaded.num_classes)["top1"]
            publish(args.out, f"frontier_{z}", f"Accuracy frontier on {z} (float top-1 {float_b:.2f} on half B)",
                    f"{args.calib_size} calibration images (seed 0) from `cifar10/train`; exported QDQ artifacts in "
                    f"onnxruntime; half B = the {len(held_out)} val images no variant was tuned on (`common.val_halves`), "
                    f"all = the {len(val)} val images. Wall: the method (`quantization.seconds`), 1 torch thread; "
                    "peak: the whole quantize run's resident memory. Min-max rows: placement partial; method rows: the "
                    "placement the CLI gives the method (`partial-wide` at W8A8, `partial` below; `api.method_placement`)."
                    + (f" Below W8 every row keeps the narrow layers ({len(narrow_note['layers'])}: fewer than 64 products "
                       f"per output, {100 * narrow_note['mac_share']:.1f} % of the quantized MACs) at "
                       f"{narrow_note['bits']} bits (`QuantConfig.narrow_layer_bits`, docs/quantization.md)."
                       if narrow_note else ""),
                    ["bits", "method", "agreement % (B)", "drop (B)", "KL (B)", "agreement % (all)", "drop (all)",
                     "KL (all)", "wall s", "peak MiB"], rows)


if __name__ == "__main__":
    main()
