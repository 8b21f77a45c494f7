"""The Python API behind the CLI: quantize, export and check, each returning a report dict.

Algorithms live in quant/ and export/; this module wires models, images, artifacts and
measurements together. Progress is reported through a callback, never printed.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .artifacts import (RANDOM_WEIGHTS_NOTE, ProgressFn, calibration_images, environment, evaluation_images,  # noqa: F401
                        file_info, no_progress, onnx_metadata, report_head, save_checkpoint, write_report_documents)
from .cpu import compatibility, resolve_target, signed_matmul_operands
from .data import sample, without
from .errors import VitcompressError
from .evaluate import PredictorSource, evaluate, fidelity, summarize
from .export import (check_weight_format, compare_latency, export_float, export_qdq, get_runtime, int8_coverage,
                     update_metadata)
from .export.runtime import DEFAULT_RUNTIME
from .fileio import atomic_path, prepare_output_dir, write_json  # noqa: F401 (write_json re-exported for the CLI)
from .check import check  # noqa: F401 (the gate is part of the public API)
from .checkpoints import load, prune_extra
from .models import LoadedModel, family_of
from .support import check_supported
from .workers import LocalPool, RayPool, Workers, open_pool
from .quant import QuantConfig, float_state_dict, quant_state, quantize_
from .quant.options import method_options
from .quant.placement import CANDIDATES, check_placement_method, default_placement_order, get_placement, kind_of

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = PROJECT_ROOT / "calib" / "cifar10_vit_tiny.pth"
DEMO_CALIB = PROJECT_ROOT / "calib" / "train"
DEMO_EVAL = PROJECT_ROOT / "calib" / "val"
# Report fields that are timings: two runs on the same inputs and seed differ only there.
TIMING_FIELDS = ["created", "quantization.seconds", "latency"]



@dataclass
class QuantizeJob:
    """Everything `vitcompress quantize` needs; the CLI fills it from flags."""

    out: Path
    model: str | None = None
    checkpoint: Path | None = None
    pretrained: bool = True
    config: QuantConfig = field(default_factory=QuantConfig)
    calib_dir: Path | None = None
    calib_size: int = 256
    eval_dir: Path | None = None
    eval_size: int | None = None
    seed: int = 0
    force: bool = False
    batch_size: int = 32
    latency_rounds: int = 30
    latency_threads: int = 1
    latency_min_seconds: float = 2.0  # more rounds for fast models: the timed runs last about this long
    max_drop: float = 1.0  # --placement default/auto: top-1 points the chosen placement may lose on the eval set
    target_cpu: str = "auto"  # int8 kernels of the deployment CPU: auto (this machine), portable, vnni (see cpu.py)
    weight_format: str = "int8"  # int4: Linear weights of <= 4 bits stored packed as MatMulNBits (float GEMM)
    runtime: str = DEFAULT_RUNTIME  # where accuracy, latency and integer coverage are measured
    holdout_size: int = 256  # --placement default/auto without --eval: calibration-folder images it judges agreement on
    # ... and the agreement with fp32 (%) it asks of them (why 97: docs/quantization.md, "The default placement")
    min_agreement: float = 97.0
    workers: Workers = field(default_factory=Workers)  # where evaluation shards run (--workers, --ray-address)


@dataclass
class _Prepared:
    """What every placement tried for one job shares: the float model, its images and its fp32
    artifact (exported and evaluated once, then copied next to each candidate)."""

    loaded: LoadedModel
    family: str
    target_cpu: dict
    calib: torch.Tensor
    calibration: dict  # the report's "calibration" entry
    eval_set: list | None = None
    label_map: dict | None = None
    fp32_onnx: Path | None = None
    fp32_logits: np.ndarray | None = None  # the fp32 artifact's logits on eval_set
    holdout_set: object | None = None  # unlabelled images kept out of calibration (auto without --eval)
    holdout_fp32_logits: np.ndarray | None = None
    pool: LocalPool | RayPool = field(default_factory=LocalPool)  # where evaluation shards run


def _prepare(job: QuantizeJob, pool: LocalPool | RayPool) -> _Prepared:
    if job.calib_dir is None:
        raise VitcompressError("calibration images are required: --calib DIR")
    _check_weight_format(job.weight_format, job.config.wbits)
    torch.manual_seed(job.seed)
    loaded = load(job.model, job.checkpoint, job.pretrained)
    if loaded.quant_state is not None:
        raise VitcompressError(f"{job.checkpoint} is already quantized; start from the float checkpoint")
    family = family_of(loaded.arch)
    check_supported(loaded.arch, family, job.config.method)
    get_runtime(job.runtime)  # a missing optional runtime fails before any work
    calib, calib_images, calib_sample, calibration = calibration_images(loaded, job.calib_dir, job.calib_size, job.seed)
    prepared = _Prepared(loaded, family, resolve_target(job.target_cpu), calib, calibration, pool=pool)
    if job.eval_dir is None and job.config.placement in MEASURED_PLACEMENTS:
        prepared.holdout_set = sample(without(calib_images, calib_sample), job.holdout_size, job.seed)
    if job.eval_dir is not None:
        prepared.eval_set, prepared.label_map = evaluation_images(loaded, job.eval_dir, job.eval_size, job.seed)
    return prepared


def quantize(job: QuantizeJob, progress: ProgressFn = no_progress) -> dict:
    """Load, calibrate, quantize, export float + QDQ ONNX, evaluate and time both on ``job.runtime``."""
    method_options(job.config)  # bad method options fail here, before any work
    check_placement_method(job.config.placement, job.config.method)
    if job.config.placement == DEFAULT_PLACEMENT and (job.config.method != "minmax" or job.config.method_options.get("layer_bits")):
        # A method's search (qhyvit, mptq) and per-layer bits (--bits-from) are defined on the layers
        # of the placement they were made with: the measured choice is the baseline method's.
        job = replace(job, config=replace(job.config, placement=method_placement(job.config)))
    with open_pool(job.workers) as pool:
        if job.config.placement in MEASURED_PLACEMENTS:
            report = _quantize_auto(job, progress, pool)
        else:
            out = prepare_output_dir(job.out, job.force, ["model.fp32.onnx", f"model.{job.config.label}.onnx", "report.json"])
            report = _quantize_prepared(job, _prepare(job, pool), out, progress)
    write_report_documents(Path(job.out), report)
    return report


def _quantize_prepared(job: QuantizeJob, prepared: _Prepared, out: Path, progress: ProgressFn) -> dict:
    """Quantize, export and evaluate (``_build``), then time the artifact next to its fp32 file."""
    report = _build(job, prepared, out, progress)
    progress("latency", 0, 1)
    report["latency"] = _latencies(job, out / "model.fp32.onnx", {"quantized": out / report["artifacts"]["quantized"]["path"]},
                                   prepared.loaded.preprocessing.input_size)["quantized"]
    report["timing_fields"] = TIMING_FIELDS
    progress("latency", 1, 1)
    write_json(out / "report.json", report)
    return report


def _latencies(job: QuantizeJob, fp32_path: Path, quantized: dict[str, Path], input_size: tuple[int, int, int]) -> dict[str, dict]:
    """Each quantized file's report "latency" entry: all of them timed alternately with the fp32 file
    in one process (on ``job.runtime``, and the fp32 file on the default runtime too where that differs:
    speedups are judged against the fastest float deployment as well)."""
    entries: dict = {"fp32": fp32_path}
    if job.runtime != DEFAULT_RUNTIME:
        entries[f"fp32_{DEFAULT_RUNTIME}"] = (fp32_path, DEFAULT_RUNTIME)
    entries.update({f"quantized:{name}": path for name, path in quantized.items()})
    lat = compare_latency(entries, (1, *input_size), threads=job.latency_threads, rounds=job.latency_rounds, runtime=job.runtime,
                          min_seconds=job.latency_min_seconds)
    floats = {k: v for k, v in lat.items() if k.startswith("fp32")}
    fastest_fp32 = min(v["median_ms"] for v in floats.values())
    result = {}
    for name in quantized:
        q = lat[f"quantized:{name}"]
        result[name] = {**floats, "quantized": q, "speedup": lat["fp32"]["median_ms"] / q["median_ms"],
                        "speedup_vs_fastest_fp32": fastest_fp32 / q["median_ms"]}
    return result


def _build(job: QuantizeJob, prepared: _Prepared, out: Path, progress: ProgressFn) -> dict:
    """Quantize, export, check the integer promise, save the checkpoint and evaluate: the report of
    one artifact, all but its timing."""
    loaded, family, target_cpu = prepared.loaded, prepared.family, prepared.target_cpu
    prep, calib = loaded.preprocessing, prepared.calib
    eval_set, label_map = prepared.eval_set, prepared.label_map
    cfg = replace(job.config, reduce_range=job.config.reduce_range or target_cpu["reduce_range"])
    qname = f"model.{cfg.label}.onnx"
    torch.manual_seed(job.seed)

    qmodel = copy.deepcopy(loaded.model)
    started = time.perf_counter()
    result = quantize_(qmodel, cfg, calib.split(job.batch_size), lambda d, t: progress("calibrate", d, t), family,
                       map_shards=None if prepared.pool.in_process else prepared.pool.map)
    method_seconds = time.perf_counter() - started

    progress("export", 0, 2)
    fp32_path, q_path = out / "model.fp32.onnx", out / qname
    label = honest_label(cfg, {})
    common = {"method": cfg.method, "wbits": cfg.wbits, "abits": cfg.abits, "label": label}
    if _fp32_artifact(prepared, fp32_path) != fp32_path:
        with atomic_path(fp32_path) as tmp:
            shutil.copyfile(prepared.fp32_onnx, tmp)
    progress("export", 1, 2)
    metadata = onnx_metadata(loaded, "quantized", quantization=common, target_cpu=target_cpu)
    export_info = export_qdq(qmodel, prep.input_size, q_path, metadata,
                             weight_format=job.weight_format, signed_matmul_operands=signed_matmul_operands(cfg.reduce_range))
    progress("export", 2, 2)
    progress("coverage", 0, 1)
    coverage = int8_coverage(q_path, job.runtime)  # what the runtime runs: the label and the integer promise
    progress("coverage", 1, 1)
    honest = honest_label(cfg, coverage)  # what the runtime runs decides the label: artifact, checkpoint, report
    if honest != label:
        label = common["label"] = honest
        update_metadata(q_path, {"quantization": common})
    ckpt_path = out / f"model.{cfg.label}.pth"
    save_checkpoint(ckpt_path, loaded, float_state_dict(qmodel),
                    quant_state={"config": asdict(cfg), "quantizers": quant_state(qmodel),
                                 "folded_pairs": [list(p) for p in result.folded_pairs],
                                 "folded_scales": [list(p) for p in result.folded_scales]},
                    provenance={"source": loaded.source, **common}, **prune_extra(loaded.model))

    report = {
        **report_head("quantize", loaded),
        "method": cfg.method,
        "bits": {"weights": cfg.wbits, "activations": cfg.abits, "label": label,
                 "simulated": cfg.simulated},
        "config": asdict(cfg),
        "target_cpu": target_cpu,
        "cpu_compatibility": compatibility(export_info["numerics"]),
        "calibration": prepared.calibration,
        "quantization": {**result.summary(), "seconds": round(method_seconds, 2), "threads": torch.get_num_threads()},
        "workers": prepared.pool.info,  # where calibration (min-max) and evaluation shards ran
        "export": export_info,
        "artifacts": {"fp32": file_info(fp32_path), "quantized": file_info(q_path), "checkpoint": file_info(ckpt_path)},
        "environment": environment(),
        "coverage": coverage,
        "notes": [],
    }
    if not loaded.accuracy_meaningful:
        report["notes"].append(RANDOM_WEIGHTS_NOTE)

    if report["cpu_compatibility"]["note"]:
        report["notes"].append(report["cpu_compatibility"]["note"])
    broken = integer_promises_broken(qmodel, cfg, result.plan.weighted, coverage)
    if broken:
        report["error"] = f"layers expected to run as integer kernels run float: {broken}"
        write_json(out / "report.json", report)
        raise VitcompressError(
            f"{len(broken)} layer(s) that placement '{cfg.placement}' must run as integer kernels ended up float in "
            f"{job.runtime} ({', '.join(broken[:4])}{', ...' if len(broken) > 4 else ''}); the artifact would be "
            f"simulated there, not integer (details: {out / 'report.json'})")

    if eval_set is not None:
        sources = {"quantized": PredictorSource(onnx=str(q_path), runtime=job.runtime), "torch_simulation": PredictorSource(module=qmodel)}
        if prepared.fp32_logits is None:
            sources["fp32"] = PredictorSource(onnx=str(fp32_path), runtime=job.runtime)
        logits, labels, stats = evaluate(sources, eval_set, prep, 64, lambda d, t: progress("evaluate", d, t), prepared.pool)
        if prepared.fp32_logits is None:
            prepared.fp32_logits = logits["fp32"]
        logits["fp32"] = prepared.fp32_logits
        acc_f = summarize(logits["fp32"], labels, label_map, loaded.num_classes)
        acc_q = summarize(logits["quantized"], labels, label_map, loaded.num_classes)
        report["accuracy"] = {
            "eval_dir": str(job.eval_dir), "images": stats.loaded, "skipped": stats.skipped,
            "measured_on": f"exported ONNX files in {job.runtime}",
            "fp32": acc_f, "quantized": acc_q,
            "drop": acc_f["top1"] - acc_q["top1"],
            **fidelity(logits["fp32"], logits["quantized"]),
            "export_vs_torch_agreement": fidelity(logits["torch_simulation"], logits["quantized"])["top1_agreement"],
        }

    if "path" in (report["quantization"].get("mixed_precision") or {}):
        # a greedy mixed-precision walk: its assignment (reused by --bits-from) and its Pareto plot
        from .mptq_files import write_mixed_precision_files

        for name, path in write_mixed_precision_files(out, report).items():
            report["artifacts"][name] = file_info(path)
    if prepared.holdout_set is not None:
        report["holdout_fidelity"] = _holdout_fidelity(prepared, fp32_path, q_path, job.runtime, progress)
    return report


def _held_to_target(report: dict, target_cpu: dict) -> tuple[dict | None, str | None]:
    """A built candidate, or why the automatic choice may not keep it: a portable target promises an
    artifact exact on every CPU, and this one's integer kernels need int32 accumulation (int8
    activation operands or full-range weights, read from the file: ``cpu.target_of_numerics``)."""
    needs = report["export"]["numerics"]["target"]
    if target_cpu["resolved"] == "portable" and needs != "portable":
        return None, (f"its artifact needs a {needs} target (int8 activation operands or full-range weights), "
                      f"this one is {target_cpu['resolved']}")
    return report, None


def _candidates_on_workers(trial_jobs: dict[str, QuantizeJob], prepared: _Prepared, scratch: Path,
                           progress: ProgressFn) -> dict[str, tuple[dict | None, str | None]]:
    """Every candidate built (quantized, exported, evaluated) as a worker task, then all of them timed
    here, side by side with the fp32 file in one alternated run: timing on busy workers would measure
    the neighbours. The fp32 file and its logits are made here first, once, on the pool. Each
    candidate's evaluation runs the same fixed shards as in one process, so its numbers are the same;
    unlike one process, every candidate is built (no stop at the first good one in the default order)."""
    loaded, any_job = prepared.loaded, next(iter(trial_jobs.values()))
    fp32_path = _fp32_artifact(prepared, prepare_output_dir(scratch / ".fp32", True, []) / "model.fp32.onnx")
    for images, attr in ((prepared.eval_set, "fp32_logits"), (prepared.holdout_set, "holdout_fp32_logits")):
        if images is not None:
            logits, _, _ = evaluate({"fp32": PredictorSource(onnx=str(fp32_path), runtime=any_job.runtime)}, images,
                                    loaded.preprocessing, 64, lambda d, t: progress("fp32 eval", d, t), prepared.pool)
            setattr(prepared, attr, logits["fp32"])
    shipped = replace(prepared, pool=LocalPool())  # inside a task, everything runs in that worker
    outs = {p: prepare_output_dir(scratch / p, True, []) for p in trial_jobs}
    done = [0]

    def finished(i: int, _result) -> None:
        done[0] += 1
        progress("candidates", done[0], len(trial_jobs))

    progress("candidates", 0, len(trial_jobs))
    results = prepared.pool.map(_build_in_worker, [(j, shipped, outs[p]) for p, j in trial_jobs.items()], finished)
    built = {p: (r.get("report"), r.get("error")) for p, r in zip(trial_jobs, results)}
    ok = {p: r for p, (r, _) in built.items() if r is not None}
    if ok:
        progress("latency", 0, 1)
        latencies = _latencies(any_job, fp32_path, {p: outs[p] / r["artifacts"]["quantized"]["path"] for p, r in ok.items()},
                               loaded.preprocessing.input_size)
        progress("latency", 1, 1)
        for p, r in ok.items():
            r.update(latency=latencies[p], timing_fields=TIMING_FIELDS, workers=prepared.pool.info)
            write_json(outs[p] / "report.json", r)
    return built


def _fp32_artifact(prepared: _Prepared, path: Path) -> Path:
    """The job's fp32 artifact: exported to ``path`` the first time, shared by every candidate after."""
    if prepared.fp32_onnx is None:
        export_float(prepared.loaded.model, prepared.loaded.preprocessing.input_size, path, onnx_metadata(prepared.loaded, "fp32"))
        prepared.fp32_onnx = path
    return prepared.fp32_onnx


def _build_in_worker(job: QuantizeJob, prepared: _Prepared, out: Path) -> dict:
    """One candidate, as a worker task: its report, or the one-line reason it failed (a failed
    candidate is an answer, not a failed shard)."""
    try:
        return {"report": _build(job, prepared, out, no_progress)}
    except VitcompressError as e:
        return {"error": str(e)}


def _holdout_fidelity(prepared: _Prepared, fp32_path: Path, q_path: Path, runtime: str, progress: ProgressFn) -> dict:
    """Agreement and KL of the quantized artifact with the fp32 one on calibration-folder images that
    calibration did not see: a label-free accuracy check (a top-1 drop is at most the disagreement)."""
    sources = {"quantized": PredictorSource(onnx=str(q_path), runtime=runtime)}
    if prepared.holdout_fp32_logits is None:
        sources["fp32"] = PredictorSource(onnx=str(fp32_path), runtime=runtime)
    logits, _, stats = evaluate(sources, prepared.holdout_set, prepared.loaded.preprocessing, 64,
                                lambda d, t: progress("agreement", d, t), prepared.pool)
    if prepared.holdout_fp32_logits is None:
        prepared.holdout_fp32_logits = logits["fp32"]
    return {"images": stats.loaded, "dir": str(prepared.holdout_set.root),
            **fidelity(prepared.holdout_fp32_logits, logits["quantized"])}


AUTO_PLACEMENT = "auto"  # every candidate measured; the fastest within the accuracy budget wins
DEFAULT_PLACEMENT = "default"  # candidates in the order of placement.DEFAULT_RULES; the first faster than float within budget wins
MEASURED_PLACEMENTS = (AUTO_PLACEMENT, DEFAULT_PLACEMENT)


def method_placement(config: QuantConfig) -> str:
    """The placement a method beyond minmax (qhyvit, mptq) runs on when none is asked for; its search
    is defined on that placement's layers. ``partial``; at W8A8 with one width for every layer,
    ``partial-wide``: narrow convs (fewer than 64 products per output) stay float, as 8-bit ones cost
    Q-HyViT 0.8 points of agreement on mobilevit_xxs and their int8 kernels do not pay (docs/quantization.md).
    Below 8 bits narrow layers keep 8 bits instead (``QuantConfig.narrow_layer_bits``)."""
    return "partial-wide" if (config.wbits, config.abits) == (8, 8) and config.uniform_widths else "partial"


AUTO_CANDIDATES = tuple(CANDIDATES)  # every candidate the placement table defines
# A candidate must run more than this share of its MACs in integer kernels: `linear` on MobileViT v2
# quantizes only the classifier (well under 1 %), a float model that must not stand for "int8".
MIN_INTEGER_SHARE = 0.25


def _auto_budget_kept(report: dict, max_drop: float, min_agreement: float) -> tuple[bool, str]:
    """Whether a candidate keeps the budget, and the measurement that says so: over a quarter of its
    MACs in integer kernels, and the top-1 drop on --eval within ``max_drop``, or else (no labels) top-1
    agreement with fp32 on held-out calibration images of at least ``min_agreement`` %. Random
    weights (--no-pretrained) have no accuracy to keep: only speed decides."""
    share = report["coverage"]["integer_mac_share"]
    if share <= MIN_INTEGER_SHARE:
        return False, f"{share:.1%} of MACs in integer kernels"
    if report["model"]["weights"] == "random":
        return True, "random weights: accuracy not judged"
    if "accuracy" in report:
        return report["accuracy"]["drop"] <= max_drop, f"top-1 drop {report['accuracy']['drop']:.2f}"
    agreement = report["holdout_fidelity"]["top1_agreement"]
    return agreement >= min_agreement, f"agreement {agreement:.2f}%"


def _quantize_auto(job: QuantizeJob, progress: ProgressFn, pool: LocalPool | RayPool) -> dict:
    """--placement auto / default: quantize with candidate placements, measure speed and accuracy of
    each exported artifact on ``job.runtime``, judge accuracy by ``job.max_drop`` (top-1 drop on
    --eval, or agreement with fp32 on held-out calibration images).

    auto measures every candidate and keeps the fastest within budget. default (the CLI's) tries
    the order that ``placement.DEFAULT_RULES`` gives for this runtime, family and CPU and keeps the
    first faster than float within budget (the same choice from run to run); when none is, the
    fastest within budget."""
    if job.max_drop < 0:
        raise VitcompressError(f"--max-drop must be >= 0, got {job.max_drop}")
    out = prepare_output_dir(job.out, job.force, ["report.json"])
    prepared = _prepare(job, pool)  # model, images and the fp32 artifact are shared by every candidate
    if prepared.holdout_set is not None and len(prepared.holdout_set) == 0:
        raise VitcompressError(f"--placement auto needs images to judge accuracy on: --eval DIR, or more images in "
                               f"{job.calib_dir} than --calib-size {job.calib_size} (the rest are held out)")
    judged_on = (f"top-1 drop on --eval <= {job.max_drop:g}" if prepared.eval_set is not None else
                 f"agreement with fp32 >= {job.min_agreement:g}% on {len(prepared.holdout_set)} held-out calibration images (no --eval)")
    first_good = job.config.placement == DEFAULT_PLACEMENT
    rule = default_placement_order(job.runtime, prepared.family, prepared.target_cpu["built_on"]["isa"])
    candidates = rule.order if first_good else AUTO_CANDIDATES
    trial_jobs, skipped = {}, {}
    for placement in candidates:
        candidate = CANDIDATES[placement]
        if candidate.act_symmetric and not prepared.target_cpu["signed_matmul_operands"]:
            # int8 activations need int32 accumulation: not for a portable target
            skipped[placement] = f"signed activations need a vnni target (this one is {prepared.target_cpu['resolved']})"
            continue
        trial_jobs[placement] = replace(job, config=replace(job.config, placement=candidate.placement,
                                                            act_symmetric=job.config.act_symmetric or candidate.act_symmetric))
    with tempfile.TemporaryDirectory(prefix=".auto-", dir=out) as scratch:
        if prepared.pool.in_process:
            built = {}
            for placement, trial_job in trial_jobs.items():
                try:
                    built[placement] = _held_to_target(_quantize_prepared(
                        trial_job, prepared, prepare_output_dir(Path(scratch) / placement, True, []), progress), prepared.target_cpu)
                except VitcompressError as e:  # e.g. an integer promise the runtime did not keep
                    built[placement] = (None, str(e))
                r = built[placement][0]
                if r is None:
                    continue
                if first_good and r["latency"]["speedup"] > 1.0 and _auto_budget_kept(r, job.max_drop, job.min_agreement)[0]:
                    break
        else:
            built = _candidates_on_workers(trial_jobs, prepared, Path(scratch), progress) if trial_jobs else {}
            built = {p: (r, err) if r is None else _held_to_target(r, prepared.target_cpu) for p, (r, err) in built.items()}
        trials = [(p, None, skipped[p]) if p in skipped else (p, *built[p]) for p in candidates if p in skipped or p in built]
        summary = []
        for p, r, err in trials:
            if r is None:
                summary.append({"placement": p, "error": err})
                continue
            kept, measured = _auto_budget_kept(r, job.max_drop, job.min_agreement)
            summary.append({"placement": p, "speedup": r["latency"]["speedup"], "within_budget": kept, "measured": measured,
                            **({"drop": r["accuracy"]["drop"], "top1_agreement": r["accuracy"]["top1_agreement"]}
                               if "accuracy" in r else {"top1_agreement": r["holdout_fidelity"]["top1_agreement"]})})
        ok = [(p, r) for (p, r, _), t in zip(trials, summary) if t.get("within_budget")]
        if not ok:
            raise VitcompressError(f"no placement keeps the budget ({judged_on}, MACs in integer kernels): "
                                   + "; ".join(f"{t['placement']}: {t.get('measured', t.get('error'))}" for t in summary)
                                   + "; choose one with --placement, or set the budget (--eval with --max-drop, --min-agreement)")
        faster = [(p, r) for p, r in ok if r["latency"]["speedup"] > 1.0]
        if first_good and faster:
            chosen, report = faster[0]
        else:
            chosen, report = max(ok, key=lambda pr: pr[1]["latency"]["speedup"])
        for f in (Path(scratch) / chosen).iterdir():
            if f.name != "report.json":
                os.replace(f, out / f.name)
    speed = report["latency"]["speedup"]
    if first_good and speed > 1.0:
        why = (f"first of {'/'.join(rule.order)} (order for {job.runtime}, {prepared.family}, {prepared.target_cpu['built_on']['isa']}: "
               f"{rule.reason}) measured faster than fp32 ({speed:.2f}x) within budget: {judged_on}")
    else:
        why = f"fastest measured on {job.runtime} ({speed:.2f}x vs fp32) of the placements within budget: {judged_on}"
    if speed < 1.0:
        why += "; no placement is faster than float on this CPU"
        report["notes"].append(f"every placement is slower than float here ({job.runtime}, {report['cpu_compatibility']['cpu']['isa']}): "
                               f"the fastest is {speed:.2f}x")
    report["placement_auto"] = {"mode": job.config.placement, "max_drop": job.max_drop, "chosen": chosen, "judged_on": judged_on, "why": why,
                                "candidates": summary}
    report["timing_fields"] = [*TIMING_FIELDS, "placement_auto"]  # the choice itself follows measured speed
    write_json(out / "report.json", report)
    return report


def honest_label(cfg: QuantConfig, coverage: dict) -> str:
    """'int8' only when every quantized layer runs as an integer kernel in the exported model."""
    notes = ["simulated on an int8 grid"] if cfg.simulated else []
    weight_only = coverage.get("weight_only_layers") or []
    if weight_only:
        notes.append(f"{len(weight_only)} Linear layer(s): packed 4-bit weights computed in float")
    simulated = coverage.get("simulated_layers") or []
    if simulated and not cfg.simulated:
        notes.append(f"{coverage['integer_mac_share']:.0%} of MACs in integer kernels; "
                     f"{len(simulated)} layer(s) simulated: Q/DQ around a float kernel")
    return cfg.label + (f" ({'; '.join(notes)})" if notes else "")


def integer_promises_broken(model: torch.nn.Module, cfg: QuantConfig, layers: list[str], coverage: dict) -> list[str]:
    """Quantized layers of the kinds the placement promises as integer kernels that onnxruntime
    runs in float (a layer whose inputs a method chose to quantize per channel is simulated by choice)."""
    promised = get_placement(cfg.placement).integer_kinds
    simulated = set(coverage.get("simulated_layers") or [])
    broken = []
    for name in layers:
        m = model.get_submodule(name)
        if kind_of(m) in promised and name in simulated and not m.input_quantizer.spec.per_channel:
            broken.append(name)
    return broken


def _check_weight_format(weight_format: str, wbits: int | None) -> None:
    """int4 packing needs weights of at most 4 bits (None: a float model, which has none)."""
    check_weight_format(weight_format)
    if weight_format == "int4" and (wbits is None or wbits > 4):
        got = "a float model" if wbits is None else f"--wbits {wbits}"
        raise VitcompressError(f"--weight-format int4 packs quantized weights of at most 4 bits; got {got}")


def export(out: Path, model: str | None = None, checkpoint: Path | None = None, pretrained: bool = True,
           force: bool = False, simplify: bool = False, weight_format: str = "int8") -> dict:
    """Export a float model (or a quantized checkpoint, as QDQ) to ONNX with its metadata."""
    loaded = load(model, checkpoint, pretrained)
    is_quant = loaded.quant_state is not None
    _check_weight_format(weight_format, loaded.quant_state["config"]["wbits"] if is_quant else None)
    name = "model.quantized.onnx" if is_quant else "model.fp32.onnx"
    out = prepare_output_dir(out, force, [name])
    path = out / name
    if is_quant:
        cfg = loaded.quant_state["config"]
        info = export_qdq(loaded.model, loaded.preprocessing.input_size, path, onnx_metadata(loaded, "quantized", quantization=cfg),
                          weight_format=weight_format, signed_matmul_operands=signed_matmul_operands(cfg.get("reduce_range", False)))
    else:
        info = export_float(loaded.model, loaded.preprocessing.input_size, path, onnx_metadata(loaded, "fp32"), simplify)
    return {"artifact": str(path), "bytes": path.stat().st_size, **info}


