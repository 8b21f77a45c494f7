"""Accuracy and fidelity: top-1/top-5 against labels, agreement and KL against a reference model.

Several predictors (torch modules or runtime sessions) are evaluated in one pass over the images,
so each image is decoded once and all models see identical inputs. ``evaluate`` cuts the image
set into fixed shards (whole batches, the same whatever runs them) and runs them on a pool
(``workers.py``): in this process or on Ray workers, with the same logits either way.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .data import ImageSet, LoadStats, Preprocessing, iter_batches, no_images_error

Predictor = Callable[[torch.Tensor], np.ndarray]  # batch of images -> logits


def torch_predictor(model: torch.nn.Module) -> Predictor:
    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(x).float().numpy()

    return predict


def onnx_predictor(session) -> Predictor:
    from .export.runtime import run_session

    return lambda x: run_session(session, x.numpy())


def collect_logits(
    predictors: dict[str, Predictor],
    image_set: ImageSet,
    preprocessing: Preprocessing,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    require_images: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, LoadStats]:
    stats = LoadStats()
    logits: dict[str, list[np.ndarray]] = {k: [] for k in predictors}
    labels: list[np.ndarray] = []
    done = 0
    for x, y in iter_batches(image_set, preprocessing, batch_size, stats, require_images):
        for name, predict in predictors.items():
            logits[name].append(predict(x))
        if y is not None:
            labels.append(y.numpy())
        done += len(x)
        if progress:
            progress(done, len(image_set))
    out = {k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in logits.items()}
    return out, (np.concatenate(labels) if labels else None), stats


SHARD_BATCHES = 8  # batches per shard: shards are cut from the image list, never from the worker count


@dataclass(frozen=True)
class PredictorSource:
    """A predictor as data, so each worker opens its own: an ONNX file on a runtime, or a torch
    module (pickled to the workers)."""
    onnx: str | None = None
    runtime: str = "onnxruntime"
    module: Any = None

    def open(self, threads: int = 0) -> Predictor:
        if self.module is not None:
            return torch_predictor(self.module)
        from .export.runtime import open_session

        return onnx_predictor(open_session(self.onnx, self.runtime, threads))


_WORKER_SESSIONS: dict[tuple, Predictor] = {}  # in a worker process: sessions kept for its next shard


def shards_of(image_set: ImageSet, batch_size: int) -> list[ImageSet]:
    """Contiguous slices of SHARD_BATCHES whole batches."""
    size = batch_size * SHARD_BATCHES
    return [dataclasses.replace(image_set, paths=image_set.paths[i:i + size],
                                labels=None if image_set.labels is None else image_set.labels[i:i + size])
            for i in range(0, len(image_set), size)]


def _shard_logits_in_worker(sources: dict[str, PredictorSource], shard: ImageSet, preprocessing: Preprocessing, batch_size: int):
    opened = {}
    for k, s in sources.items():
        if s.module is not None:
            opened[k] = s.open()
        else:
            key = (s, os.stat(s.onnx).st_mtime_ns)  # a rewritten file is opened afresh
            if key not in _WORKER_SESSIONS:
                _WORKER_SESSIONS[key] = s.open(threads=1)  # the workers share the cores
            opened[k] = _WORKER_SESSIONS[key]
    return collect_logits(opened, shard, preprocessing, batch_size, require_images=False)


def evaluate(sources: dict[str, PredictorSource], image_set: ImageSet, preprocessing: Preprocessing, batch_size: int = 64,
             progress: Callable[[int, int], None] | None = None, pool=None) -> tuple[dict[str, np.ndarray], np.ndarray | None, LoadStats]:
    """``collect_logits`` over fixed shards on ``pool`` (default: this process); the result does not
    depend on the pool: the same batches meet the same models."""
    from .workers import LocalPool

    shards = shards_of(image_set, batch_size)
    seen = [0]

    def on_done(i: int, _result) -> None:
        seen[0] += len(shards[i])
        if progress:
            progress(seen[0], len(image_set))

    pool = pool or LocalPool()
    opened: dict[str, Predictor] = {}

    def here(i: int):  # this process's share: sessions opened on first use, after the workers got theirs
        if not opened:
            opened.update({k: s.open(threads=0 if pool.in_process else 1) for k, s in sources.items()})
        return collect_logits(opened, shards[i], preprocessing, batch_size, require_images=False)

    results = pool.map(_shard_logits_in_worker, [(sources, s, preprocessing, batch_size) for s in shards], on_done, here=here)
    stats = LoadStats()
    for _, _, st in results:
        stats.loaded += st.loaded
        stats.skipped += st.skipped
        stats.skipped_files += st.skipped_files
    if stats.loaded == 0:
        raise no_images_error(image_set)
    kept = [r for r in results if r[2].loaded]
    logits = {k: np.concatenate([r[0][k] for r in kept]) for k in sources}
    labels = np.concatenate([r[1] for r in kept]) if kept[0][1] is not None else None
    return logits, labels, stats


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    topk = np.argsort(-logits, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean() * 100.0)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Label-free closeness to the reference model: top-1 agreement (%) and mean KL(ref || cand)."""
    p_log, q_log = _log_softmax(reference), _log_softmax(candidate)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(axis=1).mean()
    return {
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean() * 100.0),
        "kl": float(kl),
    }


def summarize(logits: np.ndarray, labels: np.ndarray | None, label_map: list[int] | None, num_classes: int) -> dict:
    """top-1 (and top-5 when there are at least 5 classes) with folder labels mapped to model outputs."""
    if labels is None or label_map is None:
        return {}
    y = np.asarray(label_map)[labels]
    out = {"top1": accuracy(logits, y, 1), "images": int(len(y))}
    if num_classes >= 5:
        out["top5"] = accuracy(logits, y, 5)
    return out
