"""Pipeline steps: each a typed config and a ``run(config, state, folder, progress) -> state``.

A step reads the model the previous step left (``RunState.checkpoint``) and the run's images,
writes its artifacts into its own folder through the Python API behind the commands
(``api.quantize``, ``prune_api.prune``, ``check.check``), and hands on the new model, the artifact
to gate and the float baseline. New steps plug in by adding a ``StepSpec`` to ``STEPS``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..artifacts import ProgressFn, write_report_documents
from ..errors import VitcompressError
from ..fileio import write_json
from ..gate import GATE_FIELDS, Gate
from ..api import QuantizeJob, quantize
from ..prune_api import PruneJob, prune
from ..quant import QuantConfig
from ..quant.options import method_options
from ..workers import Workers


@dataclass(frozen=True)
class RunState:
    """What flows from step to step."""

    model: str | None  # timm name, when the run starts from one
    checkpoint: Path | None  # the current model's checkpoint (a later step loads it)
    pretrained: bool
    calib: Path | None
    eval: Path | None
    eval_size: int | None
    seed: int
    artifact: Path | None = None  # the latest exported model: what a check step gates
    baseline: Path | None = None  # float ONNX of the model the recipe started from
    passed: bool | None = None  # the last check's verdict
    workers: Workers = Workers()  # where evaluation shards run (not part of any step's inputs: the numbers do not depend on it)

    def require(self, what: str, value: Any, step: str) -> Any:
        if value is None:
            raise VitcompressError(f"step '{step}' needs {what}")
        return value


# What the run gives every step (the model, the images, the seed, the step's folder); a recipe
# sets the rest of a job's fields as the step's options.
RUN_PROVIDED = ("out", "model", "checkpoint", "pretrained", "calib_dir", "eval_dir", "eval_size", "seed", "force", "recover_dir", "workers")


def step_options(job: type, name: str, **defaults: Any) -> type:
    """The options of a step that runs ``job``: the job dataclass's own fields, less RUN_PROVIDED,
    with ``defaults`` where a recipe's default differs from the command's. One definition of each
    option: the command line and the recipe cannot drift apart."""
    specs = []
    for f in dataclasses.fields(job):
        if f.name in RUN_PROVIDED:
            continue
        if f.name in defaults:
            value = defaults[f.name]
            default = field(default_factory=lambda v=value: v) if dataclasses.is_dataclass(value) else value
        elif f.default_factory is not dataclasses.MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = f.default
        specs.append((f.name, f.type, default))
    options = dataclasses.make_dataclass(name, specs, frozen=True)
    options.__module__ = __name__  # where its annotations (strings) resolve
    return options


def _job(job: type, options: Any, **run_fields: Any) -> Any:
    """The job a step runs: its options plus what the run provides."""
    return job(**{f.name: getattr(options, f.name) for f in dataclasses.fields(options)}, **run_fields)


# placement "default": a recipe's quantize step picks by measured speed unless it names a placement
QuantizeOptions = step_options(QuantizeJob, "QuantizeOptions", config=QuantConfig(placement="default"))
PruneOptions = step_options(PruneJob, "PruneOptions")


@dataclass(frozen=True)
class CheckOptions(Gate):
    """The gate's budgets (``vitcompress check --max-drop ...``; a check step gates on top-1 drop unless told otherwise)."""
    max_drop: float | None = 1.0
    eval_size: int | None = None  # default: the recipe's data.eval_size
    runtime: str = "onnxruntime"

    def gate(self) -> Gate:
        return Gate(**{name: getattr(self, name) for name in GATE_FIELDS})


def _run_prune(opts: Any, state: RunState, folder: Path, progress: ProgressFn) -> tuple[RunState, dict]:
    job = _job(PruneJob, opts, out=folder, model=state.model, checkpoint=state.checkpoint, pretrained=state.pretrained,
               calib_dir=state.require("data.calib", state.calib, "prune"), eval_dir=state.eval, eval_size=state.eval_size,
               seed=state.seed, force=True, workers=state.workers)
    report = prune(job, progress)
    return replace(state, model=None, checkpoint=folder / "model.pruned.pth", artifact=folder / "model.pruned.onnx",
                   baseline=state.baseline or folder / "model.fp32.onnx"), report


def _run_quantize(opts: Any, state: RunState, folder: Path, progress: ProgressFn) -> tuple[RunState, dict]:
    job = _job(QuantizeJob, opts, out=folder, model=state.model, checkpoint=state.checkpoint, pretrained=state.pretrained,
               calib_dir=state.require("data.calib", state.calib, "quantize"), eval_dir=state.eval, eval_size=state.eval_size,
               seed=state.seed, force=True, workers=state.workers)
    report = quantize(job, progress)
    files = report["artifacts"]
    return replace(state, model=None, checkpoint=folder / files["checkpoint"]["path"], artifact=folder / files["quantized"]["path"],
                   baseline=state.baseline or folder / files["fp32"]["path"]), report


def _run_check(opts: CheckOptions, state: RunState, folder: Path, progress: ProgressFn) -> tuple[RunState, dict]:
    from ..check import check

    report = check(state.require("an exported artifact (a prune or quantize step before it)", state.artifact, "check"),
                   state.require("data.eval", state.eval, "check"), opts.gate(),
                   baseline=state.require("a float baseline", state.baseline, "check"),
                   eval_size=opts.eval_size or state.eval_size, seed=state.seed, progress=progress, runtime=opts.runtime,
                   workers=state.workers)
    write_json(folder / "report.json", report)
    write_report_documents(folder, report)
    return replace(state, passed=report["passed"]), report


def _build_default(spec: "StepSpec", fields: dict, build: Callable) -> Any:
    return build(spec.config, fields)


def _build_quantize(spec: "StepSpec", fields: dict, build: Callable) -> Any:
    """Flat recipe keys: QuantConfig's go to the quantization config, the rest to the step."""
    quant_keys = {f.name for f in dataclasses.fields(QuantConfig)}
    own = {k: v for k, v in fields.items() if k not in quant_keys}
    config = build(QuantConfig, {"placement": "default", **{k: v for k, v in fields.items() if k in quant_keys}},
                   extra_valid=sorted(own))
    step = build(QuantizeOptions, own, extra_valid=sorted(quant_keys))
    return replace(step, config=config)


def _no_checks(config: Any, error: Callable[[str, str], Exception]) -> None:
    pass


def _validate_prune(opts: PruneOptions, error: Callable[[str, str], Exception]) -> None:
    from ..prune_api import METHODS

    if (opts.target_speedup is None) == (opts.target_flops is None):
        raise error("target_speedup", "give exactly one of target_speedup and target_flops")
    if opts.method not in METHODS:
        raise error("method", f"unknown method '{opts.method}' (choose from {', '.join(METHODS)})")


def _validate_quantize(opts: QuantizeOptions, error: Callable[[str, str], Exception]) -> None:
    """Names a recipe can get wrong, checked before any work starts."""
    from ..cpu import TARGET_CHOICES
    from ..export.onnx_export import WEIGHT_FORMATS
    from ..export.runtime import RUNTIMES
    from ..quant import METHODS
    from ..quant.placement import ALIASES, PLACEMENTS

    placements = ("default", "auto", *PLACEMENTS, *ALIASES)
    for name, value, choices in (("method", opts.config.method, sorted(METHODS)), ("placement", opts.config.placement, placements),
                                 ("target_cpu", opts.target_cpu, TARGET_CHOICES), ("runtime", opts.runtime, tuple(RUNTIMES)),
                                 ("weight_format", opts.weight_format, WEIGHT_FORMATS)):
        if value not in choices:
            raise error(name, f"unknown {name} '{value}' (choose from {', '.join(choices)})")
    if opts.calib_size <= 0:
        raise error("calib_size", f"expected a positive number of images, got {opts.calib_size}")
    try:
        method_options(opts.config)  # the method's own parser: the same errors as on the command line
    except VitcompressError as e:
        raise error("method_options", str(e)) from None


def _validate_check(opts: CheckOptions, error: Callable[[str, str], Exception]) -> None:
    problem = opts.gate().problem()
    if problem:
        raise error(*problem)


@dataclass(frozen=True)
class StepSpec:
    """A kind of step: its config dataclass, how a recipe mapping becomes one, its checks, its run."""

    name: str
    config: type
    run: Callable[[Any, RunState, Path, ProgressFn], tuple[RunState, dict]]
    validate: Callable[[Any, Callable[[str, str], Exception]], None] = _no_checks
    build: Callable[["StepSpec", dict, Callable], Any] = _build_default
    needs: tuple[str, ...] = ("calib",)  # the recipe's data folders the step reads
    method: Callable[[Any], str | None] = lambda config: None  # the method it runs (support.py's name), if any


STEPS: dict[str, StepSpec] = {
    "prune": StepSpec("prune", PruneOptions, _run_prune, _validate_prune, method=lambda o: o.method),
    "quantize": StepSpec("quantize", QuantizeOptions, _run_quantize, _validate_quantize, _build_quantize,
                         method=lambda o: o.config.method),
    "check": StepSpec("check", CheckOptions, _run_check, _validate_check, needs=("eval",)),
}


def options_dict(options: Any) -> dict:
    """A step config as plain data (for hashing and the manifest)."""
    return dataclasses.asdict(options)
