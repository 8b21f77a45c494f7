"""Recovery after pruning: short knowledge distillation from the float model.

The pruned student is trained to match the float teacher's softened logits (KL divergence at a
temperature) on unlabelled images — calibration/train images, no labels — with light
augmentation (random shifts by padding and cropping, horizontal flips), AdamW and a cosine
learning-rate schedule with a short warm-up. Stops after ``steps`` steps or ``max_seconds``,
whichever comes first; the cosine schedule follows whichever limit is closer, so a time-capped run
still ends at a low learning rate. Deterministic for a given seed (single-process CPU) when only
the step limit applies; a time limit makes the step count depend on the machine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitcompressError


@dataclass(frozen=True)
class RecoverConfig:
    steps: int = 0
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    temperature: float = 2.0
    warmup: int = 50
    max_seconds: float | None = None
    pad: int = 4  # random-shift padding in pixels (0 disables)
    flip: bool = True
    seed: int = 0


def _augment(x: torch.Tensor, cfg: RecoverConfig, gen: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    if cfg.pad > 0:
        p = cfg.pad
        padded = F.pad(x, (p, p, p, p), mode="reflect" if min(h, w) > p else "constant")
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])  # b, h
        cols = (dx[:, None] + torch.arange(w)[None, :])  # b, w
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    if cfg.flip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: RecoverConfig,
            progress: Callable[[int, int], None] | None = None,
            after_step: Callable[[], None] | None = None) -> dict:
    """Train ``student`` in place to mimic ``teacher``; returns steps run, seconds and loss trace.
    ``after_step`` runs after every optimiser step (e.g. to keep pruned tiles at zero)."""
    if cfg.steps <= 0:
        return {"steps": 0, "seconds": 0.0}
    if len(images) == 0:
        raise VitcompressError("no images for recovery")
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        """Warm-up, then cosine decay over the steps or the time limit, whichever ends first."""
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        if cfg.max_seconds:
            t = max(t, (time.perf_counter() - t0) / cfg.max_seconds)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, t)))

    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    perm = torch.randperm(len(images), generator=gen)
    pos = 0
    T = cfg.temperature
    try:
        while step < cfg.steps:
            if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
                break
            if pos + cfg.batch_size > len(perm):
                perm, pos = torch.randperm(len(images), generator=gen), 0
            x = _augment(images[perm[pos:pos + cfg.batch_size]], cfg, gen)
            pos += cfg.batch_size
            with torch.no_grad():
                target = F.log_softmax(teacher(x) / T, dim=1)
            out = F.log_softmax(student(x) / T, dim=1)
            loss = F.kl_div(out, target, log_target=True, reduction="batchmean") * T * T
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            losses.append(loss.detach().item())
            step += 1
            if progress:
                progress(step, cfg.steps)
    finally:
        student.eval()
    every = max(1, len(losses) // 20)
    return {"steps": step, "seconds": time.perf_counter() - t0, "requested_steps": cfg.steps,
            "loss_first": losses[0] if losses else None, "loss_last": sum(losses[-every:]) / max(1, len(losses[-every:])),
            "loss_trace": [sum(losses[i:i + every]) / len(losses[i:i + every]) for i in range(0, len(losses), every)],
            "config": {"batch_size": cfg.batch_size, "lr": cfg.lr, "temperature": cfg.temperature,
                       "images": len(images), "augment": {"pad": cfg.pad, "flip": cfg.flip}}}
