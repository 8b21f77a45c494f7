"""Compare two results, A (e.g. main's artifact) and B (the pull request's): what changed, and
whether B regresses beyond the tolerances.

Two ways in: two reports (report.json of quantize, prune or check, or a run folder), read as
they are; or two ONNX artifacts, measured here side by side on the same images, the same CPU and
the same runtime (the fair way: latencies from two machines or two runs are not comparable,
and a report comparison says so instead of judging them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .artifacts import ProgressFn, created_now, no_progress
from .check import labelled_logits
from .cpu import this_cpu
from .data import Preprocessing
from .errors import VitcompressError
from .evaluate import PredictorSource, fidelity
from .export import compare_latency, get_runtime, int8_coverage, read_metadata
from .export.runtime import DEFAULT_RUNTIME, runtime_info
from .fileio import read_json


@dataclass(frozen=True)
class Tolerances:
    """How much worse B may be than A before the comparison fails."""
    max_drop: float = 0.5  # top-1 points
    max_slowdown: float = 0.10  # fraction: B may be up to 10% slower
    max_coverage_loss: float = 5.0  # points of the MACs run in integer kernels
    max_size_growth: float = 0.05  # fraction of A's bytes

    def validate(self) -> "Tolerances":
        for name, value in asdict(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise VitcompressError(f"--{name.replace('_', '-')}: must be a finite number >= 0, got {value:g}")
        return self


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str
    higher_is_better: bool
    tolerance: str | None  # the Tolerances field that bounds it; None: shown, never judged
    relative: bool = False  # tolerance as a fraction of A's value, not in the metric's unit


METRICS: dict[str, Metric] = {
    "top1": Metric("top-1", "%", True, "max_drop"),
    "top1_agreement": Metric("top-1 agreement with float", "%", True, None),
    "speedup": Metric("speedup vs float", "x", True, "max_slowdown", relative=True),
    "latency_ms": Metric("median latency", "ms", False, "max_slowdown", relative=True),
    "int8_coverage": Metric("int8 coverage", "% of MACs", True, "max_coverage_loss"),
    "size_bytes": Metric("size", "bytes", False, "max_size_growth", relative=True),
}
# Metrics whose values depend on the machine and the moment: judged only between reports from one CPU and runtime.
TIMED = {"speedup", "latency_ms"}


def _dig(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def metrics_of(report: dict) -> dict[str, float]:
    """The comparable numbers of a quantize, prune or check report (absent ones left out)."""
    kind = report.get("command")
    cov = _dig(report, "coverage", "integer_mac_share")
    if kind == "quantize":
        found = {"top1": _dig(report, "accuracy", "quantized", "top1"), "top1_agreement": _dig(report, "accuracy", "top1_agreement"),
                 "speedup": _dig(report, "latency", "speedup"), "size_bytes": _dig(report, "artifacts", "quantized", "bytes")}
    elif kind == "prune":
        found = {"top1": _dig(report, "accuracy", "after_recovery", "top1"),
                 "top1_agreement": _dig(report, "accuracy", "fidelity_after_recovery", "top1_agreement"),
                 "speedup": _dig(report, "latency", "speedup"), "size_bytes": _dig(report, "artifacts", "pruned", "bytes")}
    elif kind == "check":
        found = {"top1": _dig(report, "artifact_accuracy", "top1"), "top1_agreement": report.get("top1_agreement"),
                 "speedup": _dig(report, "latency", "speedup"), "size_bytes": _dig(report, "size", "artifact_bytes")}
    else:
        raise VitcompressError(f"cannot compare a '{kind}' report (expected quantize, prune or check)")
    found["int8_coverage"] = None if cov is None else 100.0 * cov
    return {k: float(v) for k, v in found.items() if v is not None}


def _where(report: dict) -> dict:
    """What a report's timings depend on: the CPU and the runtime they were measured on."""
    cpu = _dig(report, "cpu_compatibility", "cpu") or {}
    runtime = report.get("runtime") or _dig(report, "latency", "fp32", "runtime") or _dig(report, "coverage", "runtime") or {}
    return {"cpu": f"{cpu.get('model')} ({cpu.get('isa')})", "runtime": f"{runtime.get('name')} {runtime.get('version')}"}


def _eval_of(report: dict) -> tuple:
    if report.get("command") == "check":
        return report.get("eval_dir"), report.get("images")
    return _dig(report, "accuracy", "eval_dir"), _dig(report, "accuracy", "images")


def judge(a: dict[str, float], b: dict[str, float], tol: Tolerances, not_comparable: dict[str, str]) -> list[dict]:
    """One row per metric either side has: values, change, the allowance and a status."""
    rows = []
    for name, m in METRICS.items():
        if name not in a and name not in b:
            continue
        va, vb = a.get(name), b.get(name)
        row = {"metric": name, "label": m.label, "unit": m.unit, "a": va, "b": vb, "change": None, "allowed": None, "status": "shown"}
        if va is None or vb is None:
            row["status"] = "missing in " + ("A" if va is None else "B")
        elif name in not_comparable:
            row.update(change=vb - va, status="not comparable", why=not_comparable[name])
        else:
            row["change"] = vb - va
            if m.tolerance is not None:
                allowance = getattr(tol, m.tolerance) * (abs(va) if m.relative else 1.0)
                worse = (va - vb) if m.higher_is_better else (vb - va)
                row["allowed"] = allowance
                row["status"] = "regressed" if worse > allowance else ("improved" if worse < 0 else "ok")
        rows.append(row)
    return rows


def _result(a_desc: str, b_desc: str, rows: list[dict], tol: Tolerances, notes: list[str], mode: str) -> dict:
    return {"command": "compare", "created": created_now(), "mode": mode, "a": a_desc, "b": b_desc, "tolerances": asdict(tol),
            "rows": rows, "regressed": [r["metric"] for r in rows if r["status"] == "regressed"],
            "passed": not any(r["status"] == "regressed" for r in rows), "notes": notes}


def read_report(path: Path) -> dict:
    """A report.json, or the report of a folder: its report.json, or a run's last compressing step."""
    path = Path(path)
    if path.is_dir():
        if (path / "manifest.json").exists():
            manifest = _load_json(path / "manifest.json")
            steps = [s for s in manifest.get("steps") or [] if s.get("kind") != "check"]
            if not steps:
                raise VitcompressError(f"{path}: the run has no quantize or prune step to compare")
            return _load_json(path / steps[-1]["folder"] / "report.json")
        path = path / "report.json"
    return _load_json(path)


def _load_json(path: Path) -> dict:
    data = read_json(path)
    if "command" not in data:
        raise VitcompressError(f"{path} is not a vitcompress report")
    return data


def compare_reports(a_path: Path, b_path: Path, tol: Tolerances = Tolerances()) -> dict:
    """A vs B as their reports state them; timings are judged only when both ran on one CPU and runtime."""
    tol.validate()
    a, b = read_report(a_path), read_report(b_path)
    notes, not_comparable = [], {}
    wa, wb = _where(a), _where(b)
    if wa != wb:
        why = f"A measured on {wa['cpu']} / {wa['runtime']}, B on {wb['cpu']} / {wb['runtime']}"
        not_comparable.update({m: why for m in TIMED})
        notes.append(f"timings not judged: {why}; compare the two artifacts side by side instead")
    if _eval_of(a) != _eval_of(b):
        why = f"A evaluated on {_eval_of(a)}, B on {_eval_of(b)} (folder, images)"
        not_comparable.update({m: why for m in ("top1", "top1_agreement")})
        notes.append(f"accuracy not judged: {why}")
    return _result(str(a_path), str(b_path), judge(metrics_of(a), metrics_of(b), tol, not_comparable), tol, notes, "reports")


def compare_artifacts(a_path: Path, b_path: Path, eval_dir: Path, tol: Tolerances = Tolerances(), eval_size: int | None = None,
                      seed: int = 0, runtime: str = DEFAULT_RUNTIME, progress: ProgressFn = no_progress) -> dict:
    """A vs B measured here: top-1 of each on the same images, B's agreement with A, latency timed
    alternately in one process, int8 coverage on ``runtime``, file size."""
    tol.validate()
    get_runtime(runtime)
    meta_a, meta_b = read_metadata(a_path), read_metadata(b_path)
    prep = Preprocessing.from_dict(meta_a["preprocessing"])
    if list(prep.input_size) != list(Preprocessing.from_dict(meta_b["preprocessing"]).input_size):
        raise VitcompressError(f"{a_path} and {b_path} take different input sizes")
    num_classes = int(meta_a.get("num_classes") or 0)
    sources = {side: PredictorSource(onnx=str(path), runtime=runtime) for side, path in (("a", a_path), ("b", b_path))}
    logits, accuracy, stats, _ = labelled_logits(sources, eval_dir, eval_size, seed, prep, num_classes, progress)
    progress("latency", 0, 1)
    lat = compare_latency({"a": a_path, "b": b_path}, (1, *prep.input_size), runtime=runtime)
    progress("latency", 1, 1)
    measured = {}
    for side, path in (("a", a_path), ("b", b_path)):
        measured[side] = {"top1": accuracy[side]["top1"],
                          "latency_ms": lat[side]["median_ms"], "size_bytes": float(Path(path).stat().st_size),
                          "int8_coverage": 100.0 * int8_coverage(path, runtime)["integer_mac_share"]}
    agreement = fidelity(logits["a"], logits["b"])
    result = _result(str(a_path), str(b_path), judge(measured["a"], measured["b"], tol, {}), tol,
                     [f"B agrees with A on the top-1 class of {agreement['top1_agreement']:.2f}% of {stats.loaded} images (KL {agreement['kl']:.4g})"],
                     "artifacts")
    cpu = this_cpu()
    result.update(images=stats.loaded, eval_dir=str(eval_dir), agreement_b_vs_a=agreement, latency=lat,
                  runtime=runtime_info(runtime), cpu=f"{cpu['model']} ({cpu['isa']})", timing_fields=["created", "latency", "rows.latency_ms"])
    return result
