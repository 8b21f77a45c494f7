"""LPViT: hardware-aware block pruning with rate-distortion allocation across layers.

The mechanism (LPViT, ECCV 2024), step by step as implemented here:

1. **Importance from a label-free loss.** ``L = E‖f(x)‖²`` (mean over calibration images of the
   squared logits) is back-propagated over the calibration set; ``g`` is the accumulated gradient
   of every pruned weight. A block's score is ``mean |W ⊙ g|`` over its entries; inside a layer
   blocks are removed lowest score first.
2. **Distortion curves.** For each layer and each sparsity level ``a`` (``levels`` points, 101 by
   default, fewer when the layer has fewer blocks), with ``ΔW = −W`` on the removed blocks,
   ``D(a) = Σ (ΔW ⊙ g)² + ½ [(gᵀΔW)² + ε ‖ΔW‖²]`` — the second-order Taylor expansion of the
   label-free loss with an empirical-Fisher (rank-one plus diagonal) curvature and a damping ε.
3. **Hardware-aware term.** ``P(a)`` models the power/latency of the surviving blocks: blocks
   kept × the weights each streams (rows × input width). The layer objective is ``D + β·P``; β is
   set automatically so that the two terms have the same total slope over all layers
   (``β = Σ ΔD / Σ ΔP`` between no pruning and maximal pruning).
4. **Allocation.** Every layer takes the sparsity where the slope of its objective curve over the
   sparsity axis equals a common λ (the point a line of slope λ touches from below, i.e. on the
   curve's lower convex hull); λ is found by binary search so
   the model meets the budget (multiply-accumulates per image). A per-layer floor keeps at least
   ``min_keep`` of each layer's blocks.

Block shapes: ``"unit"`` blocks are whole structural units (attention heads = their qkv rows and
proj columns; MLP hidden units = an fc1 row and an fc2 column), which :mod:`.structure` removes
physically for a real dense speedup. ``"tile"`` blocks are ``bh × bw`` tiles of every block
Linear, zeroed in place: *sparse, no dense speedup* (only a block-sparse kernel would gain).

Simplifications (also in docs/lpvit.md): one gradient pass over the calibration images instead
of the paper's ~2000; the slope condition is solved on the curve's lower convex hull (minimise
``D + βP − λ·a``) instead of matching a smoothed 5-point finite-difference slope, which makes the
chosen sparsity monotone in λ; sums (not means) of the Taylor terms, so layers of different
sizes share one scale; ε is relative (``damping × mean g²``); no fine-tuning inside the method
(recovery is a separate, optional distillation step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import VitcompressError
from .structure import PrunableModule, find_prunable, keep_units, module_tokens, unit_slices

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class LPViTConfig:
    """Knobs of the method; defaults follow the paper where it states them."""

    block: str = "unit"  # "unit" (heads / MLP hidden units, removed physically) or "tile"
    tile: tuple[int, int] = (16, 16)  # tile shape (rows, cols) for block="tile"
    levels: int = 101  # points per distortion curve
    min_keep: float = 0.05  # per-layer floor: fraction of blocks always kept (at least one)
    damping: float = 1e-2  # ε = damping × mean(g²)
    hardware_aware: bool = True  # add β·P to the distortion

    def __post_init__(self) -> None:
        if self.block not in ("unit", "tile"):
            raise VitcompressError(f"block shape must be 'unit' or 'tile', got {self.block!r}")
        if len(self.tile) != 2 or min(self.tile) < 1:
            raise VitcompressError(f"tile shape must be two positive ints, got {self.tile}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise VitcompressError(f"min_keep must be within [0, 1], got {self.min_keep}")
        if self.levels < 2:
            raise VitcompressError(f"levels must be >= 2, got {self.levels}")


@dataclass
class LayerBlocks:
    """Per-block statistics of one prunable layer (a module of units, or one tiled Linear)."""

    name: str
    score: np.ndarray  # mean |W ⊙ g| per block
    sq: np.ndarray  # Σ (W ⊙ g)² per block
    lin: np.ndarray  # Σ W ⊙ g per block
    norm: np.ndarray  # Σ W² per block
    macs: np.ndarray  # multiply-accumulates per image of each block
    power: np.ndarray  # weights each block streams (the hardware term's unit)
    min_keep: int

    @property
    def n(self) -> int:
        return len(self.score)


@dataclass
class Curve:
    """A layer's distortion / cost over its candidate numbers of removed blocks."""

    name: str
    order: np.ndarray  # block indices, least important first
    removed: np.ndarray  # candidate counts of removed blocks (increasing)
    distortion: np.ndarray
    power: np.ndarray
    macs: np.ndarray  # MACs of the blocks kept at each candidate


@dataclass
class Plan:
    """Blocks to keep per layer, with the numbers behind the choice."""

    keep: dict[str, list[int]]
    macs: int  # predicted MACs per image of the prunable layers after pruning
    dense_macs: int
    info: dict = field(default_factory=dict)


def label_free_gradients(model: nn.Module, batches: Iterable[torch.Tensor], params: dict[str, nn.Parameter],
                         progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    """Accumulated gradient of E‖f(x)‖² w.r.t. the given parameters (the model is not changed)."""
    batches = list(batches)
    if not batches:
        raise VitcompressError("no calibration images for the pruning scores")
    wanted = {id(p) for p in params.values()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    was_training = model.training
    model.eval()
    total = sum(len(b) for b in batches)
    try:
        for i, x in enumerate(batches):
            out = model(x)
            loss = out.float().pow(2).sum() / total
            loss.backward()
            if progress:
                progress(i + 1, len(batches))
        grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
        model.train(was_training)
    return grads


def _unit_layers(model: nn.Module, grads: dict[str, torch.Tensor], modules: list[PrunableModule],
                 min_keep: float) -> list[LayerBlocks]:
    layers = []
    for pm in modules:
        if pm.units == 0:
            continue
        slices = unit_slices(model, pm)
        stats = {k: np.zeros(pm.units) for k in ("abs", "count", "sq", "lin", "norm", "power")}
        for sl in slices:
            w = sl.param.detach()
            g = grads[_param_name(model, sl.param)]
            wg = (w * g).movedim(sl.axis, 0)
            w0 = w.movedim(sl.axis, 0)
            for u in range(pm.units):
                idx = sl.indices([u])
                blk, wb = wg[idx], w0[idx]
                stats["abs"][u] += float(blk.abs().sum())
                stats["count"][u] += blk.numel()
                stats["sq"][u] += float(blk.pow(2).sum())
                stats["lin"][u] += float(blk.sum())
                stats["norm"][u] += float(wb.pow(2).sum())
                if sl.param.dim() == 2:
                    stats["power"][u] += blk.numel()
        layers.append(LayerBlocks(
            pm.name, stats["abs"] / np.maximum(stats["count"], 1), stats["sq"], stats["lin"], stats["norm"],
            np.full(pm.units, float(pm.macs_per_unit)), stats["power"], _floor(pm.units, min_keep)))
    return layers


def _floor(n: int, min_keep: float) -> int:
    return min(n, max(1, math.ceil(min_keep * n)))


def _param_name(model: nn.Module, param: nn.Parameter) -> str:
    for n, p in model.named_parameters():
        if p is param:
            return n
    raise KeyError("parameter not in model")


def tile_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of the prunable modules: what tile sparsity applies to."""
    out = {}
    for pm in find_prunable(model):
        if pm.units == 0:
            continue
        for name, m in model.get_submodule(pm.name).named_children():
            if isinstance(m, nn.Linear):
                out[f"{pm.name}.{name}"] = m
    return out


def _tiles(t: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) -> (n_tiles, bh*bw), zero-padded at the edges."""
    bh, bw = tile
    r, c = t.shape
    pr, pc = (-r) % bh, (-c) % bw
    t = nn.functional.pad(t, (0, pc, 0, pr))
    return t.reshape((r + pr) // bh, bh, (c + pc) // bw, bw).permute(0, 2, 1, 3).reshape(-1, bh * bw)


def tile_mask(shape: tuple[int, int], tile: tuple[int, int], keep: Iterable[int]) -> torch.Tensor:
    """Boolean mask of a weight with only the kept tiles set."""
    bh, bw = tile
    nr, nc = math.ceil(shape[0] / bh), math.ceil(shape[1] / bw)
    flat = torch.zeros(nr * nc, dtype=torch.bool)
    flat[list(keep)] = True
    return flat.reshape(nr, nc).repeat_interleave(bh, 0).repeat_interleave(bw, 1)[: shape[0], : shape[1]]


def _tile_layers(model: nn.Module, grads: dict[str, torch.Tensor], tile: tuple[int, int], min_keep: float) -> list[LayerBlocks]:
    layers = []
    seen = module_tokens(model)
    for name, lin in tile_linears(model).items():
        tokens = seen.get(name.rpartition(".")[0], (0, 0))[0]  # those of its attention / MLP module
        w = lin.weight.detach()
        g = grads[f"{name}.weight"]
        wg, wt = _tiles(w * g, tile), _tiles(w, tile)
        count = _tiles(torch.ones_like(w), tile).sum(1).numpy()
        layers.append(LayerBlocks(
            name, wg.abs().sum(1).numpy() / np.maximum(count, 1), wg.pow(2).sum(1).numpy(), wg.sum(1).numpy(),
            wt.pow(2).sum(1).numpy(), count * tokens, count.astype(float), _floor(len(count), min_keep)))
    return layers


def distortion_curve(layer: LayerBlocks, levels: int, eps: float) -> Curve:
    """D(a) = Σ(ΔW⊙g)² + ½[(gᵀΔW)² + ε‖ΔW‖²] for the lowest-score blocks removed, at each level."""
    order = np.argsort(layer.score, kind="stable")
    top = layer.n - layer.min_keep
    removed = np.unique(np.round(np.linspace(0, 1, min(levels, layer.n + 1)) * layer.n).astype(int))
    removed = removed[removed <= top]
    cs = lambda v: np.concatenate([[0.0], np.cumsum(v[order])])  # noqa: E731
    sq, lin, norm, power, macs = cs(layer.sq), cs(layer.lin), cs(layer.norm), cs(layer.power), cs(layer.macs)
    dist = sq[removed] + 0.5 * (lin[removed] ** 2 + eps * norm[removed])
    return Curve(layer.name, order, removed, dist, power[-1] - power[removed], macs[-1] - macs[removed])


def _objective(curve: Curve, beta: float) -> np.ndarray:
    return curve.distortion + beta * curve.power


class LPViTPruner:
    """Scores and curves are computed once; :meth:`plan` allocates for any budget."""

    def __init__(self, model: nn.Module, batches: Iterable[torch.Tensor], config: LPViTConfig = LPViTConfig(),
                 progress: ProgressFn | None = None) -> None:
        self.config = config
        modules = find_prunable(model)
        if config.block == "unit":
            params = {}
            for pm in modules:
                for sl in unit_slices(model, pm):
                    params[_param_name(model, sl.param)] = sl.param
        else:
            params = {f"{n}.weight": m.weight for n, m in tile_linears(model).items()}
        grads = label_free_gradients(model, batches, params, progress)
        g2 = torch.cat([g.flatten() for g in grads.values()]).pow(2).mean().item()
        eps = config.damping * g2
        if config.block == "unit":
            self.layers = _unit_layers(model, grads, modules, config.min_keep)
        else:
            self.layers = _tile_layers(model, grads, config.tile, config.min_keep)
        if not self.layers:
            raise VitcompressError("nothing left to prune: every prunable module is already empty")
        self.curves = [distortion_curve(layer, config.levels, eps) for layer in self.layers]
        self.dense_macs = int(sum(c.macs[0] for c in self.curves))
        self.beta = self._balance() if config.hardware_aware else 0.0
        self.objective = [_objective(c, self.beta) for c in self.curves]
        self.x = [c.removed / layer.n for c, layer in zip(self.curves, self.layers)]

    def _balance(self) -> float:
        """β equalising the total slopes of distortion and hardware cost (paper: automatic β)."""
        d = sum(c.distortion[-1] - c.distortion[0] for c in self.curves)
        p = sum(c.power[0] - c.power[-1] for c in self.curves)
        return float(d / p) if p > 0 and d > 0 else 0.0

    @property
    def min_macs(self) -> int:
        """MACs of the prunable layers with every layer at its floor."""
        return int(sum(c.macs[-1] for c in self.curves))

    def _choose(self, lam: float) -> list[int]:
        """Per layer, the point where a line of slope λ touches the curve from below: where the
        curve's slope (on its lower convex hull) equals λ. Monotone in λ, so bisection is exact."""
        return [int(np.argmin(y - lam * x)) for y, x in zip(self.objective, self.x)]

    def _fill(self, picks: list[int], looser: list[int], budget_macs: float, cost: Callable[[list[int]], float]) -> list[int]:
        """Give back blocks, while the budget holds, to the layers that λ's last step pruned further
        than the step before it (``looser``): layers whose curves turn at the same slope (tied
        scores: untrained weights, identical layers) switch together, and that step can land far
        under the budget. Layers that regain the most objective per MAC given back go first; each
        takes the fewest removed blocks that still fit. Ours, not the paper's."""
        picks = list(picks)

        def gain(i: int) -> float:  # objective recovered per MAC given back, moving layer i to ``looser``
            y, macs = self.objective[i], self.curves[i].macs
            return (y[picks[i]] - y[looser[i]]) / max(1, macs[looser[i]] - macs[picks[i]])

        for i in sorted((i for i in range(len(picks)) if looser[i] < picks[i]), key=gain, reverse=True):
            for j in range(looser[i], picks[i]):  # fewest removed first
                if cost(picks[:i] + [j] + picks[i + 1:]) <= budget_macs:
                    picks[i] = j
                    break
        return picks

    def plan(self, budget_macs: float) -> Plan:
        """Keep-lists meeting ``budget_macs`` (MACs of the prunable layers) by bisection on λ, then
        filled up to the budget (``_fill``)."""
        if budget_macs < self.min_macs:
            raise VitcompressError(
                f"budget {budget_macs:.3g} MACs is below the floor of {self.min_macs:.3g} (min_keep {self.config.min_keep})")
        cost = lambda picks: sum(c.macs[i] for c, i in zip(self.curves, picks))  # noqa: E731
        span = max(float(np.ptp(y)) * max(len(y), 2) for y in self.objective) + 1.0
        lo, hi = -span, span  # beyond every chord slope: no pruning at lo, floors at hi
        if cost(self._choose(lo)) <= budget_macs:
            hi = lo
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if cost(self._choose(mid)) <= budget_macs:
                hi = mid
            else:
                lo = mid
        picks = self._choose(hi)
        if cost(picks) > budget_macs:  # non-convex curves: fall back to the floors
            picks = [len(c.removed) - 1 for c in self.curves]
        picks = self._fill(picks, self._choose(lo), budget_macs, cost)
        keep = {c.name: sorted(int(b) for b in c.order[c.removed[i]:]) for c, i in zip(self.curves, picks)}
        return Plan(keep, int(cost(picks)), self.dense_macs,
                    {"lambda": hi, "beta": self.beta,
                     "sparsity": {c.name: float(c.removed[i] / layer.n) for c, i, layer in zip(self.curves, picks, self.layers)}})


def apply_plan(model: nn.Module, plan: Plan, block: str = "unit", tile: tuple[int, int] = (16, 16)) -> None:
    """Carry out a plan in place: remove units physically, or zero the dropped tiles."""
    if block == "unit":
        by_name = {pm.name: pm for pm in find_prunable(model)}
        for name, keep in plan.keep.items():
            keep_units(model, by_name[name], keep)
        return
    linears = tile_linears(model)
    with torch.no_grad():
        for name, keep in plan.keep.items():
            w = linears[name].weight
            w.mul_(tile_mask(tuple(w.shape), tile, keep).to(w.dtype))
