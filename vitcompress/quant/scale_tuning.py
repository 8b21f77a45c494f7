"""End-to-end tuning of activation scales (ours, a post-search step of Q-HyViT).

After a per-layer search every activation scale was chosen against a local objective. This step
moves all of them together by gradient descent on the objective that matters, the whole model's
KL(float logits ‖ quantized logits) on the calibration images, with the rounding's gradient passed
straight through as in LSQ (Esser et al., "Learned Step Size Quantization"; ``spec.fake_quantize``
with a scale that requires grad). Zero points stay fixed; weights, their grids and the model's parameters are
untouched, so export is unchanged apart from the scales.

The calibration set is small (32–128 images), so the images are augmented for this step (each
image, its horizontal mirror, and both shifted by 1/16 of the image side in four directions): one
set of scales must fit all of them, which measured less overfitting on the val split than the plain
images (cifar10_mobilevit_xxs, see docs/qhyvit.md). This assumes mirrored and slightly shifted
images are as natural as the originals, true of photographs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import batched_logits, images_per_backward, logits_kl
from .modules import TensorQuantizer
from .refine import Refinement
from .spec import fake_quantize


VIEWS = 10  # what ``augmented`` makes of each image: itself, its mirror, and both shifted four ways


def augmented(images: torch.Tensor, views: int = VIEWS) -> torch.Tensor:
    """The images, their mirrors, and both shifted by 1/16 of the side up, down, left and right
    (rolled: the rows or columns that leave one edge re-enter at the other), in that order; only
    the first ``views`` of those ``VIEWS`` sets are made."""
    d = max(1, images.shape[-1] // 16)
    base = (images, images.flip(-1))
    shifted = [(b, shift, dim) for shift in (d, -d) for dim in (-2, -1) for b in (0, 1)]
    made = list(base[:views]) + [base[b].roll(shift, dim) for b, shift, dim in shifted[:max(0, views - 2)]]
    return torch.cat(made)


class LearnedStep:
    """An activation quantizer's step size as a parameter in log space, installed in the quantizer
    until ``remove()`` (``apply()`` sets the learned scale). ``drop``: QDrop's probability, read at
    each call, that an element passes unquantized (reconstruction.py); None never drops."""

    def __init__(self, q: TensorQuantizer, drop: Callable[[], float] | None = None,
                 generator: torch.Generator | None = None):
        self.q = q
        self.log_scale = nn.Parameter(q.scale.detach().clone().log())
        self.drop, self.generator = drop, generator
        q.forward = self.forward  # for the tuning only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fake_quantize(x, self.log_scale.exp(), self.q.zero_point, self.q.spec)
        p = self.drop() if self.drop is not None else 0.0
        if p <= 0:
            return y
        return torch.where(torch.rand(x.shape, generator=self.generator) < p, x, y)

    def apply(self, log_scale: torch.Tensor | None = None) -> None:
        self.q.set_qparams((self.log_scale if log_scale is None else log_scale).detach().exp(), self.q.zero_point)

    def remove(self) -> None:
        del self.q.forward  # back to the class's forward


def tune_activation_scales(model: nn.Module, quantizers: Sequence[TensorQuantizer], images: torch.Tensor,
                           float_logits: torch.Tensor, steps: int = 600, lr: float = 1e-3, batch_size: int = 32,
                           seed: int = 0, check_every: int = 50) -> list[float]:
    """Adam on log(scale) of ``quantizers`` (all in "quantize" mode) to minimise KL(float ‖ quantized)
    on ``images`` (``augmented`` calibration images), whose float model logits are ``float_logits``.

    The straight-through gradient is biased and each batch is noisy, so the KL on all ``images`` is
    measured at the start and every ``check_every`` steps, and the scales with the lowest one are
    set in place (the starting scales if none was lower). Returns those measured KLs.

    A step's batch goes through backward in pieces where its module outputs would exceed
    ``calibration.BACKWARD_BYTES`` (large inputs), the gradients summed: the same step."""
    ref = float_logits.log_softmax(-1)
    piece = images_per_backward(model, images[:1], batch_size)

    def full_kl() -> float:
        return logits_kl(ref, batched_logits(model, images, batch_size))

    steps_ = [LearnedStep(q) for q in quantizers]
    log_scales = [s.log_scale for s in steps_]
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(log_scales, lr=lr)
    # cosine decay to 0: the last steps settle instead of jumping with each batch's noise
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    try:
        checks = [full_kl()]
        best = [ls.detach().clone() for ls in log_scales]
        for step in range(1, steps + 1):
            idx = torch.randperm(len(images), generator=generator)[:batch_size]
            optimizer.zero_grad()
            for part in idx.split(piece):  # the batch's mean KL, its gradient summed over the pieces
                loss = F.kl_div(model(images[part]).log_softmax(-1), ref[part], log_target=True, reduction="sum") / len(idx)
                loss.backward()
            optimizer.step()
            schedule.step()
            if step % check_every == 0 or step == steps:
                checks.append(full_kl())
                if checks[-1] < min(checks[:-1]):
                    best = [ls.detach().clone() for ls in log_scales]
    finally:
        for s in steps_:
            s.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    for s, ls in zip(steps_, best):
        s.apply(ls)
    return checks


def scale_tuning_refinement(quantizers: Sequence[TensorQuantizer], images: torch.Tensor | None,
                            float_logits: torch.Tensor | None, steps: int, batch_size: int = 32,
                            seed: int = 0) -> tuple[Refinement, list[float]]:
    """Scale tuning as a method's refinement (``refine.py``; on when ``steps`` > 0), judged by its
    own checks on the ``images`` it fits (the start and the best measured KL), and the list those
    checks fill. The plain calibration images are too few to judge it (docs/qhyvit.md)."""
    checks: list[float] = []
    tuned = set(quantizers)

    def run(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor]) -> list:
        checks.extend(tune_activation_scales(model, quantizers, images, float_logits, steps, batch_size=batch_size, seed=seed))
        return list(quantizers)

    def changes(layer: nn.Module) -> list[torch.Tensor]:
        q = getattr(layer, "input_quantizer", None)
        return [q.scale] if q in tuned else []

    return Refinement("scale_tuning", lambda done: steps > 0, run, changes, lambda: (checks[0], min(checks)),
                      judged_on="augmented calibration images"), checks
