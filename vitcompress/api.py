"""The Python API behind the CLI: quantize, export and check, each returning a report dict.

Algorithms live in quant/ and export/; this module wires models, images, artifacts and
measurements together. Progress is reported through a callback, never printed.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import datetime as _dt
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .artifacts import REPORT_SCHEMA, ProgressFn, environment, file_info, no_progress, onnx_metadata  # noqa: F401 (REPORT_SCHEMA, ProgressFn re-exported)
from .cpu import resolve_target, signed_matmul_operands
from .data import LoadStats, load_tensor, label_map_to_model, sample, scan_images
from .errors import VitcompressError
from .evaluate import collect_logits, fidelity, onnx_predictor, summarize, torch_predictor
from .export import (check_weight_format, compare_latency, export_float, export_qdq, int8_coverage, make_session, read_metadata,
                     update_metadata)
from .fileio import atomic_path, prepare_output_dir, write_json  # noqa: F401 (write_json re-exported for the CLI)
from .models import LoadedModel, checkpoint_dict, family_of, load_model
from .quant import QuantConfig, float_state_dict, quant_state, quantize_, restore_quantized
from .quant.fold import prepare_folded_layout, prepare_folded_scales
from .quant.placement import get_placement, kind_of

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = PROJECT_ROOT / "calib" / "cifar10_vit_tiny.pth"
DEMO_CALIB = PROJECT_ROOT / "calib" / "train"
DEMO_EVAL = PROJECT_ROOT / "calib" / "val"



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
    max_drop: float = 1.0  # --placement auto: top-1 points the chosen placement may lose on the eval set
    target_cpu: str = "auto"  # int8 kernels of the deployment CPU: auto (this machine), vnni, avx2 (see cpu.py)
    weight_format: str = "int8"  # int4: Linear weights of <= 4 bits stored packed as MatMulNBits (float GEMM)


def load(model: str | None = None, checkpoint: str | Path | None = None, pretrained: bool = True) -> LoadedModel:
    """load_model, plus re-applying the quantizers of a checkpoint written by `quantize`."""
    loaded = load_model(model, checkpoint, pretrained, before_load=_layout_for_checkpoint)
    if loaded.quant_state is not None:
        state = loaded.quant_state
        cfg = QuantConfig(**{**state["config"], "skip": tuple(state["config"].get("skip", ()))})
        restore_quantized(loaded.model, cfg, state["quantizers"], family_of(loaded.arch))
    return loaded


def _layout_for_checkpoint(model: torch.nn.Module, checkpoint: dict) -> None:
    """Shape a fresh model like the checkpoint's: pruned structure (heads / MLP widths) first,
    then BatchNorm-folded weights of a quantized checkpoint."""
    if checkpoint.get("prune_state") is not None:
        from .prune.structure import apply_prune_state

        apply_prune_state(model, checkpoint["prune_state"])
    quant_state = checkpoint.get("quant_state") or {}
    prepare_folded_scales(model, [tuple(p) for p in quant_state.get("folded_scales") or []])
    prepare_folded_layout(model, [tuple(p) for p in quant_state.get("folded_pairs") or []])


def _prune_extra(model: torch.nn.Module) -> dict:
    """The pruned structure a model was loaded with, so its compressed checkpoint reloads too."""
    from .prune.structure import PRUNE_STATE_ATTR

    state = getattr(model, PRUNE_STATE_ATTR, None)
    return {"prune_state": state} if state is not None else {}


@dataclass
class _Prepared:
    """What every placement tried for one job shares: the float model, its images and its fp32
    artifact (exported and evaluated once, then copied next to each candidate)."""

    loaded: LoadedModel
    family: str
    target_cpu: dict
    calib: torch.Tensor
    calib_stats: LoadStats
    eval_set: list | None = None
    label_map: dict | None = None
    fp32_onnx: Path | None = None
    fp32_logits: np.ndarray | None = None  # the fp32 artifact's logits on eval_set


def _prepare(job: QuantizeJob) -> _Prepared:
    if job.calib_dir is None:
        raise VitcompressError("calibration images are required: --calib DIR")
    _check_weight_format(job.weight_format, job.config.wbits)
    torch.manual_seed(job.seed)
    loaded = load(job.model, job.checkpoint, job.pretrained)
    if loaded.quant_state is not None:
        raise VitcompressError(f"{job.checkpoint} is already quantized; start from the float checkpoint")
    calib_stats = LoadStats()
    calib = load_tensor(sample(scan_images(job.calib_dir), job.calib_size, job.seed), loaded.preprocessing, calib_stats)
    prepared = _Prepared(loaded, family_of(loaded.arch), resolve_target(job.target_cpu), calib, calib_stats)
    if job.eval_dir is not None:
        prepared.eval_set = sample(scan_images(job.eval_dir, require_labels=True), job.eval_size, job.seed)
        prepared.label_map = label_map_to_model(prepared.eval_set, loaded.preprocessing.class_names, loaded.num_classes)
    return prepared


def quantize(job: QuantizeJob, progress: ProgressFn = no_progress) -> dict:
    """Load, calibrate, quantize, export float + QDQ ONNX, evaluate both in onnxruntime, time them."""
    if job.config.placement == AUTO_PLACEMENT:
        return _quantize_auto(job, progress)
    out = prepare_output_dir(job.out, job.force, ["model.fp32.onnx", f"model.{job.config.label}.onnx", "report.json"])
    return _quantize_prepared(job, _prepare(job), out, progress)


def _quantize_prepared(job: QuantizeJob, prepared: _Prepared, out: Path, progress: ProgressFn) -> dict:
    loaded, family, target_cpu = prepared.loaded, prepared.family, prepared.target_cpu
    prep, calib, calib_stats = loaded.preprocessing, prepared.calib, prepared.calib_stats
    eval_set, label_map = prepared.eval_set, prepared.label_map
    cfg = replace(job.config, reduce_range=job.config.reduce_range or target_cpu["reduce_range"])
    qname = f"model.{cfg.label}.onnx"
    torch.manual_seed(job.seed)

    qmodel = copy.deepcopy(loaded.model)
    started = time.perf_counter()
    result = quantize_(qmodel, cfg, calib.split(job.batch_size), lambda d, t: progress("calibrate", d, t), family)
    method_seconds = time.perf_counter() - started

    progress("export", 0, 2)
    fp32_path, q_path = out / "model.fp32.onnx", out / qname
    label = honest_label(cfg, {})
    common = {"method": cfg.method, "wbits": cfg.wbits, "abits": cfg.abits, "label": label}
    if prepared.fp32_onnx is None:
        export_float(loaded.model, prep.input_size, fp32_path, onnx_metadata(loaded, "fp32"))
        prepared.fp32_onnx = fp32_path
    else:
        with atomic_path(fp32_path) as tmp:
            shutil.copyfile(prepared.fp32_onnx, tmp)
    progress("export", 1, 2)
    export_info = export_qdq(qmodel, prep.input_size, q_path, onnx_metadata(loaded, "quantized", quantization=common),
                             weight_format=job.weight_format, signed_matmul_operands=signed_matmul_operands(cfg.reduce_range))
    progress("export", 2, 2)
    progress("coverage", 0, 1)
    coverage = int8_coverage(q_path)
    progress("coverage", 1, 1)
    honest = honest_label(cfg, coverage)  # what onnxruntime runs decides the label: artifact, checkpoint, report
    if honest != label:
        label = common["label"] = honest
        update_metadata(q_path, onnx_metadata(loaded, "quantized", quantization=common))
    ckpt_path = out / f"model.{cfg.label}.pth"
    ckpt = checkpoint_dict(loaded, float_state_dict(qmodel),
                           quant_state={"config": asdict(cfg), "quantizers": quant_state(qmodel),
                                        "folded_pairs": [list(p) for p in result.folded_pairs],
                                        "folded_scales": [list(p) for p in result.folded_scales]},
                           provenance={"source": loaded.source, **common}, **_prune_extra(loaded.model))
    with atomic_path(ckpt_path) as tmp:
        torch.save(ckpt, tmp)

    report = {
        "schema": REPORT_SCHEMA,
        "command": "quantize",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"arch": loaded.arch, "family": family, "source": loaded.source, "weights": loaded.weights,
                  "num_classes": loaded.num_classes, "input_size": list(prep.input_size)},
        "method": cfg.method,
        "bits": {"weights": cfg.wbits, "activations": cfg.abits, "label": label,
                 "simulated": cfg.simulated},
        "config": asdict(cfg),
        "target_cpu": target_cpu,
        "calibration": {"dir": str(job.calib_dir), "requested": job.calib_size, "used": calib_stats.loaded,
                        "skipped": calib_stats.skipped, "seed": job.seed},
        "quantization": {**result.summary(), "seconds": round(method_seconds, 2), "threads": torch.get_num_threads()},
        "export": export_info,
        "artifacts": {"fp32": file_info(fp32_path), "quantized": file_info(q_path), "checkpoint": file_info(ckpt_path)},
        "environment": environment(),
        "coverage": coverage,
        "notes": [],
    }
    if not loaded.accuracy_meaningful:
        report["notes"].append("random weights (--no-pretrained): accuracy numbers are meaningless; latency and size are real")

    broken = integer_promises_broken(qmodel, cfg, result.plan.weighted, coverage)
    if broken:
        report["error"] = f"layers expected to run as integer kernels run float: {broken}"
        write_json(out / "report.json", report)
        raise VitcompressError(
            f"{len(broken)} layer(s) that placement '{cfg.placement}' must run as integer kernels ended up float in "
            f"onnxruntime ({', '.join(broken[:4])}{', ...' if len(broken) > 4 else ''}); the artifact would be "
            f"simulated there, not integer (details: {out / 'report.json'})")

    if eval_set is not None:
        predictors = {"quantized": onnx_predictor(make_session(q_path)), "torch_simulation": torch_predictor(qmodel)}
        if prepared.fp32_logits is None:
            predictors["fp32"] = onnx_predictor(make_session(fp32_path))
        logits, labels, stats = collect_logits(predictors, eval_set, prep, 64, lambda d, t: progress("evaluate", d, t))
        if prepared.fp32_logits is None:
            prepared.fp32_logits = logits["fp32"]
        logits["fp32"] = prepared.fp32_logits
        acc_f = summarize(logits["fp32"], labels, label_map, loaded.num_classes)
        acc_q = summarize(logits["quantized"], labels, label_map, loaded.num_classes)
        report["accuracy"] = {
            "eval_dir": str(job.eval_dir), "images": stats.loaded, "skipped": stats.skipped,
            "measured_on": "exported ONNX files in onnxruntime",
            "fp32": acc_f, "quantized": acc_q,
            "drop": acc_f["top1"] - acc_q["top1"],
            **fidelity(logits["fp32"], logits["quantized"]),
            "export_vs_torch_agreement": fidelity(logits["torch_simulation"], logits["quantized"])["top1_agreement"],
        }

    progress("latency", 0, 1)
    lat = compare_latency({"fp32": fp32_path, "quantized": q_path}, (1, *prep.input_size),
                          threads=job.latency_threads, rounds=job.latency_rounds)
    lat["speedup"] = lat["fp32"]["median_ms"] / lat["quantized"]["median_ms"]
    report["latency"] = lat
    progress("latency", 1, 1)
    write_json(out / "report.json", report)
    return report


AUTO_PLACEMENT = "auto"
AUTO_CANDIDATES = ("speed", "linear", "partial")  # tried in turn; the fastest one within the accuracy budget wins


def _quantize_auto(job: QuantizeJob, progress: ProgressFn) -> dict:
    """--placement auto: run every candidate placement, measure speed and accuracy of each exported
    artifact, keep the fastest whose top-1 drop on the eval set is within ``job.max_drop``."""
    if job.eval_dir is None:
        raise VitcompressError("--placement auto chooses by measured accuracy: it needs --eval DIR")
    if job.max_drop < 0:
        raise VitcompressError(f"--max-drop must be >= 0, got {job.max_drop}")
    out = prepare_output_dir(job.out, job.force, ["report.json"])
    trials = []
    prepared = _prepare(job)  # model, images and the fp32 artifact are shared by every candidate
    with tempfile.TemporaryDirectory(prefix=".auto-", dir=out) as scratch:
        for placement in AUTO_CANDIDATES:
            trial_job = replace(job, config=replace(job.config, placement=placement))
            trial_out = prepare_output_dir(Path(scratch) / placement, True, [])
            try:
                trials.append((placement, _quantize_prepared(trial_job, prepared, trial_out, progress), None))
            except VitcompressError as e:  # e.g. an integer promise the runtime did not keep
                trials.append((placement, None, str(e)))
        summary = [{"placement": p, "speedup": r["latency"]["speedup"], "drop": r["accuracy"]["drop"],
                    "top1_agreement": r["accuracy"]["top1_agreement"]} if r else {"placement": p, "error": err}
                   for p, r, err in trials]
        ok = [(p, r) for p, r, _ in trials if r and r["accuracy"]["drop"] <= job.max_drop]
        if not ok:
            raise VitcompressError(f"no placement keeps the top-1 drop within {job.max_drop:g} points: "
                                   + "; ".join(f"{t['placement']}: " + (f"drop {t['drop']:.2f}" if "drop" in t else t["error"])
                                               for t in summary))
        chosen, report = max(ok, key=lambda pr: pr[1]["latency"]["speedup"])
        for f in (Path(scratch) / chosen).iterdir():
            if f.name != "report.json":
                os.replace(f, out / f.name)
    report["placement_auto"] = {"max_drop": job.max_drop, "chosen": chosen, "candidates": summary}
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


def check(artifact: Path, eval_dir: Path, max_drop: float, baseline: Path | None = None, model: str | None = None,
          checkpoint: Path | None = None, pretrained: bool = True, eval_size: int | None = None, seed: int = 0,
          progress: ProgressFn = no_progress) -> dict:
    """Evaluate an exported artifact against its float baseline; ``passed`` when drop <= max_drop."""
    if max_drop < 0:
        raise VitcompressError(f"--max-drop must be >= 0, got {max_drop}")
    meta = read_metadata(artifact)
    from .data import Preprocessing

    prep = Preprocessing.from_dict(meta["preprocessing"])
    num_classes = int(meta.get("num_classes") or 0)
    predictors = {"artifact": onnx_predictor(make_session(artifact))}
    if baseline is not None:
        predictors["baseline"] = onnx_predictor(make_session(baseline))
        base_desc = str(baseline)
    elif model is not None or checkpoint is not None:
        loaded = load(model, checkpoint, pretrained)
        if tuple(loaded.preprocessing.input_size) != tuple(prep.input_size):
            raise VitcompressError(f"the baseline model expects {loaded.preprocessing.input_size}, the artifact {prep.input_size}")
        predictors["baseline"] = torch_predictor(loaded.model)
        base_desc = loaded.source
    else:
        raise VitcompressError("a baseline is required: --baseline FLOAT.onnx, or --model/--checkpoint")
    eval_set = sample(scan_images(eval_dir, require_labels=True), eval_size, seed)
    label_map = label_map_to_model(eval_set, prep.class_names, num_classes)
    logits, labels, stats = collect_logits(predictors, eval_set, prep, 64, lambda d, t: progress("evaluate", d, t))
    if logits["artifact"].shape != logits["baseline"].shape:
        raise VitcompressError(f"artifact and baseline disagree on the output shape: {logits['artifact'].shape[1:]} vs {logits['baseline'].shape[1:]}")
    acc_a = summarize(logits["artifact"], labels, label_map, num_classes)
    acc_b = summarize(logits["baseline"], labels, label_map, num_classes)
    drop = acc_b["top1"] - acc_a["top1"]
    return {
        "schema": REPORT_SCHEMA, "command": "check", "artifact": str(artifact), "baseline": base_desc,
        "eval_dir": str(eval_dir), "images": stats.loaded, "skipped": stats.skipped,
        "artifact_accuracy": acc_a, "baseline_accuracy": acc_b, "drop": drop, "max_drop": max_drop,
        **fidelity(logits["baseline"], logits["artifact"]),
        "passed": bool(drop <= max_drop),
        "artifact_label": (meta.get("quantization") or {}).get("label", meta.get("kind")),
    }
