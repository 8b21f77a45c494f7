"""Baseline: uniform magnitude pruning of heads and MLP hidden units.

Every prunable module keeps the same fraction of its units; inside a module the units with the
smallest L1 norm of their weights (qkv rows + proj columns of a head, fc1 row + fc2 column of an
MLP unit) go first. No gradients, no allocation across layers: the plain method LPViT is compared
against at the same measured speed.
"""
from __future__ import annotations

import math

import numpy as np
from torch import nn

from ..errors import VitcompressError
from .lpvit import Plan
from .structure import find_prunable, unit_slices


class MagnitudePruner:
    """Uniform per-module sparsity, units ranked by weight magnitude; :meth:`plan` for any budget."""

    def __init__(self, model: nn.Module, min_keep: float = 0.05) -> None:
        self.modules = [pm for pm in find_prunable(model) if pm.units > 0]
        if not self.modules:
            raise VitcompressError("nothing left to prune: every prunable module is already empty")
        self.min_keep = min_keep
        self.order: dict[str, np.ndarray] = {}
        for pm in self.modules:
            norms = np.zeros(pm.units)
            for sl in unit_slices(model, pm):
                w = sl.param.detach().movedim(sl.axis, 0)
                for u in range(pm.units):
                    norms[u] += float(w[sl.indices([u])].abs().sum())
            self.order[pm.name] = np.argsort(-norms, kind="stable")  # most important first
        self.dense_macs = sum(pm.units * pm.macs_per_unit for pm in self.modules)

    def _keep_counts(self, fraction: float) -> dict[str, int]:
        return {pm.name: min(pm.units, max(1, math.ceil(self.min_keep * pm.units), round(fraction * pm.units)))
                for pm in self.modules}

    def _macs(self, counts: dict[str, int]) -> int:
        return sum(counts[pm.name] * pm.macs_per_unit for pm in self.modules)

    @property
    def min_macs(self) -> int:
        return self._macs(self._keep_counts(0.0))

    def plan(self, budget_macs: float) -> Plan:
        """The largest uniform keep fraction whose MACs fit the budget (bisection)."""
        if budget_macs < self.min_macs:
            raise VitcompressError(f"budget {budget_macs:.3g} MACs is below the floor of {self.min_macs:.3g}")
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if self._macs(self._keep_counts(mid)) <= budget_macs:
                lo = mid
            else:
                hi = mid
        counts = self._keep_counts(lo)
        keep = {name: sorted(int(u) for u in self.order[name][:k]) for name, k in counts.items()}
        return Plan(keep, self._macs(counts), self.dense_macs, {"keep_fraction": lo})
