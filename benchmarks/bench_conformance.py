"""Every model family × every method, measured: does it work, is the export faithful, how much runs
in integer kernels, is it faster than float, how long did it take.

    python benchmarks/bench_conformance.py [--families DeiT,Swin] [--methods float,speed] [--resume] [--cpu 1]
    python benchmarks/bench_conformance.py --time     # then, on an otherwise idle machine

One cell = one family (its smallest timm member, random weights, native input size) × one method,
run in its own process, so a crash or a hang is that cell's "failed" and nothing else's. Cells use
only the bundled images (calib/train to calibrate, calib/val to compare the export with the torch
model), so the table is reproducible on a fresh clone. Statuses:

- ok: the method ran and its artifact exported; the numbers are that run's.
- unsupported: refused before any work by the family × method table (``vitcompress.support``),
  with its reason; the cell checks the refusal really happens.
- failed: anything else (an error, a traceback, a timeout), with its last line.

Two phases, because the cells' work may share the machine but their timing may not (a neighbour on
the other core moved one fp32/int8 ratio from 2.1x to 1.3x). The cells keep their artifacts under
bench-out/conformance/ (their in-run latency uses a few rounds and is not reported); ``--time``
then times every ok cell's compressed artifact against its fp32 one, alternated, one cell after
the other, and only those ratios are published. Run it with nothing else on the machine.

Writes benchmarks/conformance.json (one record per cell; ``--resume`` keeps the records of cells
already run), benchmarks/CONFORMANCE.md and the README's supported-model table from it.
``--cpu N`` pins the cells to one core (two runs on different columns may then share the machine).
"""
from __future__ import annotations

import argparse
import datetime as dt
from collections import Counter
import json
import os
import subprocess
import sys
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import ROOT  # the script's own folder is on sys.path
sys.path.insert(0, str(ROOT))

CONFORMANCE_JSON = ROOT / "benchmarks" / "conformance.json"
CONFORMANCE_MD = ROOT / "benchmarks" / "CONFORMANCE.md"
ARTIFACTS = ROOT / "bench-out" / "conformance"  # each cell's output folder, kept for the timing phase
README = ROOT / "README.md"
CALIB, EVAL = ROOT / "calib" / "train", ROOT / "calib" / "val"
CALIB_SIZE, EVAL_SIZE, PRUNE_CALIB_SIZE = 32, 100, 64
LATENCY_ROUNDS = 30  # the timing phase, per cell
IN_RUN_LATENCY_ROUNDS = 2  # what the commands themselves time during the cells (not reported)
CHOICE_LATENCY_ROUNDS = 15  # ... except the default placement, which chooses by that timing
W8A8_MIN_AGREEMENT = 99.0
DECISIVE_MIN_IMAGES = 20  # fewer decisive images than this: the cell is too chaotic for that check to say much
# Q-HyViT's defaults take tens of minutes per 224-px model on one core; every piece still runs
QHYVIT_BUDGET = {"rounds": 1, "alphas": 10, "scale_tuning_steps": 20}
# Greedy mixed precision below 8 bits turns block reconstruction on (200 steps per block by default).
# Its cost is the isolated probes (one forward per layer and lower width) and one forward per step of
# the walk: with two widths there is one probe per layer and at most one step down per layer, which
# kept 224-px models (Swin: over 30 minutes with 4/6/8 bits) within a cell's time; every piece still runs
GREEDY_MP_BUDGET = {"target_bits": 7.0, "bit_choices": [6, 8], "reconstruction_steps": 20}


# The families users bring, each by its smallest timm member (fewest MACs), at native size.
FAMILY_MODELS: dict[str, str] = {
    "DeiT": "deit_tiny_patch16_224",
    "Swin Transformer": "swin_tiny_patch4_window7_224",
    "Swin Transformer v2": "swinv2_tiny_window8_256",
    "MobileViT v1": "mobilevit_xxs",
    "MobileViT v2": "mobilevitv2_050",
    "EfficientFormer v1": "efficientformer_l1",
    "EfficientFormer v2": "efficientformerv2_s0",
    "LeViT": "levit_128s",
    "EfficientViT (MIT)": "efficientvit_b0",
    "EfficientViT (MSRA)": "efficientvit_m0",
    "TinyViT": "tiny_vit_5m_224",
    "Next-ViT": "nextvit_small",
    "PVT v2": "pvt_v2_b0",
    "ConvNeXt": "convnext_atto",
    "CrossViT": "crossvit_tiny_240",
    "VOLO": "volo_d1_224",
    "ConViT": "convit_tiny",
    "SHViT": "shvit_s1",
    "RepViT": "repvit_m0_9",
    "FastViT": "fastvit_t8",
    "CaiT": "cait_xxs24_224",
    "CoaT": "coat_lite_tiny",
    "Twins": "twins_svt_small",
    "PoolFormer": "poolformer_s12",
    "EdgeNeXt": "edgenext_xx_small",
}


@dataclass(frozen=True)
class Method:
    """One column: how a cell runs it (in the cell's process) and what its name is in the support table."""

    name: str
    about: str
    support_name: str  # the method's name in vitcompress.support (quantize --method / prune --method)
    run: Callable[[str, Path], dict]


def _quantize(arch: str, out: Path, **config) -> dict:
    from vitcompress import QuantConfig, QuantizeJob, quantize

    placement = config.pop("placement", "partial")
    with_eval = placement != "default"  # default judges itself on held-out calibration images (label-free)
    job = QuantizeJob(out=out, model=arch, pretrained=False, config=QuantConfig(placement=placement, **config),
                      calib_dir=CALIB, calib_size=CALIB_SIZE, eval_dir=EVAL if with_eval else None,
                      eval_size=EVAL_SIZE, latency_rounds=IN_RUN_LATENCY_ROUNDS if with_eval else CHOICE_LATENCY_ROUNDS)
    r = quantize(job)
    row = {"agreement_vs_torch": r["accuracy"]["export_vs_torch_agreement"] if with_eval else None,
           "integer_mac_share": r["coverage"]["integer_mac_share"],
           "artifacts": _artifact_pair(out, r["artifacts"]["quantized"]["path"]),
           "label": r["bits"]["label"], "simulated_layers": len(r["coverage"]["simulated_layers"])}
    if with_eval:
        row.update(simulation_checks(out / r["artifacts"]["checkpoint"]["path"], out / r["artifacts"]["quantized"]["path"]))
    row["float_macs_by_op"] = {op: round(share, 3) for op, share in list(r["coverage"]["float_mac_share_by_op"].items())[:3]}
    if "placement_auto" in r:
        row["chosen"] = r["placement_auto"]["chosen"]
        row["agreement_vs_fp32"] = r["holdout_fidelity"]["top1_agreement"]
    return row


def simulation_checks(checkpoint: Path, artifact: Path) -> dict:
    """How close the exported artifact is to its torch simulation, and what closer would even mean,
    on the cells' evaluation images.

    ``float_rounding_floor``: top-1 agreement of the simulation computed in float32 with itself in
    float64: how many decisions float rounding alone flips. A random-weight network is chaotic (its
    top-2 logits are near ties, and one activation rounded to the neighbouring grid point spreads
    through every later block), so an export can be no closer to its simulation than this, whatever
    its kernels do. ``disagreement_margin``: the largest top-1/top-2 logit gap of the simulation, in
    units of its logits' standard deviation, over the images where the artifact's top-1 differs. A
    missing or misplaced quantizer flips clear decisions too; flips confined to near ties (margins of
    a few hundredths) are rounding, not a fault. ``decisive_agreement``: the agreement on the
    ``decisive_images``, those whose gap is wider than every gap float rounding alone flipped (the
    float64/float32 comparison): decisions rounding cannot move, which an export must keep."""
    import copy

    import numpy as np
    import torch

    from vitcompress import load
    from vitcompress.artifacts import evaluation_images
    from vitcompress.data import load_tensor
    from vitcompress.evaluate import fidelity
    from vitcompress.export import make_session
    from vitcompress.export.runtime import run_session

    loaded = load(checkpoint=checkpoint)
    images, _ = evaluation_images(loaded, EVAL, EVAL_SIZE, 0)
    x = load_tensor(images, loaded.preprocessing)
    with torch.no_grad():
        single = torch.cat([loaded.model(b) for b in x.split(32)]).numpy()
    session = make_session(artifact)
    exported = np.concatenate([run_session(session, b.numpy()) for b in x.split(32)])
    top2 = np.sort(single, axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0]) / single.std()
    flipped = single.argmax(1) != exported.argmax(1)
    checks = {"disagreement_margin": float(margins[flipped].max()) if flipped.any() else 0.0, "float_rounding_floor": None}
    model64 = copy.deepcopy(loaded.model).double()
    try:
        with torch.no_grad():
            double = torch.cat([model64(b.double()) for b in x.split(32)]).float().numpy()
    except RuntimeError:  # a module that builds float32 tensors of its own: no float64 reference
        return checks
    checks["float_rounding_floor"] = fidelity(double, single)["top1_agreement"]
    rounding_flips = double.argmax(1) != single.argmax(1)
    # Decisive images: a top-1/top-2 gap wider than any that float rounding alone flipped.
    decisive = margins > (margins[rounding_flips].max() if rounding_flips.any() else 0.0)
    checks["decisive_images"] = int(decisive.sum())
    checks["decisive_agreement"] = float(100.0 * (~flipped[decisive]).mean()) if decisive.any() else None
    return checks


def _prune(arch: str, out: Path, method: str) -> dict:
    from vitcompress.prune_api import PruneJob, prune

    job = PruneJob(out=out, model=arch, pretrained=False, method=method, target_flops=1.5, calib_dir=CALIB,
                   calib_size=PRUNE_CALIB_SIZE, latency_rounds=IN_RUN_LATENCY_ROUNDS, search_steps=100, search_minutes=8.0)
    r = prune(job)
    return {"macs_reduction": r["pruning"]["macs_reduction"], "artifacts": _artifact_pair(out, r["artifacts"]["pruned"]["path"])}


def _artifact_pair(out: Path, compressed: str) -> dict:
    """The cell's fp32 and compressed files, relative to ARTIFACTS (for the timing phase)."""
    return {"fp32": str((out / "model.fp32.onnx").relative_to(ARTIFACTS)), "compressed": str((out / compressed).relative_to(ARTIFACTS))}


def _float(arch: str, out: Path) -> dict:
    """The float export alone, and its agreement with the torch model it came from."""
    from vitcompress import load
    from vitcompress.artifacts import evaluation_images, onnx_metadata
    from vitcompress.evaluate import PredictorSource, evaluate, fidelity
    from vitcompress.export import export_float

    loaded = load(arch, None, pretrained=False)
    out.mkdir(parents=True)
    path = out / "model.fp32.onnx"
    export_float(loaded.model, loaded.preprocessing.input_size, path, onnx_metadata(loaded, "fp32"))
    images, _ = evaluation_images(loaded, EVAL, EVAL_SIZE, 0)
    logits, _, _ = evaluate({"onnx": PredictorSource(onnx=str(path)), "torch": PredictorSource(module=loaded.model)},
                            images, loaded.preprocessing)
    return {"agreement_vs_torch": fidelity(logits["torch"], logits["onnx"])["top1_agreement"]}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("float", "float ONNX export", "float", _float),
    Method("partial", "W8A8 min-max, placement partial", "minmax", lambda a, o: _quantize(a, o, placement="partial")),
    Method("speed", "W8A8 min-max, placement speed", "minmax", lambda a, o: _quantize(a, o, placement="speed")),
    Method("default", "W8A8 min-max, the default (measured) placement", "minmax",
           lambda a, o: _quantize(a, o, placement="default")),
    Method("qhyvit", "W8A8 Q-HyViT at a reduced budget (1 search round of 10 candidates, 20 scale-tuning steps)",
           "qhyvit", lambda a, o: _quantize(a, o, method="qhyvit", method_options=QHYVIT_BUDGET)),
    Method("mptq", "W8A8 MPTQ (SQ-b, OPT-m)", "mptq", lambda a, o: _quantize(a, o, method="mptq")),
    Method("greedy-mp", "MPTQ greedy mixed precision over 6/8 bits to 7 bits on average (block reconstruction at 20 steps per block)", "mptq",
           lambda a, o: _quantize(a, o, method="mptq", method_options=GREEDY_MP_BUDGET)),
    Method("lpvit", "LPViT unit pruning to 1.5x fewer MACs", "lpvit", lambda a, o: _prune(a, o, "lpvit")),
    Method("ofb", "OFB search to 1.5x fewer MACs (100 steps)", "ofb", lambda a, o: _prune(a, o, "ofb")),
)}


def run_cell(family: str, method: str) -> dict:
    """One cell, in this process: its record (status, reason, numbers, wall time)."""
    import torch

    from vitcompress.errors import VitcompressError
    from vitcompress.models import family_of
    from vitcompress.support import unsupported_reason

    torch.set_num_threads(1)
    torch.manual_seed(0)
    arch, spec = FAMILY_MODELS[family], METHODS[method]
    planned = unsupported_reason(family_of(arch), spec.support_name)
    started = time.perf_counter()
    record: dict = {"family": family, "arch": arch, "method": method, "date": dt.date.today().isoformat(), "cpu": _cpu()}
    out = ARTIFACTS / arch / method
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        record.update(spec.run(arch, out))
        record["status"] = "ok" if planned is None else "failed"
        if planned is not None:
            record["reason"] = f"the support table says unsupported ({planned}) but it ran"
    except VitcompressError as e:
        said = str(e)
        record["status"] = "unsupported" if planned is not None and planned in said else "failed"
        record["reason"] = said.splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001  (any crash is this cell's failure, reported, not raised)
        record["status"] = "failed"
        record["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["finished"] = _now()
    return record


def _cpu() -> str:
    from vitcompress.cpu import this_cpu

    cpu = this_cpu()
    return f"{cpu['model']} ({cpu['isa']})"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _cell_in_child(family: str, method: str, timeout: float, cpu: int | None) -> dict:
    cmd = [sys.executable, __file__, "--cell", family, method] + ([] if cpu is None else ["--cpu", str(cpu)])
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"family": family, "arch": FAMILY_MODELS[family], "method": method, "status": "failed",
                "reason": f"timed out after {timeout:.0f} s", "wall_s": round(time.perf_counter() - started, 1), "finished": _now()}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"family": family, "arch": FAMILY_MODELS[family], "method": method, "status": "failed",
            "reason": f"process exited {done.returncode}: {last[:300]}", "wall_s": round(time.perf_counter() - started, 1),
            "finished": _now()}


def diagnose_cells(records: dict[tuple[str, str], dict]) -> None:
    """Fill ``simulation_checks`` for ok quantize cells that lack them, from their kept artifacts."""
    for key, r in records.items():
        if r["status"] != "ok" or r.get("agreement_vs_torch") is None or "disagreement_margin" in r:
            continue
        out = ARTIFACTS / r["arch"] / r["method"]
        checkpoints = sorted(out.glob("model.*.pth"))
        if not checkpoints or "artifacts" not in r:
            continue
        r.update(simulation_checks(checkpoints[0], ARTIFACTS / r["artifacts"]["compressed"]))
        print(f"{r['family']:22s} {r['method']:10s} floor {r['float_rounding_floor']} margin {r['disagreement_margin']:.3f}", flush=True)
        publish({key: r})


def time_cells(records: dict[tuple[str, str], dict]) -> None:
    """The timing phase: each ok cell's compressed artifact against its fp32 one, alternated, 1 thread."""
    import onnx

    from vitcompress.export import compare_latency

    for key, r in records.items():
        if r["status"] != "ok" or "artifacts" not in r:
            continue
        fp32, compressed = (ARTIFACTS / r["artifacts"][k] for k in ("fp32", "compressed"))
        if not (fp32.exists() and compressed.exists()):
            print(f"{r['family']} × {r['method']}: artifacts gone (re-run the cell); not timed", flush=True)
            continue
        dims = onnx.load(str(fp32), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        shape = (1, *(d.dim_value for d in dims[1:]))
        lat = compare_latency({"fp32": fp32, "compressed": compressed}, shape, threads=1, rounds=LATENCY_ROUNDS)
        r["speedup"] = lat["fp32"]["median_ms"] / lat["compressed"]["median_ms"]
        r["latency_ms"] = {k: round(v["median_ms"], 2) for k, v in lat.items()}
        r["timed"], r["timed_on"] = dt.date.today().isoformat(), _cpu()
        print(f"{r['family']:22s} {r['method']:10s} {r['speedup']:.2f}x", flush=True)
        publish({key: r})


def _fmt(v, pattern: str) -> str:
    return "—" if v is None else pattern.format(v)


def _cell_text(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r["status"] != "ok":
        return f"**{r['status']}**"
    if r["method"] == "float":
        return f"ok · {_fmt(r.get('agreement_vs_torch'), '{:.1f}%')}"
    ratio = _fmt(r.get("speedup"), "{:.2f}x")
    if r["method"] in ("lpvit", "ofb"):
        return f"ok · {ratio}"
    parts = [f"ok · {ratio}", f"int {100 * r['integer_mac_share']:.0f}%"]
    if r.get("agreement_vs_torch") is not None:
        floor, margin = r.get("float_rounding_floor"), r.get("disagreement_margin")
        parts.append(f"{r['agreement_vs_torch']:.1f}%" + ("" if floor is None else f" ({floor:.1f}%)")
                     + ("" if not margin else f" m{margin:.2f}"))
    if r.get("decisive_agreement") is not None:
        parts.append(f"decisive {r['decisive_agreement']:.0f}% of {r['decisive_images']}")
    if r.get("chosen"):
        parts.append(r["chosen"])
    return " · ".join(parts)


def _where_cells_ran(records: dict[tuple[str, str], dict]) -> str:
    """Cells are run and re-run over time, on whatever machine a run had: say when and where."""
    dates = sorted(r["date"] for r in records.values() if r.get("date"))
    cpus = Counter(r.get("cpu", "CPU not recorded") for r in records.values())
    timed = Counter(r.get("timed_on", "CPU not recorded") for r in records.values() if r.get("timed"))
    span = f"Cells ran {dates[0]} to {dates[-1]}" if dates else "Cells ran"
    return (f"{span}, on: " + "; ".join(f"{c} ({n} cells)" for c, n in cpus.most_common())
            + ". Timed on: " + ("; ".join(f"{c} ({n} cells)" for c, n in timed.most_common()) or "none yet") + ".")


def _markdown(records: dict[tuple[str, str], dict]) -> str:
    families, methods = list(FAMILY_MODELS), list(METHODS)
    counts = {s: sum(1 for r in records.values() if r["status"] == s) for s in ("ok", "unsupported", "failed")}
    lines = [
        "# Conformance: every family × every method", "",
        f"Made by `make conformance` (`python benchmarks/bench_conformance.py`); published {dt.date.today().isoformat()}. "
        + _where_cells_ran(records), "",
        "Each family by its smallest timm member, random weights, native input size; calibration on "
        f"{CALIB_SIZE} bundled images (`calib/train`; {PRUNE_CALIB_SIZE} for pruning), the export compared with "
        f"its torch model on {EVAL_SIZE} bundled images (`calib/val`). A cell reads: status · fp32/compressed latency "
        f"ratio (onnxruntime, 1 thread, {LATENCY_ROUNDS} alternated rounds, timed cell after cell on an otherwise idle machine "
        "after all cells ran; — where not timed) · share of MACs in integer kernels · top-1 agreement of the "
        "exported artifact with its torch simulation (in brackets: the same simulation computed in float64 vs float32, the floor float rounding alone sets on random weights; m: the largest top-1/top-2 logit gap, in logit standard deviations, among the images where they disagree — near ties are rounding, clear decisions flipped would be a fault; decisive: the agreement on the images whose gap is wider than every gap float rounding alone flipped, and how many they are) · for `default`, the placement it chose (judged on held-out "
        "calibration images). `unsupported` cells are decisions of `vitcompress/support.py`, refused in one line "
        "before any work; their reasons are listed below the table.", "",
        f"Cells: {counts['ok']} ok, {counts['unsupported']} unsupported, {counts['failed']} failed, "
        f"{len(families) * len(methods) - len(records)} not run.", "",
        "Methods: " + "; ".join(f"`{m}` = {METHODS[m].about}" for m in methods) + ".", "",
        "| family (model) | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods),
    ]
    for f in families:
        cells = [_cell_text(records.get((f, m))) for m in methods]
        lines.append(f"| {f} (`{FAMILY_MODELS[f]}`) | " + " | ".join(cells) + " |")
    notes = [r for r in records.values() if r["status"] != "ok"]
    if notes:
        lines += ["", "## Not ok, and why", "", "| family | method | status | reason |", "|---|---|---|---|"]
        lines += [f"| {r['family']} | {r['method']} | {r['status']} | {r['reason'].replace('|', '/')} |" for r in notes]
    low = [r for r in records.values() if r["status"] == "ok" and r["method"] not in ("float", "greedy-mp")
           and r.get("agreement_vs_torch") is not None and r["agreement_vs_torch"] < W8A8_MIN_AGREEMENT]
    judged = [r for r in records.values() if r["status"] == "ok" and r["method"] not in ("float", "greedy-mp")
              and r.get("decisive_agreement") is not None]
    decisive_low = [r for r in judged if r["decisive_images"] >= DECISIVE_MIN_IMAGES and r["decisive_agreement"] < W8A8_MIN_AGREEMENT]
    too_chaotic = [r for r in judged if r["decisive_images"] < DECISIVE_MIN_IMAGES]
    slow = [r for r in records.values() if r["status"] == "ok" and r["method"] == "default" and r.get("speedup", 1.0) < 1.0]
    lines += ["", "## Bars", "",
              f"- W8A8 cells whose export agrees with its torch simulation on less than {W8A8_MIN_AGREEMENT:g}% "
              "(in brackets: the float-rounding floor, the agreement of that simulation with itself computed in float64): "
              + (", ".join(f"{r['family']} × {r['method']} ({r['agreement_vs_torch']:.1f}% vs "
                           f"{_fmt(r.get('float_rounding_floor'), '{:.1f}%')}, flips at margins up to "
                           f"{_fmt(r.get('disagreement_margin'), '{:.3f}')})" for r in low) or "none") + ".",
              f"- W8A8 cells whose export flips decisive images (gaps wider than any float rounding flipped; agreement "
              f"below {W8A8_MIN_AGREEMENT:g}% on them; measured where the cell ran with this check): "
              + (", ".join(f"{r['family']} × {r['method']} ({r['decisive_agreement']:.1f}% of {r['decisive_images']})"
                           for r in decisive_low) or "none") + ".",
              f"- W8A8 cells with fewer than {DECISIVE_MIN_IMAGES} decisive images of {EVAL_SIZE} (float rounding alone flips "
              "decisions at wide gaps: too chaotic on random weights for the check above): "
              + (", ".join(f"{r['family']} × {r['method']} ({r['decisive_images']})" for r in too_chaotic) or "none") + ".",
              "- Families slower than float at W8A8 under the default placement, and the float operators holding "
              "most of their remaining MACs (what caps them): "
              + ("; ".join(f"{r['family']} ({r['speedup']:.2f}x; float: "
                           + (", ".join(f"{op} {100 * share:.0f}%" for op, share in r.get("float_macs_by_op", {}).items()) or "—") + ")"
                           for r in slow) or "none") + "."]
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- supported-models:start -->", "<!-- supported-models:end -->"


def _readme_table(records: dict[tuple[str, str], dict]) -> str:
    """Which methods each family supports, from the measured cells (not from hopes)."""
    rows = ["| family | smallest member measured | works | unsupported | not yet working |", "|---|---|---|---|---|"]
    for f, arch in FAMILY_MODELS.items():
        by = {s: [m for m in METHODS if (records.get((f, m)) or {}).get("status") == s] for s in ("ok", "unsupported", "failed")}
        rows.append(f"| {f} | `{arch}` | {', '.join(by['ok']) or '—'} | {', '.join(by['unsupported']) or '—'} | "
                    f"{', '.join(by['failed']) or '—'} |")
    return "\n".join(rows) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    from vitcompress.fileio import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _merged(records: dict[tuple[str, str], dict]) -> dict[tuple[str, str], dict]:
    """The records on file with this run's cells laid over them, the newer record of a cell winning
    (two runs may share the file: one must not put back a cell's old record over the other's new one)."""
    merged = {}
    if CONFORMANCE_JSON.exists():
        merged = {(r["family"], r["method"]): r for r in json.loads(CONFORMANCE_JSON.read_text())}
    for key, r in records.items():
        if r.get("finished", "") >= merged.get(key, {}).get("finished", ""):
            merged[key] = r
    return merged


def publish(records: dict[tuple[str, str], dict]) -> None:
    records = _merged(records)
    ordered = [records[k] for k in sorted(records, key=lambda k: (list(FAMILY_MODELS).index(k[0]), list(METHODS).index(k[1])))]
    _write_atomic(CONFORMANCE_JSON, json.dumps(ordered, indent=1) + "\n")
    _write_atomic(CONFORMANCE_MD, _markdown(records))
    text = README.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _write_atomic(README, f"{head}{README_START}\n{_readme_table(records)}{README_END}{rest.split(README_END, 1)[1]}")


def _names(arg: str | None, known: list[str], what: str) -> list[str]:
    if not arg:
        return known
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", help="comma-separated family names (default: all)")
    ap.add_argument("--methods", help="comma-separated method columns (default: all)")
    ap.add_argument("--resume", action="store_true", help="skip cells already ok or unsupported in conformance.json (failed ones run again)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a cell may run")
    ap.add_argument("--cpu", type=int, default=None, help="pin the cells to this core")
    ap.add_argument("--publish", action="store_true", help="only rewrite CONFORMANCE.md and the README table from conformance.json")
    ap.add_argument("--diagnose", action="store_true", help="add the simulation checks to ok cells run without them")
    ap.add_argument("--time", action="store_true", help="time every ok cell's artifacts (nothing else may run)")
    ap.add_argument("--cell", nargs=2, metavar=("FAMILY", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.cell:
        print(json.dumps(run_cell(*args.cell)))
        return
    from vitcompress.models import family_of

    misnamed = [f"{f} ({a} is {family_of(a)})" for f, a in FAMILY_MODELS.items() if family_of(a) != f]
    if misnamed:  # the support table is keyed by models.FAMILIES' names: the rows here must use them
        sys.exit(f"families named differently from vitcompress.models.FAMILIES: {', '.join(misnamed)}")
    families = _names(args.families, list(FAMILY_MODELS), "families")
    methods = _names(args.methods, list(METHODS), "methods")
    if args.publish:
        publish({})
        return
    if args.diagnose:
        diagnose_cells({k: r for k, r in _merged({}).items() if k[0] in families and k[1] in methods})
        return
    if args.time:
        time_cells({k: r for k, r in _merged({}).items() if k[0] in families and k[1] in methods})
        return
    done = _merged({})  # other cells' records stay; the cells asked for are re-run unless --resume
    records: dict[tuple[str, str], dict] = {}
    for method in methods:  # column by column: a partial run fills whole columns
        for family in families:
            if args.resume and done.get((family, method), {}).get("status") in ("ok", "unsupported"):
                continue
            r = _cell_in_child(family, method, args.timeout, args.cpu)
            records[(family, method)] = r
            print(f"{family:22s} {method:10s} {r['status']:12s} {r['wall_s']:7.1f}s  {_cell_text(r)}  {r.get('reason', '')}",
                  flush=True)
            publish(records)


if __name__ == "__main__":
    main()
