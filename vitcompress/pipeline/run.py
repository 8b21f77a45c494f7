"""Running a recipe: each step in a folder of its own, skipped when its inputs have not changed.

A step's inputs are hashed: its kind and options, the model it reads (the checkpoint file's
sha256, or the timm name), the images (paths and sizes of every file in the data folders), the
seed and the versions of the packages that compute. A re-run finds the same hash and the same
artifacts (sha256) in the step's folder and reuses them; ``force`` redoes every step. The run's
``manifest.json`` lists every artifact with its sha256, the command line, versions and seed;
``report.md`` and ``report.html`` show every step's measurements with plots.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..artifacts import ProgressFn, environment, no_progress
from ..errors import VitcompressError
from ..fileio import write_json
from ..reports import run_document, write_report_files
from ..workers import Workers
from .recipe import SCHEMA, Recipe
from .steps import STEPS, RunState, options_dict

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "vitcompress-manifest/1"
STEP_RECORD = "step.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(folder: Path | None) -> str | None:
    """A digest of an image folder's contents as listed: relative paths and sizes (fast on 50k files)."""
    if folder is None:
        return None
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            entries.append(f"{p.relative_to(folder)}:{p.stat().st_size}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


@functools.cache
def source_digest() -> str:
    """sha256 of vitcompress's own source files: a step made by other code is not reused (the
    version number does not change with every commit)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> dict:
    env = environment()
    return {"vitcompress": __version__, "vitcompress_source": source_digest(),
            **{k: env[k] for k in ("torch", "onnxruntime", "timm", "python")}}


def _artifacts(folder: Path) -> dict[str, str]:
    """{file name: sha256} of what a step wrote (its record excluded)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != STEP_RECORD}


def _state_to_record(state: RunState, folder: Path) -> dict:
    """The state a step hands on, as its record keeps it (where work ran is not part of it)."""
    return {f.name: (os.path.relpath(v, folder) if isinstance(v, Path) else v)
            for f in dataclasses.fields(state) if f.name != "workers" for v in [getattr(state, f.name)]}


def _state_from_record(record: dict, folder: Path, workers: Workers) -> RunState:
    paths = {"checkpoint", "calib", "eval", "artifact", "baseline"}
    return RunState(**{k: ((folder / v).resolve() if k in paths and v is not None else v) for k, v in record.items()}, workers=workers)


def _reusable(folder: Path, inputs: str) -> dict | None:
    """The step's record when its folder holds a finished run of the same inputs, untouched."""
    try:
        record = json.loads((folder / STEP_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("inputs_sha256") != inputs:
        return None
    try:
        if _artifacts(folder) != record.get("artifacts"):
            return None
    except OSError:
        return None
    return record


@dataclass
class StepResult:
    index: int
    kind: str
    folder: Path
    status: str  # "ran" or "reused"
    report: dict


def _prepare_out(recipe: Recipe, out: Path, force: bool) -> None:
    """A run folder is new, empty, or one this recipe ran in before (resumed); anything else needs --force."""
    if out.exists() and not out.is_dir():
        raise VitcompressError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        try:
            manifest = json.loads((out / MANIFEST).read_text())
        except (OSError, ValueError):
            raise VitcompressError(f"output folder {out} is not empty and holds no run of a recipe; pass --force to overwrite") from None
        if Path(manifest.get("recipe", {}).get("path", "")).resolve() != recipe.path.resolve():
            raise VitcompressError(f"output folder {out} holds a run of {manifest.get('recipe', {}).get('path')}; "
                                   f"pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)


def run_recipe(recipe: Recipe, out: Path, force: bool = False, progress: ProgressFn = no_progress,
               on_step=None, workers: Workers = Workers()) -> dict:
    """Run every step of ``recipe`` into ``out``; returns the manifest (also written as manifest.json).

    ``on_step(StepResult)`` is called after each step. A failed check ends the run with the
    manifest's ``passed`` false (the steps after it do not run)."""
    out = Path(out)
    _prepare_out(recipe, out, force)
    versions = _versions()
    data = {"calib": folder_digest(recipe.data.calib), "eval": folder_digest(recipe.data.eval), "eval_size": recipe.data.eval_size}
    state = RunState(model=recipe.model.name, checkpoint=recipe.model.checkpoint, pretrained=recipe.model.pretrained,
                     calib=recipe.data.calib, eval=recipe.data.eval, eval_size=recipe.data.eval_size, seed=recipe.seed, workers=workers)
    model_input = sha256_file(recipe.model.checkpoint) if recipe.model.checkpoint else f"timm:{recipe.model.name}:{recipe.model.pretrained}"
    steps, results = [], []
    for i, step in enumerate(recipe.steps, 1):
        spec = STEPS[step.kind]
        folder = out / f"{i:02d}-{step.kind}"
        inputs = _sha256_json({"step": step.kind, "options": options_dict(step.options), "model": model_input, "data": data,
                               "seed": recipe.seed, "versions": versions, "previous": [s["inputs_sha256"] for s in steps]})
        record = None if force else _reusable(folder, inputs)
        if record is not None:
            state = _state_from_record(record["state"], folder, workers)
            result = StepResult(i, step.kind, folder, "reused", record["report"])
        else:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            state, report = spec.run(step.options, state, folder, progress)
            record = {"inputs_sha256": inputs, "kind": step.kind, "options": options_dict(step.options),
                      "state": _state_to_record(state, folder), "report": report}
            record["artifacts"] = _artifacts(folder)
            write_json(folder / STEP_RECORD, record)
            result = StepResult(i, step.kind, folder, "ran", report)
        if state.checkpoint is not None:  # the next step's input model: hashed with the step's artifacts already
            written = record["artifacts"].get(state.checkpoint.name) if state.checkpoint.resolve().parent == folder.resolve() else None
            model_input = written or sha256_file(state.checkpoint)
        steps.append({"index": i, "kind": step.kind, "folder": folder.name, "status": result.status,
                      "inputs_sha256": inputs, "options": record["options"],
                      "artifacts": {f"{folder.name}/{k}": v for k, v in record["artifacts"].items()}})
        results.append(result)
        if on_step is not None:
            on_step(result)
        if state.passed is False:
            break
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "workers": {"count": workers.count, "address": workers.address},
        "recipe": {"path": str(recipe.path), "schema": SCHEMA, "sha256": sha256_file(recipe.path), "overrides": list(recipe.overrides)},
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "seed": recipe.seed,
        "versions": versions,
        "data": {"calib": str(recipe.data.calib) if recipe.data.calib else None, "eval": str(recipe.data.eval) if recipe.data.eval else None,
                 "digests": data},
        "steps": steps,
        "passed": state.passed is not False and len(steps) == len(recipe.steps),
        "final_artifact": os.path.relpath(state.artifact, out) if state.artifact else None,
    }
    write_json(out / MANIFEST, manifest)
    write_report_files(out, run_document(manifest, {r.folder.name: r.report for r in results}))
    return manifest


__all__ = ["StepResult", "run_recipe", "sha256_file"]
