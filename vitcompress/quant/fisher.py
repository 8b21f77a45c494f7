"""The diagonal Fisher information of a model's prediction at chosen module outputs.

Q-HyViT weighs each block's output error by diag((∂L/∂O)²) with L = KL(float ‖ quantized logits);
BRECQ weighs its block reconstruction the same way. At the float model that KL has zero gradient,
and its Hessian is the Fisher information of the prediction, Σ_c p_c (∂ log p_c/∂O)²: exact (one
backward pass per class) for up to ``max_exact`` classes, otherwise estimated from ``max_exact``
labels sampled from the model's own prediction (Monte Carlo, seeded per image, so the numbers do
not depend on how the images are batched). Backward passes take as many images as
``calibration.images_per_backward`` allows at the model's input size.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import SHARD_BATCHES, images_per_backward


def label_weights(logp: torch.Tensor, max_exact: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(labels, weights) pairs whose weighted squared gradients sum to the diagonal Fisher; image j
    of the batch draws its labels from a generator seeded ``seed + j``."""
    p = logp.exp()
    n, c = p.shape
    if c <= max_exact:
        for k in range(c):
            yield torch.full((n,), k, dtype=torch.long), p[:, k]
        return
    drawn = torch.stack([torch.multinomial(p[j], max_exact, replacement=True, generator=torch.Generator().manual_seed(seed + j))
                         for j in range(n)])
    for k in range(max_exact):
        yield drawn[:, k], torch.full((n,), 1.0 / max_exact)


def output_fisher(model: nn.Module, images: torch.Tensor, outputs_of: dict[str, nn.Module], batch_size: int,
                  max_exact: int = 16, seed: int = 0,
                  map_shards: Callable[[Callable, list], list] | None = None) -> dict[str, torch.Tensor]:
    """The diagonal Fisher at the output of each module in ``outputs_of`` (key → module), for every
    image (first dimension image-major, as the module's output is). Run it on the float model.

    Each batch's Fisher depends only on its images and its seed (``seed`` + its first image's
    index), so ``map_shards`` (a worker pool's map) can compute shards of batches on the workers;
    joined in order they are one process's tensors."""
    if map_shards is None:
        return _fisher_of_batches(model, images, outputs_of, batch_size, max_exact, seed, 0)
    name_of = {id(m): n for n, m in model.named_modules()}
    names = {k: name_of[id(m)] for k, m in outputs_of.items()}  # modules travel as names inside the shipped model
    step = batch_size * SHARD_BATCHES
    parts = map_shards(_fisher_shard, [(model, images[i:i + step], names, batch_size, max_exact, seed, i)
                                       for i in range(0, len(images), step)])
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in outputs_of if any(k in p for p in parts)}


def _fisher_shard(model: nn.Module, images: torch.Tensor, names: dict[str, str], batch_size: int, max_exact: int,
                  seed: int, offset: int) -> dict[str, torch.Tensor]:
    """One shard of ``output_fisher`` (in a worker, on its own copy of the model)."""
    return _fisher_of_batches(model, images, {k: model.get_submodule(n) for k, n in names.items()}, batch_size,
                              max_exact, seed, offset)


def _fisher_of_batches(model: nn.Module, images: torch.Tensor, outputs_of: dict[str, nn.Module], batch_size: int,
                       max_exact: int, seed: int, offset: int) -> dict[str, torch.Tensor]:
    """``output_fisher`` over ``images``, whose first image is image ``offset`` of the whole set."""
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in outputs_of}
    outputs: dict[str, torch.Tensor] = {}

    def grab(key: str):
        def hook(m, inp, out):
            outputs[key] = out
            return out.clone()  # downstream in-place ops must not rewrite the tensor we differentiate by
        return hook

    if len(images) == 0:
        return {}
    batch_size = images_per_backward(model, images[:1], batch_size)
    hooks = [m.register_forward_hook(grab(k)) for k, m in outputs_of.items()]
    try:
        for i in range(0, len(images), batch_size):
            with torch.enable_grad():
                logp = F.log_softmax(model(images[i:i + batch_size].clone().requires_grad_(True)), dim=-1)
                keys = list(outputs)
                fisher = {k: torch.zeros_like(outputs[k]) for k in keys}
                for y, w in label_weights(logp.detach(), max_exact, seed + offset + i):
                    nll = -logp.gather(1, y[:, None]).squeeze(1)
                    grads = torch.autograd.grad(nll.sum(), [outputs[k] for k in keys], retain_graph=True, allow_unused=True)
                    for k, g in zip(keys, grads):
                        if g is not None:
                            shape = (-1,) + (1,) * (g.dim() - 1)
                            fisher[k] += w.view(shape).to(g.dtype) * g.pow(2) if g.shape[0] == len(w) else w.mean() * g.pow(2)
            for k in keys:
                chunks[k].append(fisher[k].detach())
            outputs.clear()
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in chunks.items() if v}
