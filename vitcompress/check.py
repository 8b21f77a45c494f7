"""The CI gate: measure an exported artifact against its float baseline and judge the budgets.

Accuracy, top-1 agreement and the KL are always measured (on the labelled images). Latency, int8
coverage and size are measured when a budget asks for them: timing costs seconds a CI job may not
want to spend. Nothing here prints or writes; the CLI and the recipe runner do.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

from .artifacts import REPORT_SCHEMA, ProgressFn, created_now, environment, no_progress, onnx_metadata
from .checkpoints import load
from .cpu import compatibility
from .data import Preprocessing, label_map_to_model, sample, scan_images
from .errors import VitcompressError
from .evaluate import PredictorSource, evaluate, fidelity, summarize
from .export import artifact_numerics, compare_latency, export_float, get_runtime, int8_coverage, read_metadata
from .export.runtime import DEFAULT_RUNTIME, runtime_info
from .gate import Gate, passed
from .models import LoadedModel
from .workers import Workers, open_pool

# Report fields that are timings: they differ between two runs on the same inputs (see `vitcompress compare`).
CHECK_TIMING_FIELDS = ["latency", "gate.min_speedup"]  # with "created", always


def check(artifact: Path, eval_dir: Path, gate: Gate, baseline: Path | None = None, model: str | None = None,
          checkpoint: Path | None = None, pretrained: bool = True, eval_size: int | None = None, seed: int = 0,
          progress: ProgressFn = no_progress, runtime: str = DEFAULT_RUNTIME, workers: Workers = Workers()) -> dict:
    """Evaluate ``artifact`` against its float baseline on ``runtime`` and judge ``gate``'s budgets.

    The baseline is a float ONNX file (``baseline``) or a model (``model``/``checkpoint``; exported
    to a temporary ONNX file when latency or size is asked for, so both sides run on the same
    runtime). ``passed`` is True when every budget holds. The report says whether the artifact's
    integer numerics are exact on this CPU (``cpu_compatibility``): the gate still stands on what
    was measured here. ``workers`` runs the evaluation's shards on Ray workers: the numbers are
    those of a single process.
    """
    gate.validate()
    meta = read_metadata(artifact)
    get_runtime(runtime)
    prep = Preprocessing.from_dict(meta["preprocessing"])
    num_classes = int(meta.get("num_classes") or 0)
    sources = {"artifact": PredictorSource(onnx=str(artifact), runtime=runtime)}
    loaded: LoadedModel | None = None
    if baseline is not None:
        sources["baseline"] = PredictorSource(onnx=str(baseline), runtime=runtime)
        base_desc = str(baseline)
    elif model is not None or checkpoint is not None:
        loaded = load(model, checkpoint, pretrained)
        if tuple(loaded.preprocessing.input_size) != tuple(prep.input_size):
            raise VitcompressError(f"the baseline model expects {loaded.preprocessing.input_size}, the artifact {prep.input_size}")
        sources["baseline"] = PredictorSource(module=loaded.model)
        base_desc = loaded.source
    else:
        raise VitcompressError("a baseline is required: --baseline FLOAT.onnx, or --model/--checkpoint")
    logits, accuracy, stats, pool_info = labelled_logits(sources, eval_dir, eval_size, seed, prep, num_classes, progress, workers)
    acc_a, acc_b = accuracy["artifact"], accuracy["baseline"]
    agreement = fidelity(logits["baseline"], logits["artifact"])
    measured = {"drop": acc_b["top1"] - acc_a["top1"], **agreement}
    report_extra: dict = {}
    if gate.measures("speedup") or gate.measures("size_ratio"):
        with _baseline_onnx(baseline, loaded) as base_onnx:
            if gate.measures("size_ratio"):
                sizes = {"artifact_bytes": Path(artifact).stat().st_size, "baseline_bytes": base_onnx.stat().st_size}
                measured["size_ratio"] = sizes["artifact_bytes"] / sizes["baseline_bytes"]
                report_extra["size"] = {**sizes, "ratio": measured["size_ratio"]}
            if gate.measures("speedup"):
                progress("latency", 0, 1)
                lat = compare_latency({"baseline": base_onnx, "artifact": artifact}, (1, *prep.input_size), runtime=runtime)
                measured["speedup"] = lat["baseline"]["median_ms"] / lat["artifact"]["median_ms"]
                report_extra["latency"] = {**lat, "speedup": measured["speedup"]}
                progress("latency", 1, 1)
    if gate.measures("int8_coverage"):
        coverage = int8_coverage(artifact, runtime)
        measured["int8_coverage"] = 100.0 * coverage["integer_mac_share"]
        report_extra["coverage"] = coverage
    outcomes = gate.judge(measured)
    return {
        "schema": REPORT_SCHEMA, "command": "check", "created": created_now(), "artifact": str(artifact), "baseline": base_desc,
        "eval_dir": str(eval_dir), "images": stats.loaded, "skipped": stats.skipped,
        "artifact_accuracy": acc_a, "baseline_accuracy": acc_b, "drop": measured["drop"], **agreement,
        "max_drop": gate.max_drop, "min_agreement": gate.min_agreement,
        **report_extra,
        "gate": {o["threshold"]: o for o in outcomes},
        "passed": passed(outcomes),
        "artifact_label": (meta.get("quantization") or {}).get("label", meta.get("kind")),
        "runtime": runtime_info(runtime),
        "built_for": meta.get("target_cpu"),
        "cpu_compatibility": compatibility(artifact_numerics(artifact)),
        "environment": environment(),
        "workers": pool_info,
        "timing_fields": ["created", *(CHECK_TIMING_FIELDS if gate.measures("speedup") else [])],
    }


def labelled_logits(sources: dict[str, PredictorSource], eval_dir: Path, eval_size: int | None, seed: int, prep: Preprocessing,
                    num_classes: int, progress: ProgressFn = no_progress, workers: Workers = Workers()):
    """Two or more models on the same seeded sample of a labelled folder (the artifact's metadata maps
    its class names): (logits, top-1/top-5 per model, load stats, where the shards ran)."""
    eval_set = sample(scan_images(eval_dir, require_labels=True), eval_size, seed)
    label_map = label_map_to_model(eval_set, prep.class_names, num_classes)
    with open_pool(workers) as pool:
        logits, labels, stats = evaluate(sources, eval_set, prep, 64, lambda d, t: progress("evaluate", d, t), pool)
        pool_info = pool.info
    shapes = {name: v.shape[1:] for name, v in logits.items()}
    if len(set(shapes.values())) > 1:
        raise VitcompressError("the models disagree on the output shape: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    accuracy = {name: summarize(v, labels, label_map, num_classes) for name, v in logits.items()}
    return logits, accuracy, stats, pool_info


@contextlib.contextmanager
def _baseline_onnx(baseline: Path | None, loaded: LoadedModel | None) -> Iterator[Path]:
    """The baseline as an ONNX file: the one given, or the loaded model exported to a temporary folder."""
    if baseline is not None:
        yield Path(baseline)
        return
    assert loaded is not None
    with tempfile.TemporaryDirectory(prefix="vitcompress-baseline-") as tmp:
        path = Path(tmp) / "model.fp32.onnx"
        export_float(loaded.model, loaded.preprocessing.input_size, path, onnx_metadata(loaded, "fp32"))
        yield path
