"""Accuracy and fidelity: top-1/top-5 against labels, agreement and KL against a reference model.

Several predictors (torch modules or onnxruntime sessions) are evaluated in one pass over the
images, so each image is decoded once and all models see identical inputs.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .data import ImageSet, LoadStats, Preprocessing, iter_batches

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
) -> tuple[dict[str, np.ndarray], np.ndarray | None, LoadStats]:
    stats = LoadStats()
    logits: dict[str, list[np.ndarray]] = {k: [] for k in predictors}
    labels: list[np.ndarray] = []
    done = 0
    for x, y in iter_batches(image_set, preprocessing, batch_size, stats):
        for name, predict in predictors.items():
            logits[name].append(predict(x))
        if y is not None:
            labels.append(y.numpy())
        done += len(x)
        if progress:
            progress(done, len(image_set))
    out = {k: np.concatenate(v) for k, v in logits.items()}
    return out, (np.concatenate(labels) if labels else None), stats


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
