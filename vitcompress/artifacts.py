"""What every command writes next to its artifacts: ONNX metadata, file facts, the environment.

Shared by `quantize`, `export` and `prune` (api.py, prune_api.py).
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable

import torch

from ._version import __version__
from .models import LoadedModel

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
REPORT_SCHEMA = "vitcompress-report/1"


def no_progress(stage: str, done: int, total: int) -> None:
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
