"""Dataflow probes: one forward pass with temporary hooks (how fold, bridge and SmoothQuant
pairing find which module feeds which, without relying on module names)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def forward_with_hooks(model: nn.Module, example: torch.Tensor, hooks: Iterable[RemovableHandle]) -> None:
    """Run ``model(example)`` without gradients, then remove ``hooks`` whatever happens."""
    hooks = list(hooks)
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
