"""Every shipped pipeline recipe on the reference models: what each step measured and its gate.

    python benchmarks/bench_recipes.py --out benchmarks/RESULTS.md [--runs runs]

Runs each recipe into RUNS/<name> (a folder holding a finished run of it is reused: `vitcompress run`
skips steps whose inputs did not change) and tabulates the final artifact and its check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, add_io_arguments, cpu_line, publish  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

from vitcompress.pipeline import load_recipe, run_recipe  # noqa: E402

RECIPES = ["mobilevit_w8a8_fast", "mobilevitv2_w6a6_qhyvit", "deit_w4a4_mptq", "deit_mp5_greedy", "deit_prune2x_w8a8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_io_arguments(ap)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where each recipe's run folder goes")
    args = ap.parse_args()
    rows = []
    for name in RECIPES:
        manifest = run_recipe(load_recipe(ROOT / "recipes" / f"{name}.yaml"), args.runs / name)
        reports = {s["kind"]: json.loads((args.runs / name / s["folder"] / "step.json").read_text())["report"]
                   for s in manifest["steps"]}
        q, c = reports.get("quantize", {}), reports["check"]
        prune = reports.get("prune")
        bar = f"≤ {c['max_drop']:g}" + (f", ≥ {c['min_agreement']:g} %" if c.get("min_agreement") is not None else "")
        rows.append(f"| `{name}` | {q.get('bits', {}).get('label', '–')} | "
                    f"{(format(prune['latency']['speedup'], '.2f') + '×') if prune else '–'} | {q['latency']['speedup']:.2f}× | "
                    f"{c['baseline_accuracy']['top1']:.2f} | {c['artifact_accuracy']['top1']:.2f} | {c['drop']:.2f} | "
                    f"{c['top1_agreement']:.2f} | {bar} | {'pass' if c['passed'] else 'FAIL'} |")
    publish(args.out, "bench_recipes", "Shipped recipes on the reference models",
            f"{cpu_line()} Each recipe's check step runs the final artifact and the float model "
            "it started from on all 5,000 images of `shared/data/cifar10/val` in onnxruntime; speedups are the steps' own "
            "side-by-side measurements (1 thread, batch 1, 32 px inputs, where per-node overhead dominates).",
            ["recipe", "label", "prune speedup", "quantize speedup vs its input", "float top-1", "final top-1", "drop",
             "agreement %", "gate (drop, agreement)", "check"], rows)


if __name__ == "__main__":
    main()
