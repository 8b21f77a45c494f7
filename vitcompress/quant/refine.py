"""Refinements after a method's own search, each kept only if it helps: one rule for every method.

A refinement (GPTQ weight rounding, bias correction, activation-scale tuning...) changes some
tensors of the quantized layers. It is run, judged by a score (lower is better: the whole model's
KL to the float model on calibration images, unless the refinement brings its own judgement), and
undone when the score did not drop. Methods list their refinements as data (``Refinement``) and
call ``apply_refinements``; a recipe switches each one on or off through the method's options, so
an ablation row is a recipe with one option changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

RunFn = Callable[[nn.Module, Sequence[str], Sequence[torch.Tensor]], list]


@dataclass
class Refinement:
    """One refinement: ``run(model, layer names, batches)`` returns what it changed; ``changes(layer)``
    lists the tensors of a layer it may change (saved before, restored if it is not kept)."""
    name: str
    enabled: Callable[[dict], bool]  # given the report of the refinements before it
    run: RunFn
    changes: Callable[[nn.Module], list[torch.Tensor]]
    judgement: Callable[[], tuple[float, float]] | None = None  # (before, after) of its own; None: the score
    judged_on: str = "calibration images"
    model_changes: Callable[[nn.Module], list[torch.Tensor]] | None = None  # tensors outside the layers it may change (norm affines)


def apply_refinements(model: nn.Module, layers: Sequence[str], batches: Sequence[torch.Tensor], steps: Sequence[Refinement],
                      score: Callable[[], float], start: float, on_kept: Callable[[float], None] | None = None) -> dict[str, dict]:
    """Run each enabled refinement in order; keep it only if the score drops. ``start`` is the score
    before the first; the report gives, per refinement, layers changed, score before/after, kept."""
    modules = [model.get_submodule(n) for n in layers]
    current = start
    report: dict[str, dict] = {}
    for step in steps:
        if not step.enabled(report):
            continue
        saved = [(m, [t.detach().clone() for t in step.changes(m)]) for m in modules]
        outside = step.model_changes(model) if step.model_changes else []
        saved_outside = [t.detach().clone() for t in outside]
        changed = step.run(model, layers, batches)
        after_score = score()
        before, after = step.judgement() if step.judgement else (current, after_score)
        kept = after < before
        if kept:
            current = after_score
            if on_kept is not None:
                on_kept(after_score)
        else:
            with torch.no_grad():
                for m, values in saved:
                    for tensor, value in zip(step.changes(m), values):
                        tensor.copy_(value)
                for tensor, value in zip(outside, saved_outside):
                    tensor.copy_(value)
        report[step.name] = {"layers": len(changed), "calibration_kl": after_score, "kept": kept,
                             "judged_on": step.judged_on, "kl_before": before, "kl_after": after}
    return report
