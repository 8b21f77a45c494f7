"""The pipeline behind `vitcompress prune`: plan, physically prune, meet a *measured* speedup.

``--target-speedup S`` is met by measurement: the model is pruned to a MACs budget, both the float
and the pruned model are exported and timed side by side in onnxruntime (alternating runs, 1
thread, batch 1, medians), and the budget is adjusted until the measured ratio reaches S; every
iteration is reported. ``--target-flops F`` asks for dense MACs / pruned MACs >= F instead (a
proxy, no measurement loop). Algorithms live in prune/; this module wires files and images.
"""
from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoints import load
from .artifacts import (RANDOM_WEIGHTS_NOTE, ProgressFn, calibration_images, environment, evaluation_images, file_info, no_progress,
                        onnx_metadata, report_head, save_checkpoint, write_report_documents)
from .errors import VitcompressError
from .registry import lookup
from .evaluate import PredictorSource, evaluate, fidelity, summarize
from .export import compare_latency, export_float
from .fileio import prepare_output_dir, write_json
from .models import LoadedModel, family_of
from .support import check_supported
from .workers import Workers, open_pool
from .prune.baseline import MagnitudePruner
from .prune.lpvit import LPViTConfig, LPViTPruner, Plan, apply_plan
from .prune.ofb import OFBConfig, OFBSearch, ofb_unsupported
from .prune.recover import RecoverConfig, distill
from .prune.structure import PRUNE_STATE_ATTR, count_macs, layout_of, shrink_uniformly

METHODS = ("lpvit", "magnitude", "ofb")


def timing_fields(report: dict) -> list[str]:
    """The report fields that follow measured time: latencies always; the kept structure when the
    target is a measured speedup; recovery (and the accuracy after it) when its time budget cut it short."""
    fields = ["created", "latency", "iterations", "recovery.seconds"]
    if report["target"].get("measured") or (report["pruning"].get("allocation") or {}).get("search_cut_by_time"):
        fields.append("pruning")
    rec = report.get("recovery") or {}
    if rec.get("steps", 0) < rec.get("requested_steps", 0):
        fields += ["recovery", "accuracy"]
    return fields
SPARSE_LABEL = "sparse, no dense speedup"
DENSE_LABEL = "dense (units removed physically)"


@dataclass
class PruneJob:
    """Everything `vitcompress prune` needs; the CLI fills it from flags."""

    out: Path
    model: str | None = None
    checkpoint: Path | None = None
    pretrained: bool = True
    method: str = "lpvit"
    target_speedup: float | None = None
    target_flops: float | None = None
    block: str = "unit"  # "unit" or "tile"
    tile: tuple[int, int] = (16, 16)
    min_keep: float = 0.05
    calib_dir: Path | None = None
    calib_size: int = 1024
    eval_dir: Path | None = None
    eval_size: int | None = None
    recover_steps: int = 0
    recover_dir: Path | None = None  # default: the calibration folder
    recover_size: int = 5000
    recover_minutes: float = 10.0
    recover_lr: float = 5e-4
    seed: int = 0
    force: bool = False
    batch_size: int = 64
    latency_rounds: int = 40
    latency_threads: int = 1
    max_iterations: int = 8
    tolerance: float = 0.08  # stop once S <= measured <= S * (1 + tolerance)
    search_steps: int = 2000  # OFB: search steps (over the recovery images)
    search_minutes: float = 15.0  # OFB: time limit of the first search round (continuations: a fifth each)
    pmim: bool = False  # OFB: masked-image-modelling regulariser during the search
    workers: Workers = field(default_factory=Workers)  # where the evaluation's shards run (--workers, --ray-address)


def _validate(job: PruneJob) -> None:
    lookup(dict.fromkeys(METHODS), job.method, "pruning method")
    if (job.target_speedup is None) == (job.target_flops is None):
        raise VitcompressError("give exactly one target: --target-speedup S or --target-flops F")
    target = job.target_speedup if job.target_speedup is not None else job.target_flops
    if not target > 1.0:
        raise VitcompressError(f"the target must be > 1 (a speedup / FLOPs reduction factor), got {target}")
    if job.block == "tile":
        if job.target_speedup is not None:
            raise VitcompressError(f"tile sparsity is {SPARSE_LABEL}: use --target-flops, or --block unit for a speedup")
        if job.method != "lpvit":
            raise VitcompressError("tile sparsity is only offered by --method lpvit")
    if job.calib_dir is None:
        raise VitcompressError("calibration images are required: --calib DIR")
    if job.recover_steps < 0 or job.recover_minutes <= 0:
        raise VitcompressError("--recover-steps must be >= 0 and the recovery time limit positive")
    if job.method == "ofb" and (job.search_steps < 1 or job.search_minutes <= 0):
        raise VitcompressError("--search-steps must be >= 1 and --search-minutes positive")


class _Pruning:
    """A loaded model, its pruner and MACs accounting: turns a MACs-reduction factor into a model."""

    def __init__(self, job: PruneJob, loaded: LoadedModel, calib: torch.Tensor, progress: ProgressFn) -> None:
        self.job, self.loaded = job, loaded
        self.config = LPViTConfig(block=job.block, tile=tuple(job.tile), min_keep=job.min_keep)
        if job.method == "lpvit":
            self.pruner = LPViTPruner(loaded.model, calib.split(job.batch_size), self.config,
                                      lambda d, t: progress("score", d, t))
        else:
            self.pruner = MagnitudePruner(loaded.model, job.min_keep)
        self.total_macs = count_macs(loaded.model, loaded.preprocessing.input_size)
        self.fixed_macs = self.total_macs - self.pruner.dense_macs
        self.max_factor = self.total_macs / (self.fixed_macs + self.pruner.min_macs)

    def plan(self, factor: float) -> Plan:
        budget = max(self.total_macs / factor - self.fixed_macs, self.pruner.min_macs)
        return self.pruner.plan(budget)

    def build(self, plan: Plan) -> torch.nn.Module:
        model = copy.deepcopy(self.loaded.model)
        apply_plan(model, plan, self.job.block, tuple(self.job.tile))
        return model

    def total(self, plan: Plan) -> int:
        return self.fixed_macs + plan.macs


def _rounds(job: PruneJob, macs: int) -> int:
    """More alternated rounds for small models (a few ms per run), so one scheduling hiccup of a
    shared machine cannot move the median: about 3e10 MACs of work per model, 40..400 rounds."""
    return max(job.latency_rounds, min(400, int(3e10 / max(macs, 1))))


def _measure(fp32: Path, pruned: Path, shape: tuple, job: PruneJob, macs: int = 0) -> dict:
    lat = compare_latency({"fp32": fp32, "pruned": pruned}, shape, threads=job.latency_threads,
                          rounds=_rounds(job, macs), seed=job.seed)
    lat["speedup"] = lat["fp32"]["median_ms"] / lat["pruned"]["median_ms"]
    lat["speedup_of_minima"] = lat["fp32"]["min_ms"] / lat["pruned"]["min_ms"]
    return lat


def _speed_fields(lat: dict) -> dict:
    """What a search iteration records of one side-by-side measurement."""
    return {"fp32_ms": lat["fp32"]["median_ms"], "pruned_ms": lat["pruned"]["median_ms"],
            "measured_speedup": lat["speedup"], "speedup_of_minima": lat["speedup_of_minima"]}


def _search_speed(p: _Pruning, job: PruneJob, fp32: Path, work: Path, progress: ProgressFn) -> tuple[Plan, Path, list]:
    """Adjust the MACs-reduction factor until the measured speedup reaches the target."""
    S = float(job.target_speedup)
    shape = (1, *p.loaded.preprocessing.input_size)
    meta = onnx_metadata(p.loaded, "pruned")
    iterations: list[dict] = []
    tried: dict[float, tuple[Plan, Path, float]] = {}

    def trial(factor: float, note: str) -> float:
        plan = p.plan(factor)
        path = work / f"trial{len(iterations)}.onnx"
        export_float(p.build(plan), p.loaded.preprocessing.input_size, path, meta)
        lat = _measure(fp32, path, shape, job, p.total_macs)
        iterations.append({"iteration": len(iterations), "note": note, "macs_factor_requested": factor,
                           "macs_factor": p.total_macs / p.total(plan), "macs": p.total(plan),
                           **_speed_fields(lat), "meets_target": min(lat["speedup"], lat["speedup_of_minima"]) >= S})
        tried[factor] = (plan, path, lat["speedup"])
        progress("search", len(iterations), job.max_iterations + 1)
        # the ratio of medians decides (benchmarking notes); on a loaded machine a short model
        # slips between time slices more often than a long one, which inflates that ratio, so the
        # ratio of minima (the uncontended run) must agree before a trial counts as fast enough
        return min(lat["speedup"], lat["speedup_of_minima"])

    best = trial(p.max_factor, "every layer at its floor: the most this pruning can give")
    if best < S:
        top = iterations[-1]
        raise VitcompressError(
            f"target speedup {S:g}x is not reachable: the best measured speedup is {top['measured_speedup']:.2f}x "
            f"(ratio of medians; {top['speedup_of_minima']:.2f}x of minima) with every layer pruned to its floor "
            f"(min_keep {job.min_keep:g}); ask for at most {best:.2f}x")
    # bracket in MACs-reduction factor: lo measured below the target (dense = 1x), hi at or above it
    lo, s_lo, hi, s_hi = 1.0, 1.0, p.max_factor, best
    factor = min(S, p.max_factor)
    for _ in range(job.max_iterations):
        s = trial(factor, "search")
        if s >= S:
            hi, s_hi = factor, s
            if s <= S * (1 + job.tolerance):
                break
        elif factor > lo:
            lo, s_lo = factor, s
        if hi / lo < 1.02:
            break
        # next guess: interpolate log(speedup) against log(factor) inside the bracket (regula falsi)
        t = (math.log(S) - math.log(s_lo)) / max(math.log(s_hi) - math.log(s_lo), 1e-9)
        t = min(max(t, 0.2), 0.8)  # stay inside, so noise cannot stall the bracket
        factor = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
    plan, path, _ = tried[hi]
    return plan, path, iterations


@dataclass
class _Outcome:
    """A pruned model before recovery, its export, and the numbers behind it."""

    model: torch.nn.Module
    path: Path  # its ONNX export (the "before recovery" artifact)
    iterations: list
    plan: Plan  # units kept (tiles for tile sparsity) and the method's allocation details
    macs: int  # per image, whole model
    macs_dense: int
    config: dict


def _distillation_images(job: PruneJob, loaded: LoadedModel) -> tuple[torch.Tensor, dict]:
    """The unlabelled images recovery and OFB's search distil on (--recover-dir, else --calib),
    and their record for the report."""
    images, _, _, record = calibration_images(loaded, job.recover_dir or job.calib_dir, job.recover_size, job.seed + 1)
    return images, record


def _prune_by_plan(job: PruneJob, loaded: LoadedModel, calib: torch.Tensor, fp32: Path, work: Path,
                   progress: ProgressFn) -> _Outcome:
    """LPViT or the magnitude baseline: score once, then allocate for any budget."""
    p = _Pruning(job, loaded, calib, progress)
    prep = loaded.preprocessing
    if job.target_speedup is not None:
        plan, path, iterations = _search_speed(p, job, fp32, work, progress)
    else:
        if job.target_flops > p.max_factor:
            raise VitcompressError(f"target MACs reduction {job.target_flops:g}x is not reachable: at most "
                                   f"{p.max_factor:.2f}x with min_keep {job.min_keep:g}")
        plan, iterations = p.plan(job.target_flops), []
        path = work / "before.onnx"
        export_float(p.build(plan), prep.input_size, path, onnx_metadata(loaded, "pruned"))
    config = asdict(p.config) if job.method == "lpvit" else {"min_keep": job.min_keep}
    return _Outcome(p.build(plan), path, iterations, plan, p.total(plan), p.total_macs, config)


OFB_MAX_ROUNDS = 4  # search rounds (the first plus continuations toward a tighter target)


def _prune_ofb(job: PruneJob, loaded: LoadedModel, images: torch.Tensor, fp32: Path, work: Path,
               progress: ProgressFn) -> _Outcome:
    """OFB: search toward a MACs target; for a speedup target, measure the slim model and continue
    the search toward a tighter MACs target until the measured speedup is reached.

    The first MACs target comes from a probe: a uniformly shrunk copy at a MACs reduction of S is
    timed, which tells how MACs turn into time on this CPU (speedup ≈ reduction^γ)."""
    prep = loaded.preprocessing
    input_size = prep.input_size
    shape = (1, *input_size)
    meta = onnx_metadata(loaded, "pruned")
    cfg = OFBConfig(steps=job.search_steps, max_seconds=60.0 * job.search_minutes, batch_size=job.batch_size,
                    pmim=job.pmim, seed=job.seed, pad=max(1, input_size[1] // 8))
    search = OFBSearch(loaded.model, cfg)
    dense = count_macs(loaded.model, input_size)
    iterations: list[dict] = []
    speed = job.target_speedup is not None
    goal = float(job.target_speedup if speed else job.target_flops)
    gamma = 1.0

    def record(model: torch.nn.Module, note: str, probe: bool = False) -> tuple[float, Path]:
        path = work / f"trial{len(iterations)}.onnx"
        export_float(model, input_size, path, meta)
        macs = count_macs(model, input_size)
        row = {"iteration": len(iterations), "note": note, "macs": macs, "macs_factor": dense / macs}
        achieved = dense / macs
        if speed:
            lat = _measure(fp32, path, shape, job, dense)
            achieved = min(lat["speedup"], lat["speedup_of_minima"])  # see _search_speed
            row.update(_speed_fields(lat))
        row["meets_target"] = achieved >= goal and not probe
        if probe:
            row["probe"] = True
        iterations.append(row)
        return achieved, path

    if speed:
        probe = shrink_uniformly(loaded.model, input_size, goal)
        achieved, _ = record(probe, f"uniform probe at a MACs reduction of {goal:g}x: how MACs turn into time here", probe=True)
        factor_probe = iterations[-1]["macs_factor"]
        gamma = min(1.5, max(0.3, math.log(max(achieved, 1.01)) / math.log(factor_probe)))
    factor = goal ** (1.0 / gamma)
    steps, seconds = cfg.steps, cfg.max_seconds
    runs, reopened = [], 0
    for rnd in range(OFB_MAX_ROUNDS):
        run = search.run(images, search.dense_macs / factor, steps=steps, max_seconds=seconds,
                         progress=lambda d, t, info: progress("search", d, t, info))
        runs.append({"round": rnd, "macs_factor_target": factor, "requested_steps": steps,
                     "groups_reopened": reopened, **run})
        slim = search.slim()
        note = "search" if rnd == 0 else "search continued toward a tighter target"
        achieved, path = record(slim, note + (", the decided widths re-opened below their choice" if reopened else ""))
        if achieved >= goal:
            break
        # every width decided: re-open the narrower candidates (the search could not go on otherwise)
        reopened = search.reopen() if all(g.decided() for g in search.groups) else 0
        if all(g.decided() for g in search.groups):
            raise VitcompressError(f"OFB reached {achieved:.2f}x with every width at its narrowest candidate, "
                                   f"short of the {goal:g}x target; lower the target")
        # from where the widths landed (a search can end past its MACs target)
        factor = max(factor, iterations[-1]["macs_factor"]) * (goal / achieved) ** (1.0 / gamma) * 1.02
        steps, seconds = max(cfg.prune_every, cfg.steps // 5), cfg.max_seconds / 5
    else:
        raise VitcompressError(f"OFB reached {achieved:.2f}x, short of the {goal:g}x target after {OFB_MAX_ROUNDS} "
                               f"search rounds; lower the target or raise --search-steps")
    search.close()
    macs = count_macs(slim, input_size)
    plan = Plan(keep={}, macs=macs, dense_macs=dense,
                info={"widths": search.widths(), "gamma": gamma, "rounds": runs,
                      "search_cut_by_time": any(r["steps"] < r["requested_steps"] for r in runs),
                      "search_seconds": sum(r["seconds"] for r in runs), "search_steps": search.step})
    return _Outcome(slim, path, iterations, plan, macs, dense, asdict(cfg))


def _prune_state(job: PruneJob, pruned: torch.nn.Module, plan: Plan, label: str) -> dict:
    state = {"method": job.method, "block": job.block, "label": label, "layout": layout_of(pruned)}
    if job.block == "tile":
        state["tile"] = list(job.tile)
        state["kept_tiles"] = {k: [int(v) for v in keep] for k, keep in plan.keep.items()}
    return state


def prune(job: PruneJob, progress: ProgressFn = no_progress) -> dict:
    """Load, score, prune to the target (measured or MACs), recover, export, evaluate, time."""
    _validate(job)
    names = ["model.fp32.onnx", "model.pruned.onnx", "model.pruned.pth", "report.json"]
    out = prepare_output_dir(job.out, job.force, names)
    torch.manual_seed(job.seed)
    loaded = load(job.model, job.checkpoint, job.pretrained)
    if loaded.quant_state is not None:
        raise VitcompressError(f"{job.checkpoint} is quantized; prune the float checkpoint, then quantize the result")
    check_supported(loaded.arch, family_of(loaded.arch), job.method)
    if job.method == "ofb" and (reason := ofb_unsupported(loaded.model)) is not None:
        raise VitcompressError(f"--method ofb does not support {loaded.arch}: {reason}")
    prep = loaded.preprocessing
    distil: torch.Tensor | None = None  # loaded once: OFB searches on the images recovery uses
    if job.method == "ofb":  # no scoring pass: the report's calibration entry names the search images
        distil, calibration = _distillation_images(job, loaded)
        calibration["used_for"] = "OFB search and recovery"
    else:
        calib, _, _, calibration = calibration_images(loaded, job.calib_dir, job.calib_size, job.seed)
    eval_set = None
    if job.eval_dir is not None:
        eval_set, label_map = evaluation_images(loaded, job.eval_dir, job.eval_size, job.seed)

    label = SPARSE_LABEL if job.block == "tile" else DENSE_LABEL
    fp32_path = out / "model.fp32.onnx"
    export_float(loaded.model, prep.input_size, fp32_path, onnx_metadata(loaded, "fp32"))
    with tempfile.TemporaryDirectory(prefix="vitcompress-prune-") as tmp:
        work = Path(tmp)
        if job.method == "ofb":
            outcome = _prune_ofb(job, loaded, distil, fp32_path, work, progress)
        else:
            outcome = _prune_by_plan(job, loaded, calib, fp32_path, work, progress)
        pruned, before_path, iterations = outcome.model, outcome.path, outcome.iterations
        state = _prune_state(job, pruned, outcome.plan, label)

        recovery = {"steps": 0}
        if job.recover_steps > 0:
            rec_dir = job.recover_dir or job.calib_dir
            images = distil if distil is not None else _distillation_images(job, loaded)[0]
            cfg = RecoverConfig(steps=job.recover_steps, batch_size=job.batch_size, lr=job.recover_lr,
                                max_seconds=60.0 * job.recover_minutes, seed=job.seed,
                                pad=max(1, prep.input_size[1] // 8))
            keep_zero = None
            if job.block == "tile":  # recovery must not revive pruned tiles
                masks = _tile_masks(pruned)
                keep_zero = lambda: _reapply(pruned, masks)  # noqa: E731
            recovery = distill(pruned, loaded.model, images, cfg, lambda d, t: progress("recover", d, t), keep_zero)
            recovery.update({"dir": str(rec_dir), "threads": torch.get_num_threads()})
        setattr(pruned, PRUNE_STATE_ATTR, state)

        pruned_path = out / "model.pruned.onnx"
        meta = onnx_metadata(loaded, "pruned", pruning={"method": job.method, "label": label})
        export_info = export_float(pruned, prep.input_size, pruned_path, meta)
        ckpt_path = out / "model.pruned.pth"
        save_checkpoint(ckpt_path, loaded, pruned.state_dict(), prune_state=state,
                        provenance={"source": loaded.source, "method": job.method, "label": label})

        report = {
            **report_head("prune", loaded),
            "method": job.method,
            "target": ({"speedup": job.target_speedup, "measured": True} if job.target_speedup is not None
                       else {"macs_reduction": job.target_flops, "measured": False}),
            "pruning": {
                "label": label, "block": job.block if job.block == "unit" else f"tile {job.tile[0]}x{job.tile[1]}",
                "min_keep": job.min_keep, "macs_dense": outcome.macs_dense, "macs_pruned": outcome.macs,
                "macs_reduction": outcome.macs_dense / outcome.macs,
                "params_dense": sum(t.numel() for t in loaded.model.parameters()),
                "params_pruned": sum(t.numel() for t in pruned.parameters()),
                "layout": state["layout"], "units_dense": layout_of(loaded.model),
                "allocation": outcome.plan.info,
                "config": outcome.config,
            },
            "iterations": iterations,
            "calibration": calibration,
            "recovery": recovery,
            "export": export_info,
            "artifacts": {"fp32": file_info(fp32_path), "pruned": file_info(pruned_path),
                          "checkpoint": file_info(ckpt_path)},
            "environment": environment(),
            "notes": [],
        }
        if job.block == "tile":
            report["notes"].append(f"tile sparsity: {SPARSE_LABEL} (zeroed tiles run in dense kernels)")
        if not loaded.accuracy_meaningful:
            report["notes"].append(RANDOM_WEIGHTS_NOTE)

        if eval_set is not None:
            sources = {name: PredictorSource(onnx=str(path)) for name, path in
                       (("fp32", fp32_path), ("before_recovery", before_path), ("pruned", pruned_path))}
            with open_pool(job.workers) as pool:
                logits, labels, stats = evaluate(sources, eval_set, prep, 64, lambda d, t: progress("evaluate", d, t), pool)
                report["workers"] = pool.info
            acc = {k: summarize(v, labels, label_map, loaded.num_classes) for k, v in logits.items()}
            report["accuracy"] = {
                "eval_dir": str(job.eval_dir), "images": stats.loaded, "skipped": stats.skipped,
                "measured_on": "exported ONNX files in onnxruntime",
                "fp32": acc["fp32"], "before_recovery": acc["before_recovery"], "after_recovery": acc["pruned"],
                "drop_before_recovery": acc["fp32"]["top1"] - acc["before_recovery"]["top1"],
                "drop_after_recovery": acc["fp32"]["top1"] - acc["pruned"]["top1"],
                "fidelity_before_recovery": fidelity(logits["fp32"], logits["before_recovery"]),
                "fidelity_after_recovery": fidelity(logits["fp32"], logits["pruned"]),
            }

    progress("latency", 0, 1)
    report["latency"] = _measure(fp32_path, pruned_path, (1, *prep.input_size), job, outcome.macs_dense)
    report["latency"]["note"] = "median of alternated onnxruntime runs, float vs pruned, same process"
    report["timing_fields"] = timing_fields(report)
    progress("latency", 1, 1)
    write_json(out / "report.json", report)
    write_report_documents(out, report)
    return report


def _tile_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from .prune.lpvit import tile_linears

    return {n: m.weight.detach() != 0 for n, m in tile_linears(model).items()}


def _reapply(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    from .prune.lpvit import tile_linears

    with torch.no_grad():
        for n, m in tile_linears(model).items():
            m.weight.mul_(masks[n].to(m.weight.dtype))
