"""What every command writes next to its artifacts: ONNX metadata, file facts, the environment,
the report's common head, checkpoints; and the images every pipeline samples the same way.

Shared by `quantize`, `export` and `prune` (api.py, prune_api.py), so their skeleton exists once.
"""
from __future__ import annotations

import datetime as _dt
import io
import platform
from pathlib import Path
from typing import Callable

import torch

from ._version import __version__
from .data import ImageSet, LoadStats, label_map_to_model, load_tensor, sample, scan_images
from .fileio import atomic_path
from .models import LoadedModel, checkpoint_dict, family_of

ProgressFn = Callable[..., None]  # (stage, done, total[, info]): info is a one-line state, e.g. a search's loss
REPORT_SCHEMA = "vitcompress-report/1"


def no_progress(stage: str, done: int, total: int, info: str = "") -> None:
    pass


def onnx_metadata(loaded: LoadedModel, kind: str, **extra) -> dict:
    """Preprocessing and provenance stored in an exported ONNX file (read back by `check`)."""
    return {
        "format": "vitcompress-onnx/1",
        "vitcompress_version": __version__,
        "kind": kind,
        "preprocessing": loaded.preprocessing.to_dict(),
        "num_classes": loaded.num_classes,
        "source": {"arch": loaded.arch, "kwargs": loaded.kwargs, "checkpoint": loaded.source, "weights": loaded.weights},
        **extra,
    }


def file_info(path: Path) -> dict:
    return {"path": path.name, "bytes": path.stat().st_size}


def environment() -> dict:
    import onnxruntime
    import timm

    return {
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }


RANDOM_WEIGHTS_NOTE = "random weights (--no-pretrained): accuracy numbers are meaningless; latency and size are real"


def created_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_report_documents(out: Path, report: dict) -> None:
    """report.md and report.html (with plots) beside report.json, rendered from it."""
    from .reports import document, write_report_files

    write_report_files(out, document(report))


def report_head(command: str, loaded: LoadedModel) -> dict:
    """The fields every command's report.json starts with."""
    return {
        "schema": REPORT_SCHEMA,
        "command": command,
        "created": created_now(),
        "model": {"arch": loaded.arch, "family": family_of(loaded.arch), "source": loaded.source, "weights": loaded.weights,
                  "num_classes": loaded.num_classes, "input_size": list(loaded.preprocessing.input_size)},
    }


def calibration_images(loaded: LoadedModel, folder: Path, size: int, seed: int) -> tuple[torch.Tensor, ImageSet, ImageSet, dict]:
    """(images as one tensor, the folder's images, the seeded sample taken, the report's
    "calibration" entry)."""
    stats = LoadStats()
    images = scan_images(folder)
    chosen = sample(images, size, seed)
    tensor = load_tensor(chosen, loaded.preprocessing, stats)
    return tensor, images, chosen, {"dir": str(folder), "requested": size, "used": stats.loaded, "skipped": stats.skipped, "seed": seed}


def evaluation_images(loaded: LoadedModel, folder: Path, size: int | None, seed: int) -> tuple[ImageSet, list[int]]:
    """A seeded sample of a labelled folder and the map from its labels to the model's outputs."""
    images = sample(scan_images(folder, require_labels=True), size, seed)
    return images, label_map_to_model(images, loaded.preprocessing.class_names, loaded.num_classes)


def save_checkpoint(path: Path, loaded: LoadedModel, state_dict: dict, **extra) -> None:
    """A self-describing checkpoint (zoo format, weights_only-loadable), written atomically.

    Serialised in memory first: torch.save names the archive's folder after the file it writes,
    and the temporary file's random name would make two identical runs differ byte for byte."""
    buf = io.BytesIO()
    torch.save(checkpoint_dict(loaded, state_dict, **extra), buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
