"""Which layers are quantized: a placement policy, per model family, kept as data.

"partial" (the default): Linear and Conv2d weights and their input activations; LayerNorm,
GroupNorm, Softmax, GELU and residual adds stay float. "partial+matmul" also quantizes the
attention products of timm's Attention blocks.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass

from torch import nn

from ..errors import VitcompressError
from .modules import is_wrappable_attention, is_wrappable_weighted


@dataclass(frozen=True)
class Placement:
    name: str
    weighted: bool = True  # Linear / Conv2d
    attention_matmuls: bool = False
    skip: tuple[str, ...] = ()  # module-name patterns kept float


PLACEMENTS: dict[str, Placement] = {
    "partial": Placement("partial"),
    "partial+matmul": Placement("partial+matmul", attention_matmuls=True),
}

# Per-family adjustments (module-name patterns kept float). Empty today: the partial policy
# already keeps the sensitive ops float for every supported family.
FAMILY_SKIP: dict[str, tuple[str, ...]] = {}


def get_placement(name: str) -> Placement:
    try:
        return PLACEMENTS[name]
    except KeyError:
        raise VitcompressError(f"unknown placement '{name}' (choose from {', '.join(PLACEMENTS)})") from None


@dataclass
class PlacementPlan:
    weighted: list[str]
    attention: list[str]
    float_modules: dict[str, int]  # op type -> count of modules left float
    skipped: list[str]  # weighted modules kept float by a skip pattern or unsupported subclass


# Module types whose computation stays float under a partial policy, reported by type name.
_FLOAT_KINDS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.GELU, nn.SiLU, nn.Softmax, nn.Hardswish)


def plan(model: nn.Module, placement: Placement, extra_skip: tuple[str, ...] = (), family: str = "") -> PlacementPlan:
    skip = placement.skip + FAMILY_SKIP.get(family, ()) + tuple(extra_skip)
    weighted, attention, skipped = [], [], []
    float_counts: Counter[str] = Counter()
    for name, m in model.named_modules():
        skipped_by_pattern = any(fnmatch.fnmatch(name, p) for p in skip)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if placement.weighted and is_wrappable_weighted(m) and not skipped_by_pattern:
                weighted.append(name)
            else:
                skipped.append(name)
                float_counts[type(m).__name__] += 1
        elif placement.attention_matmuls and is_wrappable_attention(m) and not skipped_by_pattern:
            attention.append(name)
        elif isinstance(m, _FLOAT_KINDS):
            float_counts[type(m).__name__] += 1
    if not weighted and not attention:
        raise VitcompressError("the placement selects no layer to quantize in this model")
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        float_counts["MultiheadAttention"] += 1
    return PlacementPlan(weighted, attention, dict(float_counts), skipped)
