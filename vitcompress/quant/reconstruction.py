"""Block reconstruction with learned rounding (BRECQ + AdaRound + QDrop), after a method's search.

Nearest rounding (and GPTQ's one-shot compensation) decides each weight's rounding from its own
layer's error. Here the rounding of every weight of a block is learned together so that the block's
output matches the float block's, with the activation quantizers in the loop:

- AdaRound (Nagel et al., arXiv 2004.10568): each weight is ``s·(⌊w/s⌋ + h(V))`` with
  h(V) = clip(σ(V)·(ζ−γ)+γ, 0, 1), ζ = 1.1, γ = −0.1, V initialised so that h(V) equals the
  fractional part (the soft weight starts at the float weight); the regulariser
  λ·Σ(1 − |2h−1|^β), with β annealed from 20 to 2 after a warm-up without it, drives h to 0 or 1.
  The grid (scales, bits, granularity) is the one the method chose: only rounding decisions change.
- BRECQ (Li et al., arXiv 2102.05426): the unit is a block, not a layer, and the output error is
  weighted by the diagonal Fisher of the prediction at the block output (``fisher.py``; the same
  weighting as Q-HyViT's objective). The target is the float block's output on the float input.
- QDrop (Wei et al., arXiv 2203.05740): during reconstruction every activation quantizer of the
  block is dropped at random per element (the float value passes with probability ``drop_prob``),
  and the block input mixes the quantized model's input with the float model's the same way.
  Activation step sizes are learned jointly (LSQ-style, as QDrop does), in log space.
- Ours, after Norm Tweaking (Li et al., arXiv 2309.02784): with ``float_lr`` > 0 the block's
  vectors that no quantizer reads (norm affines, biases, layer scales) are learned with the rounding.

Blocks: ``blockwise.reconstruction_blocks`` (a transformer block, a bridge block of a hybrid, ...).

Simplifications (ours, for a 2-core CPU budget; docs/reconstruction.md): a few hundred steps per
block instead of 20,000, a single pass over the blocks, and a block is kept only if its output error
on all calibration images (quantized input, hard rounding, no dropping) fell; OPT-m's two-region
quantizers keep their parameters and are not dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from ..errors import VitcompressError
from .blockwise import BlockInputs, capture, reconstruction_blocks
from .bridge import Bridge, follows_previous
from .calibration import float_copy
from .fisher import output_fisher
from .modules import TensorQuantizer
from .refine import Refinement
from .scale_tuning import VIEWS, LearnedStep, augmented
from .spec import broadcast_param

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly


@dataclass(frozen=True)
class ReconstructionConfig:
    """steps: optimisation steps per block; lr: Adam's on the rounding variables V; scale_lr: on
    log activation scales (0 = scales stay); drop_prob: QDrop's probability that an element passes
    unquantized; round_weight: λ of the rounding regulariser; warmup: fraction of steps without it;
    average: decay of an exponential moving average (Polyak averaging) of the learned step sizes and
    vectors over the second half of the steps, which they take before the rounding is hardened (0 = the
    last step's values)."""

    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-2
    scale_lr: float = 1e-3
    drop_prob: float = 0.5
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    fisher: bool = True
    fisher_labels: int = 16
    float_lr: float = 0.0  # Adam's lr on the block's float parameters (norm affines, biases); 0 = they stay
    augment: bool = False  # also reconstruct on the images' mirrors and shifts (scale_tuning.augmented), within ``capture_bytes``
    capture_bytes: int = 2 << 30  # the views are added only while the captured block tensors fit in this
    average: float = 0.0
    seed: int = 0


AUTO_STEPS = 200  # steps per block when a method's default turns reconstruction on (docs/reconstruction.md)
AUTO_MAX_BITS = 6  # a method's default reconstructs at this width or below (docs/reconstruction.md)
RECONSTRUCTION_AUGMENT = True  # the methods' default for reconstructing on mirrored and shifted views too (docs/reconstruction.md)


def steps_for(requested: int | None, narrowest_bits: int, auto_max_bits: int, auto_steps: int) -> int:
    """Reconstruction steps per block: as requested, or by default ``auto_steps`` (the method's) where
    the method measured a gain on held-out images (the model's narrowest width at most
    ``auto_max_bits``), else 0."""
    if requested is not None:
        return requested
    return auto_steps if narrowest_bits <= auto_max_bits else 0


@dataclass(frozen=True)
class ReconstructionOptions:
    """The reconstruction knobs a method offers (its options dataclass inherits them, checked here).

    reconstruction_steps: steps per block; 0 = off; None = the method's ``auto_steps`` where its
        narrowest width is at most its ``auto_max_bits`` (``steps_for``), else off.
    qdrop: QDrop's probability that an activation element passes unquantized during reconstruction.
    reconstruction_augment: ours: reconstruct on the calibration images, their mirrors and shifts.
    reconstruction_fisher: weight the block output error by the Fisher diagonal (BRECQ's, Q-HyViT's
        objective); False: plain squared error (docs/reconstruction.md compares them).
    reconstruction_float_lr: ours, after Norm Tweaking: Adam's learning rate on each block's
        vectors that no quantizer reads (norm affines, biases, layer scales), learned with the
        rounding; 0 = they stay as the method left them.
    reconstruction_average: ours: decay of a moving average of the learned step sizes and vectors over
        each block's second half of steps, the values kept (Polyak averaging; 0 = the last step's). The
        rounding variables are not averaged: the regulariser drives them to 0 or 1 on its own.
    reconstruction_seed: the seed of the batches and QDrop masks (the same seed, the same artifact);
        Q-HyViT draws its Fisher labels and its scale tuning's batches from it too.
    """

    auto_steps: ClassVar[int] = AUTO_STEPS  # what ``reconstruction_steps=None`` gives where it is on
    auto_max_bits: ClassVar[int] = AUTO_MAX_BITS  # ... and where that is: the narrowest width at most this
    reconstruction_steps: int | None = None
    qdrop: float = 0.5
    reconstruction_augment: bool = RECONSTRUCTION_AUGMENT
    reconstruction_fisher: bool = True
    reconstruction_float_lr: float = 0.0
    reconstruction_average: float = 0.0
    reconstruction_seed: int = 0

    def __post_init__(self) -> None:
        steps = self.reconstruction_steps
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise VitcompressError(f"reconstruction_steps must be a whole number ≥ 0, got {steps!r}")
        if not 0.0 <= float(self.qdrop) < 1.0:
            raise VitcompressError(f"qdrop must be in [0, 1), got {self.qdrop!r}")
        if not 0.0 <= float(self.reconstruction_float_lr) < 1.0:
            raise VitcompressError(f"reconstruction_float_lr must be in [0, 1), got {self.reconstruction_float_lr!r}")
        if not 0.0 <= float(self.reconstruction_average) < 1.0:
            raise VitcompressError(f"reconstruction_average must be in [0, 1), got {self.reconstruction_average!r}")
        if not isinstance(self.reconstruction_seed, int) or isinstance(self.reconstruction_seed, bool):
            raise VitcompressError(f"reconstruction_seed must be a whole number, got {self.reconstruction_seed!r}")
        for name in ("reconstruction_augment", "reconstruction_fisher"):
            if not isinstance(getattr(self, name), bool):
                raise VitcompressError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @staticmethod
    def given(raw: dict) -> dict:
        """The reconstruction options among a method's raw ``method_options`` (CLI, recipe), typed:
        a recipe's ``qdrop: 1`` is a float, a steps count given as text a whole number."""
        typed = {"reconstruction_steps": lambda v: None if v is None else _whole(v), "qdrop": float, "reconstruction_float_lr": float,
                 "reconstruction_average": float, "reconstruction_seed": _whole}
        names = {f.name for f in fields(ReconstructionOptions)}
        try:
            return {k: typed.get(k, lambda v: v)(v) for k, v in raw.items() if k in names}
        except (TypeError, ValueError) as e:
            raise VitcompressError(f"bad reconstruction option: {e}") from None

    def reconstruction_config(self, narrowest_bits: int, enabled: bool = True, **fixed) -> ReconstructionConfig:
        """The ``ReconstructionConfig`` these options ask for (``enabled`` False: 0 steps); ``fixed``:
        the method's own settings (batch size)."""
        steps = steps_for(self.reconstruction_steps, narrowest_bits, self.auto_max_bits, self.auto_steps) if enabled else 0
        return ReconstructionConfig(steps=steps, drop_prob=self.qdrop, augment=self.reconstruction_augment,
                                    fisher=self.reconstruction_fisher, float_lr=self.reconstruction_float_lr,
                                    average=self.reconstruction_average, seed=self.reconstruction_seed, **fixed)


def _whole(value) -> int:
    """A whole number from a recipe or the command line (``3``, ``"3"``, ``3.0``); ``2.5`` or ``true`` is
    refused, not truncated."""
    number = float(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not float(number).is_integer():
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(number)


def learned_by_reconstruction(layer: nn.Module) -> list[torch.Tensor]:
    """What reconstruction may change in a quantized layer: its weight and its activation step sizes."""
    return [layer.weight] + [q.scale for q in layer.modules()
                             if isinstance(q, TensorQuantizer) and q is not getattr(layer, "weight_quantizer", None)]


def reconstruction_refinement(layers: Sequence[str], config: ReconstructionConfig, bridges: Sequence[Bridge] = (),
                              progress: Callable[[int, int], None] | None = None,
                              judged_on: str = "calibration images",
                              map_shards: Callable[[Callable, list], list] | None = None) -> tuple[Refinement, dict]:
    """Reconstruction as a method's refinement (``refine.py``; on when ``config.steps`` > 0), and the
    dict its run fills with ``reconstruct``'s report but the layer list (per block: error before/after,
    kept; the settings it ran with)."""
    report: dict = {}

    def run(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor]) -> list[str]:
        result = reconstruct(model, layers, torch.cat(list(batches)), config, bridges, progress, map_shards)
        report.update((k, v) for k, v in result.items() if k != "layers")
        return result["layers"]

    return Refinement("reconstruction", lambda done: config.steps > 0, run, learned_by_reconstruction,
                      judged_on=judged_on,
                      model_changes=(lambda m: _vectors([m])) if config.float_lr > 0 else None), report


def reconstruction_kept(done: dict) -> bool:
    """Given the refinements' report so far: did reconstruction change the rounding? (GPTQ then stays out.)"""
    return bool(done.get("reconstruction", {}).get("kept", False))


def _with_views(fp: nn.Module, images: torch.Tensor, blocks: Sequence[Bridge], budget: int, fisher: bool) -> torch.Tensor:
    """The images and as many of their views (``augmented``: mirrors, then shifts) as the captured
    tensors allow: every block's float input and output (and, with ``fisher``, its Fisher weights)
    are held for every image, and the block being fitted's quantized input too, which at 224 px and
    a few hundred images would take tens of GiB with all ten views."""
    ins, outs = capture(fp, images[:1], blocks, 1, outputs=True)
    size = lambda ts: [t.numel() * t.element_size() for t in ts]  # noqa: E731
    per_image = sum(size(ins.values())) + (2 if fisher else 1) * sum(size(outs.values())) + max(size(ins.values()))
    return augmented(images, max(1, min(VIEWS, budget // max(1, per_image * len(images)))))


class _LearnedRounding:
    """AdaRound's rounding variables for one layer's weight, installed in its weight quantizer."""

    def __init__(self, layer: nn.Module):
        self.layer, self.q = layer, layer.weight_quantizer
        spec = self.q.spec
        w = layer.weight.detach()
        self.s = broadcast_param(self.q.scale, w, spec.axis)
        self.z = broadcast_param(self.q.zero_point.float(), w, spec.axis)
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.floor = torch.floor(w / self.s)
        rest = (w / self.s - self.floor).clamp(0.0, 1.0 - 1e-6)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))
        self.hard: torch.Tensor | None = None  # the rounded weight, once ``harden`` decided it
        self.q.forward = self.soft  # for the reconstruction only

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def _weight(self, h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(self.floor + h + self.z, self.qmin, self.qmax) - self.z) * self.s

    def soft(self, w: torch.Tensor) -> torch.Tensor:
        return self._weight(self.h()) if self.hard is None else self.hard

    def harden(self) -> None:
        """From now on the layer sees the rounded weight (V ≥ 0 rounds up)."""
        self.hard = self._weight((self.v.detach() >= 0).float())

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def remove(self) -> None:
        del self.q.forward


class _Average:
    """An exponential moving average of ``params`` from the step it starts on (Polyak averaging: the
    average of an Adam trajectory's tail sits nearer the minimum than its last point)."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float, start: int):
        self.params, self.decay, self.start = list(params), decay, start
        self.values: list[torch.Tensor] = []

    def update(self, step: int) -> None:
        if not self.params or self.decay <= 0 or step < self.start:
            return
        with torch.no_grad():
            if step == self.start:
                self.values = [p.detach().clone() for p in self.params]
            else:
                for v, p in zip(self.values, self.params):
                    v.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    def apply(self) -> None:
        """The parameters take their averages (nothing where averaging never started)."""
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)


def _vectors(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The 1-D parameters of ``modules``, once each: norm affines, biases, layer scales (no quantizer
    reads them; quantized weights are matrices or kernels)."""
    seen, out = set(), []
    for b in modules:
        for p in b.parameters():
            if p.dim() == 1 and p.dtype.is_floating_point and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _weighted_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Σ weight·(out − target)² per output position (summed over channels), averaged over positions;
    ``weight`` None: the plain squared error."""
    channels = out.shape[1] if out.dim() == 4 else out.shape[-1]
    squared = (out - target).pow(2)
    return (squared if weight is None else weight * squared).sum() * channels / out.numel()


def reconstruct(model: nn.Module, layers: Sequence[str], images: torch.Tensor, config: ReconstructionConfig,
                bridges: Sequence[Bridge] = (), progress: Callable[[int, int], None] | None = None,
                map_shards: Callable[[Callable, list], list] | None = None) -> dict:
    """Learn the rounding of the quantized ``layers`` (execution order) block by block, in place.

    Every quantizer must be frozen ("quantize") and the weights still float. Weights of kept blocks
    end exactly on their grids (so export and checkpoints carry the learned rounding); learned
    activation scales are set. Returns a report: per block, its layers, output error before and
    after, kept or not, and seconds. ``map_shards`` (a worker pool's map): the Fisher diagonals are
    computed in shards on the workers (the same tensors); the learning runs here."""
    fp = float_copy(model)
    with torch.no_grad():
        blocks = reconstruction_blocks(fp, layers, images[:1], bridges)
    if not blocks:
        return {"blocks": [], "layers": [], "images": len(images)}
    if config.augment:
        images = _with_views(fp, images, blocks, config.capture_bytes, config.fisher)
    bs = config.batch_size
    float_in, float_out = capture(fp, images, blocks, bs, outputs=True)
    fisher = (output_fisher(fp, images, {b.name: b.modules(fp)[-1] for b in blocks}, bs, config.fisher_labels, config.seed, map_shards)
              if config.fisher else {})
    del fp
    generator = torch.Generator().manual_seed(config.seed)
    weight_quantizers = {m.weight_quantizer for m in model.modules() if isinstance(getattr(m, "weight_quantizer", None), TensorQuantizer)}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    total, done = len(blocks) * config.steps, 0
    report = []
    # each block's quantized input on the model as the blocks before it left it: the previous block
    # run again where it hands its output straight on, not a forward from the image per block
    quantized_inputs = BlockInputs(model, blocks, list(images.split(bs)), follows_previous(model, blocks, images[:1]))
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for i, b in enumerate(blocks):
            start = time.perf_counter()
            modules = b.modules(model)
            x_q = torch.cat(quantized_inputs.of(i))
            x_f, target = float_in[b.name], float_out[b.name]
            g2 = fisher.get(b.name)
            # no Fisher (or a vanishing one): the plain error, without a tensor of ones as large as the outputs
            weight = g2 / g2.mean() if g2 is not None and float(g2.mean()) > 0 else None

            def block(x: torch.Tensor) -> torch.Tensor:
                for m in modules:
                    x = m(x)
                return x

            def error() -> float:
                with torch.no_grad():
                    return sum(float(_weighted_error(block(x_q[i:i + bs]), target[i:i + bs], None if weight is None else weight[i:i + bs])) * len(x_q[i:i + bs])
                               for i in range(0, len(x_q), bs)) / len(x_q)

            before = error()
            quantized = [model.get_submodule(n) for n in b.layers]
            rounding = [_LearnedRounding(m) for m in quantized if m.weight_quantizer.mode == "quantize"]
            dropping = {"p": 0.0}
            steps_ = [LearnedStep(q, lambda: dropping["p"], generator) for m in modules for q in m.modules()
                      if type(q) is TensorQuantizer and q.mode == "quantize" and q not in weight_quantizers]
            # step sizes learned: those of the block's quantized layers (their input and output
            # quantizers); the others (attention products, SiLU gates) are only dropped
            owned = {q for m in quantized for q in m.modules() if q not in weight_quantizers}
            learned = [s for s in steps_ if s.q in owned] if config.scale_lr > 0 else []
            groups = [{"params": [r.v for r in rounding], "lr": config.lr}]
            if learned:
                groups.append({"params": [s.log_scale for s in learned], "lr": config.scale_lr})
            tuned = _vectors(modules) if config.float_lr > 0 else []
            saved_float = [p.detach().clone() for p in tuned]
            if tuned:
                groups.append({"params": tuned, "lr": config.float_lr})
                for p in tuned:
                    p.requires_grad_(True)
            optimizer = torch.optim.Adam(groups)
            warm = int(config.warmup * config.steps)
            average = _Average([s.log_scale for s in learned] + tuned, config.average, config.steps // 2)
            try:
                dropping["p"] = config.drop_prob
                for step in range(config.steps):
                    idx = torch.randperm(len(x_q), generator=generator)[:bs]
                    x = x_q[idx]
                    if config.drop_prob > 0:
                        x = torch.where(torch.rand(x.shape, generator=generator) < config.drop_prob, x_f[idx], x)
                    with torch.enable_grad():
                        loss = _weighted_error(block(x), target[idx], None if weight is None else weight[idx])
                        if step >= warm and rounding:
                            progress_ = (step - warm) / max(1, config.steps - warm)
                            beta = config.beta_end + (config.beta_start - config.beta_end) * (1.0 - progress_)
                            loss = loss + config.round_weight * sum(r.regulariser(beta) for r in rounding)
                        optimizer.zero_grad()
                        loss.backward()
                    optimizer.step()
                    average.update(step)
                    done += 1
                    if progress:
                        progress(done, total)
                dropping["p"] = 0.0
                average.apply()
                for r in rounding:
                    r.harden()
                after = error()
            finally:
                dropping["p"] = 0.0
                for r in rounding:
                    r.remove()
                for s in steps_:
                    s.remove()
                for p in tuned:
                    p.requires_grad_(False)
            kept = after < before
            if not kept:
                with torch.no_grad():
                    for p, v in zip(tuned, saved_float):
                        p.copy_(v)
            if kept:
                with torch.no_grad():
                    for r in rounding:
                        r.layer.weight.copy_(r.hard)
                for s in learned:
                    s.apply()
            report.append({"block": b.name, "layers": list(b.layers), "error_before": before, "error_after": after,
                           "kept": kept, "seconds": round(time.perf_counter() - start, 2)})
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    return {"blocks": report, "layers": [n for r in report if r["kept"] for n in r["layers"]],
            "steps_per_block": config.steps, "drop_prob": config.drop_prob, "fisher_weighted": config.fisher,
            "average": config.average,
            "images": len(images)}  # with config.augment: the calibration images and their views
