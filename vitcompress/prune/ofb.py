"""OFB: one search for both unit importance and per-layer width (Once for Both, CVPR 2024).

The mechanism, as implemented here (post-training: distillation from the float model on unlabelled
images replaces the paper's labelled training; see docs/ofb.md):

- **Search space.** Per transformer block, the number of attention heads (every count from 1) and
  the MLP hidden width (¼…1 of it in ⅛ steps); the residual (embedding) width shared by all blocks
  (½…1 of it in steps of ``min(E // 32, 12)`` channels). Each is a :class:`WidthGroup`.
- **Bi-mask.** A group holds a learned importance score ``s`` per unit and a learned distribution
  ``p = softmax(α)`` over its candidate widths. ``M`` mixes the candidates' prefix masks (the top
  ``k`` units by score are on), so a unit ranked ``r`` gets ``Σ_k p_k [r < k]``. The mask is
  ``m = w·σ(s) + (1 − w)·M``; ``w`` falls linearly from 0.99 to 0.1 over the warm-up, then holds.
- **Losses.** Distillation (KL at a temperature) from the float model's logits, plus per group the
  adaptive one-hot loss ``H(p) + tan(π/2 − π·σ̂²)/n`` (``σ̂²`` the variance of ``p`` normalised
  so a one-hot ``p`` gives 1, ``n`` the candidates still alive; off during the warm-up, then ramped
  in) and an L1 term on ``σ(s)``, plus the FLOPs loss ``λ·((F − F_target) / F_dense)²`` on the
  expected multiply-accumulates (λ = 300 against the paper's 5: distillation losses are far smaller
  than cross-entropy; docs/ofb.md has the trials).
- **Progressive pruning.** Every ``prune_every`` steps after the warm-up (every twentieth of a
  shorter search), candidates with ``p ≤ 0.2 / n`` are dropped for good; a group with one candidate
  left is decided, and from then on its units outside the chosen width are off (the paper cuts
  them physically at that point). Ours: a continuation toward a tighter target can re-open every
  group below its choice (:meth:`OFBSearch.reopen`).
- **Folding and removal.** At the end each group keeps its chosen width (:meth:`WidthGroup.choice`:
  the decided candidate, or for a search cut short the one nearest the expected width); the kept
  units' mask values are folded into the weights (:meth:`OFBSearch.slim`) and everything else is
  removed physically, which leaves a smaller dense timm model with exactly the function of the
  masked model at its final masks.
- **PMIM (optional).** SimMIM-style masked patches (mask ratio rising 5% → 25% over the warm-up)
  and a 1×1-conv + pixel-shuffle decoder reconstructing the pixels of the masked patches (L1 on
  per-patch normalised targets), weighted adaptively by ``task / decoder`` (detached).

Where the mask acts (ours, chosen so that removal is exact): heads multiply their q, k and v (as
the paper) and fold into the qkv rows; MLP units multiply fc1's output (as the paper) and fold into
fc1's rows; the embedding mask acts where the residual stream is *read*: the LayerNorms feeding
every branch and the head compute their statistics with the candidate part ``M`` as channel
weights and scale their output by ``m`` (folded into their affine parameters). The paper masks the
stream at its input only and cuts channels while it keeps training for many epochs; a short
post-training search needs a removal that changes nothing. Not searched: per-head qkv widths (timm's
Attention has one head width; finer head counts stand in). Weights are trained during the search,
as in the paper.
"""
from __future__ import annotations

import copy
import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitcompressError
from .recover import RecoverConfig, _augment
from .structure import (EMBED_KEY, embed_unsupported, find_prunable, unit_macs, keep_embed_channels, keep_units,
                        residual_readers, set_submodule, token_count)

InfoProgressFn = Callable[[int, int, str], None]  # (step, steps, one-line state)
PLAN_AFTER_STEPS = 3  # steps timed before a search with a time budget fits its schedule to it
REPLAN_AFTER_STEPS = 20  # ...and fits it again on the steps since (the first steps run slower), still early in the warm-up
DROP_CHECKS = 20  # a short search checks for dying candidates at least this often (every prune_every steps otherwise)


def _drop_every(prune_every: int, planned_steps: int) -> int:
    """Steps between progressive-pruning checks: ``prune_every``, or less in a short search (a
    60-step search with checks every 50 would decide its widths in one go)."""
    return max(1, min(prune_every, planned_steps // DROP_CHECKS))


def _fitted_plan(done: int, elapsed: float, timed_from: tuple[int, float], max_seconds: float, steps: int) -> int:
    """The steps a search with a time budget plans for, after ``done`` steps in ``elapsed`` seconds:
    the seconds left at the pace of the steps since ``timed_from`` (step, seconds), at most ``steps``.
    The refit times only the steps after the first fit: the first steps (allocations, caches) are
    slower, and a plan timed on them alone ended a 15-minute search after 756 s."""
    since, at = timed_from
    per_step = (elapsed - at) / (done - since)
    return max(done + 1, min(steps, done + int((max_seconds - elapsed) / per_step)))


def _warmup_shares(i: int, planned_steps: int, warmup: float) -> tuple[float, float]:
    """At step ``i`` of a fresh search: (share of the warm-up done, share of the one-hot ramp done).
    The warm-up is the first ``warmup`` share of the planned steps; the ramp as many steps after it."""
    span = warmup * planned_steps
    return min(1.0, i / max(1.0, span)), min(1.0, max(0.0, (i - span) / span))


@dataclass(frozen=True)
class OFBConfig:
    """Knobs of the search; the paper's values unless the docstring of the field says otherwise."""

    steps: int = 2000  # search steps (the paper: 100 ImageNet epochs; post-training here)
    max_seconds: float | None = None  # stop earlier on a time budget (the step count then depends on the machine)
    batch_size: int = 64
    lr: float = 5e-4  # weights and importance scores (AdamW)
    arch_lr: float = 5e-2  # candidate distributions α (AdamW, betas 0.5/0.999 as the paper; larger lr: 2,000 steps, not 100 epochs)
    weight_decay: float = 1e-3
    temperature: float = 2.0  # distillation temperature
    warmup: float = 0.2  # share of the steps over which w falls from w_start to w_end
    w_start: float = 0.99
    w_end: float = 0.1
    prune_every: int = 50  # steps between progressive-pruning checks
    prune_threshold: float = 0.2  # a candidate dies when p <= prune_threshold / (candidates alive)
    flops_weight: float = 300.0  # the paper: 5 with ImageNet cross-entropy; distillation losses are ~100x smaller (docs/ofb.md)
    group_weight: float = 0.5  # weight of each group kind's one-hot + L1 loss
    l1_heads: float = 4e-4
    l1_units: float = 1e-4  # MLP units and embedding channels
    search_heads: bool = True
    search_mlp: bool = True
    search_embed: bool = True
    train_weights: bool = True
    pmim: bool = False
    pmim_ratio: tuple[float, float] = (0.05, 0.25)  # masked share of patches, start and end of the warm-up
    pad: int = 4  # augmentation shift in pixels (as recovery)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.prune_every < 1:
            raise VitcompressError("OFB search needs steps, batch size and prune interval >= 1")
        if not (0.0 <= self.w_end <= self.w_start <= 1.0) or not 0.0 < self.warmup <= 1.0:
            raise VitcompressError("OFB mixing weights need 0 <= w_end <= w_start <= 1 and a warm-up share in (0, 1]")
        if not (self.search_heads or self.search_mlp or self.search_embed):
            raise VitcompressError("OFB needs at least one of heads, MLP width or embedding width to search")


class WidthGroup(nn.Module):
    """One searched width: units with importance scores and a distribution over candidate widths."""

    def __init__(self, kind: str, name: str, units: int, widths: list[int], gen: torch.Generator,
                 score_init: float = 3.0) -> None:
        super().__init__()
        self.kind, self.name, self.units = kind, name, units
        self.register_buffer("widths", torch.tensor(sorted(set(widths)), dtype=torch.float32))
        self.register_buffer("alive", torch.ones(len(self.widths), dtype=torch.bool))
        # units ranked at or past the ceiling are off whatever the candidates say: set when a decided
        # group is re-opened below its choice (:meth:`reopen`), whose cut units must stay cut
        self.register_buffer("ceiling", torch.tensor(float(units)))
        # σ(s) ≈ 0.95 at the start (the paper: s ~ N(0, 0.2), σ ≈ 0.5, which halves every unit of a
        # trained model at w = 0.99; a short post-training search cannot afford that detour)
        self.score = nn.Parameter(score_init + torch.randn(units, generator=gen) * 0.2)
        # uniform start (the paper: uniform random): a random favourite would win the one-hot collapse
        self.alpha = nn.Parameter(torch.zeros(len(self.widths)))

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.alpha.masked_fill(~self.alive, float("-inf")), 0)

    def rank(self) -> torch.Tensor:
        """Each unit's rank by importance (0 = most important); ties keep unit order."""
        order = torch.argsort(-self.score.detach(), stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(self.units)
        return rank

    def candidate_mask(self, hard: bool = False) -> torch.Tensor:
        """M: the candidates' prefix masks mixed by p (``hard``: the chosen width's prefix only)."""
        on = (self.rank()[:, None] < self.widths[None, :]).to(self.score.dtype)  # units × candidates
        if hard:
            return on[:, self.choice()]
        return on @ self.probs()

    def mask(self, w: float, hard: bool = False) -> torch.Tensor:
        """m = w·σ(s) + (1 − w)·M; ``hard``, or once the group is decided: zero outside the chosen
        width (what removal leaves; the paper cuts a decided module's units at once, too)."""
        hard = hard or self.decided()
        cand = self.candidate_mask(hard)
        m = w * torch.sigmoid(self.score) + (1 - w) * cand
        if hard:
            return m * cand
        if self.ceiling < self.units:
            return m * (self.rank() < self.ceiling).to(m.dtype)
        return m

    def expected_width(self) -> torch.Tensor:
        return (self.probs() * self.widths).sum()

    def choice(self) -> int:
        """The candidate kept: the decided one; before p is one-hot (a search cut short), the
        surviving candidate nearest the expected width, which the FLOPs loss steers toward the target
        (ours: the paper keeps the most probable, the same candidate once p is one-hot)."""
        gap = (self.widths - self.expected_width().detach()).abs().masked_fill(~self.alive, float("inf"))
        return int(torch.argmin(gap))  # a tie keeps the narrower

    def decided(self) -> bool:
        return int(self.alive.sum()) == 1

    def entropy(self) -> torch.Tensor:
        p = self.probs()[self.alive]
        return -(p * p.clamp_min(1e-12).log()).sum()

    def onehot_loss(self) -> torch.Tensor:
        """Entropy plus the adaptive variance term tan(π/2 − π·σ̂²)/n (σ̂² = 1 for a one-hot p)."""
        n = int(self.alive.sum())
        if n <= 1:
            return self.score.new_zeros(())
        p = self.probs()[self.alive]
        var = ((p - p.mean()) ** 2).sum() / (1 - 1 / n)
        var = var.clamp(1e-3, 1 - 1e-3)  # tan's poles: +inf at uniform, -inf at one-hot
        return self.entropy() + torch.tan(math.pi / 2 - math.pi * var) / n

    @torch.no_grad()
    def drop(self, threshold: float) -> int:
        """Kill the candidates with p <= threshold / n for good; how many died."""
        n = int(self.alive.sum())
        if n <= 1:
            return 0
        p = self.probs()
        dead = self.alive & (p <= threshold / n)
        if int(dead.sum()) >= n:  # never all: the most probable survives
            dead[torch.argmax(p)] = False
        self.alive &= ~dead
        self.alpha[~self.alive] = 0.0
        return int(dead.sum())

    @torch.no_grad()
    def reopen(self) -> bool:
        """Bring back the candidates at or below the chosen width, with a uniform distribution as
        at the start, so that a continued search can cut further. Wider candidates stay dead and
        the units past the choice stay off. True when anything was re-opened."""
        chosen = self.widths[self.choice()]
        alive = self.widths <= chosen
        if int(alive.sum()) <= 1:
            return False
        self.alive.copy_(alive)
        self.ceiling.fill_(float(chosen))
        self.alpha.zero_()
        return True

    def final(self, w: float) -> tuple[list[int], torch.Tensor]:
        """The units of the chosen width (index order) and every unit's final mask value (0 for
        the units removal takes away): what :meth:`OFBSearch.slim` folds into the weights."""
        m = self.mask(w, hard=True).detach()
        return [int(i) for i in torch.nonzero(m > 0).flatten()], m


class _MaskedLayerNorm(nn.Module):
    """A LayerNorm reading the residual stream through the embedding group's masks: statistics
    weighted by M, output scaled by m (both exact after removal, see the module notes)."""

    def __init__(self, norm: nn.LayerNorm, search: "OFBSearch") -> None:
        super().__init__()
        self.norm = norm
        self._search = weakref.ref(search)  # not a submodule, and copies of the model do not copy it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stat, out = self._search().embed_masks
        wsum = stat.sum()
        mean = (x * stat).sum(-1, keepdim=True) / wsum
        var = (((x - mean) ** 2) * stat).sum(-1, keepdim=True) / wsum
        y = (x - mean) * torch.rsqrt(var + self.norm.eps)
        if self.norm.weight is not None:
            y = y * self.norm.weight
        if self.norm.bias is not None:
            y = y + self.norm.bias
        return y * out


def ofb_unsupported(model: nn.Module) -> str | None:
    """Why OFB cannot search ``model``, or None: plain timm ViT/DeiT blocks are required."""
    reason = embed_unsupported(model)
    if reason is not None:
        return reason
    try:
        find_prunable(model)
    except VitcompressError as e:
        return str(e)
    return None


class OFBSearch:
    """The searched copy of a model, its width groups and the losses; :meth:`run` searches toward a
    MACs target (it can be called again with a tighter target), :meth:`slim` folds and removes."""

    def __init__(self, model: nn.Module, config: OFBConfig = OFBConfig()) -> None:
        reason = ofb_unsupported(model)
        if reason is not None:
            raise VitcompressError(f"OFB does not support this model: {reason}")
        self.config = config
        self.teacher = model.eval()
        self.student = copy.deepcopy(model).train()
        self.gen = torch.Generator().manual_seed(config.seed)
        self.groups: list[WidthGroup] = []
        self.modules = [pm for pm in find_prunable(self.student) if pm.units > 0]
        width = int(self.student.embed_dim)
        self.head_dim = {pm.name: pm.unit_width for pm in self.modules if pm.kind == "attn"}
        self.embed: WidthGroup | None = None
        if config.search_embed:
            step = max(1, min(width // 32, 12))
            self.embed = WidthGroup("embed", EMBED_KEY, width, list(range(width // 2, width + 1, step)) + [width], self.gen)
            self.groups.append(self.embed)
        self.unit_groups: dict[str, WidthGroup] = {}
        for pm in self.modules:
            if pm.kind == "attn" and config.search_heads:
                g = WidthGroup("heads", pm.name, pm.units, list(range(1, pm.units + 1)), self.gen)
            elif pm.kind == "mlp" and config.search_mlp:
                g = WidthGroup("mlp", pm.name, pm.units, [max(1, round(pm.units * r / 8)) for r in range(2, 9)], self.gen)
            else:
                continue
            self.unit_groups[pm.name] = g
            self.groups.append(g)
        self.w = config.w_start
        self.step = 0
        self._reopened = False
        self.masks: dict[str, torch.Tensor] = {}
        self.embed_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hard = False
        self._hooks = []
        self._install()
        self.decoder: nn.Module | None = None
        self.mask_token: nn.Parameter | None = None
        if config.pmim:
            self._install_pmim()
        self.dense_macs = float(self.expected_macs("dense"))

    # -- masks in the forward pass ---------------------------------------------------------
    def _refresh(self) -> None:
        for name, g in self.unit_groups.items():
            self.masks[name] = g.mask(self.w, self.hard)
        if self.embed is not None:
            self.embed_masks = (self.embed.candidate_mask(self.hard), self.embed.mask(self.w, self.hard))

    def _install(self) -> None:
        s = self.student
        self._hooks.append(s.register_forward_pre_hook(lambda m, a: self._refresh()))  # a plain function: model copies do not copy the search
        for name, g in self.unit_groups.items():
            module = s.get_submodule(name)
            if g.kind == "heads":
                d = self.head_dim[name]
                self._hooks.append(module.qkv.register_forward_hook(
                    lambda m, i, out, name=name, d=d: (out.unflatten(-1, (3, -1, d)) * self.masks[name][:, None]).flatten(-3)))
            else:
                self._hooks.append(module.fc1.register_forward_hook(lambda m, i, out, name=name: out * self.masks[name]))
        if self.embed is not None:
            for name, norm in residual_readers(s):
                if isinstance(norm, nn.LayerNorm):
                    set_submodule(s, name, _MaskedLayerNorm(norm, self))

    def _install_pmim(self) -> None:
        s = self.student
        pe = s.patch_embed
        patch = pe.patch_size[0]
        self.grid = tuple(pe.grid_size)
        self.decoder = nn.Sequential(nn.Conv2d(s.embed_dim, patch * patch * 3, 1), nn.PixelShuffle(patch))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, s.embed_dim))
        self.patch_mask: torch.Tensor | None = None

        def replace(m, i, out):
            if self.patch_mask is None:
                return out
            return torch.where(self.patch_mask[..., None], self.mask_token.to(out.dtype), out)

        self._hooks.append(pe.register_forward_hook(replace))

    def close(self) -> None:
        """Remove the hooks (the student keeps its masked norms until :meth:`slim`)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- MACs -------------------------------------------------------------------------------
    def expected_macs(self, widths: str = "expected") -> torch.Tensor:
        """Multiply-accumulates per image at the groups' expected widths (differentiable in α),
        their chosen widths (``"chosen"``) or their full widths (``"dense"``)."""
        s = self.student

        def width(g: WidthGroup | None, full: int) -> torch.Tensor:
            if g is None or widths == "dense":
                return torch.tensor(float(full))
            return g.widths[g.choice()] if widths == "chosen" else g.expected_width()

        C = width(self.embed, s.embed_dim)
        T = token_count(s)
        conv = s.patch_embed.proj
        patches = T - int(getattr(s, "num_prefix_tokens", 0) or 0)
        total = patches * C * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        for pm in self.modules:
            g = self.unit_groups.get(pm.name)
            total = total + width(g, pm.units) * unit_macs(pm.kind, T, C, pm.unit_width)
        classes = getattr(getattr(s, "head", None), "out_features", 0)
        return total + C * classes

    # -- search -----------------------------------------------------------------------------
    def _pmim_loss(self, x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Student forward with a share of patches masked; (logits, reconstruction L1 on them)."""
        b = x.shape[0]
        n = self.grid[0] * self.grid[1]
        k = max(1, round(ratio * n))
        self._refresh()  # forward_features bypasses the root's pre-hook
        scores = torch.rand(b, n, generator=self.gen)
        self.patch_mask = torch.zeros(b, n, dtype=torch.bool)
        self.patch_mask.scatter_(1, scores.topk(k, dim=1).indices, True)
        try:
            feats = self.student.forward_features(x)
        finally:
            mask = self.patch_mask
            self.patch_mask = None
        logits = self.student.forward_head(feats)
        tokens = feats[:, self.student.num_prefix_tokens:]
        rec = self.decoder(tokens.transpose(1, 2).reshape(b, -1, *self.grid))
        p = rec.shape[-1] // self.grid[1]
        # per-patch normalised pixel targets (the paper normalises over a 47-pixel window at 224 px)
        tgt = x.unfold(2, p, p).unfold(3, p, p)  # b, 3, gh, gw, p, p
        tgt = (tgt - tgt.mean((-1, -2), keepdim=True)) / (tgt.var((-1, -2), keepdim=True) + 1e-6).sqrt()
        out = rec.unfold(2, p, p).unfold(3, p, p)
        err = (out - tgt).abs().mean((1, 4, 5)).flatten(1)  # b, patches
        return logits, (err * mask).sum() / mask.sum()

    def run(self, images: torch.Tensor, target_macs: float, steps: int | None = None,
            max_seconds: float | None = None, progress: InfoProgressFn | None = None) -> dict:
        """Search for ``steps`` more steps toward ``target_macs``; returns the loss/width trace."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        if len(images) == 0:
            raise VitcompressError("no images for the OFB search")
        weights = [p for n, p in self.student.named_parameters() if p.requires_grad and cfg.train_weights]
        extra = []
        if self.decoder is not None:
            extra = list(self.decoder.parameters()) + [self.mask_token]
        scores = [g.score for g in self.groups]
        opt = torch.optim.AdamW([{"params": weights + extra, "weight_decay": cfg.weight_decay},
                                 {"params": scores, "weight_decay": 0.0}], lr=cfg.lr)
        arch = torch.optim.AdamW([g.alpha for g in self.groups], lr=cfg.arch_lr, betas=(0.5, 0.999),
                                 weight_decay=cfg.weight_decay)
        aug = RecoverConfig(pad=cfg.pad, flip=True)
        T = cfg.temperature
        t0 = time.perf_counter()
        start, trace = self.step, []
        fresh, self._reopened = start == 0 or self._reopened, False
        perm, pos = torch.randperm(len(images), generator=self.gen), 0
        # the schedule (w, learning rates, one-hot ramp, candidate dying) runs over `plan` steps: the
        # step count, or as many as the time budget allows once a few steps were timed; a search cut
        # by time in the middle of its warm-up would pick widths from half-learned distributions
        plan, first_fit = steps, 0.0
        drop_every = _drop_every(cfg.prune_every, plan)
        self.student.train()
        try:
            for i in range(steps):
                elapsed = time.perf_counter() - t0
                if i >= plan or (max_seconds is not None and elapsed > max_seconds):
                    break
                if max_seconds is not None and i in (PLAN_AFTER_STEPS, REPLAN_AFTER_STEPS):
                    timed = (0, 0.0) if i == PLAN_AFTER_STEPS else (PLAN_AFTER_STEPS, first_fit)
                    plan = _fitted_plan(i, elapsed, timed, max_seconds, steps)
                    drop_every = _drop_every(cfg.prune_every, plan)
                    first_fit = first_fit or elapsed
                if pos + cfg.batch_size > len(perm):
                    perm, pos = torch.randperm(len(images), generator=self.gen), 0
                x = _augment(images[perm[pos:pos + cfg.batch_size]], aug, self.gen)
                pos += cfg.batch_size
                warmed, ramp = _warmup_shares(i, plan, cfg.warmup) if fresh else (1.0, 1.0)
                self.w = cfg.w_start + (cfg.w_end - cfg.w_start) * warmed
                lr_scale = 0.5 * (1 + math.cos(math.pi * i / plan))
                for o, base in ((opt, cfg.lr), (arch, cfg.arch_lr)):
                    for group in o.param_groups:
                        group["lr"] = base * lr_scale
                with torch.no_grad():
                    target = F.log_softmax(self.teacher(x) / T, dim=1)
                dec = None
                if self.decoder is not None and not all(g.decided() for g in self.groups):
                    ratio = cfg.pmim_ratio[0] + (cfg.pmim_ratio[1] - cfg.pmim_ratio[0]) * warmed
                    logits, dec = self._pmim_loss(x, ratio)
                else:
                    logits = self.student(x)
                task = F.kl_div(F.log_softmax(logits / T, dim=1), target, log_target=True, reduction="batchmean") * T * T
                flops = cfg.flops_weight * ((self.expected_macs() - target_macs) / self.dense_macs) ** 2
                # the one-hot loss waits for the warm-up to end, then ramps in over as many steps: from a
                # near-uniform p it amplifies whatever direction p is moving, so the task and FLOPs
                # losses must have shaped p first (at full weight it collapses every group in ~20 steps)
                # (and so does a continuation after :meth:`reopen`, whose choices start over)
                warm = warmed < 1.0
                sparsity = sum(cfg.group_weight * (ramp * g.onehot_loss()
                                                   + (cfg.l1_heads if g.kind == "heads" else cfg.l1_units)
                                                   * torch.sigmoid(g.score).sum()) for g in self.groups)
                loss = task + flops + sparsity
                if dec is not None:
                    loss = loss + (task / dec).detach() * dec
                opt.zero_grad(set_to_none=True)
                arch.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                arch.step()
                self.step += 1
                died = 0
                if self.step % drop_every == 0 and not warm:
                    died = sum(g.drop(cfg.prune_threshold) for g in self.groups)
                    if died:  # the paper resets α's optimiser state when candidates die
                        arch.state.clear()
                with torch.no_grad():
                    macs = float(self.expected_macs())
                    entropy = sum(float(g.entropy()) for g in self.groups) / len(self.groups)
                trace.append({"step": self.step, "task": task.item(), "flops": flops.item(), "macs": macs,
                              "macs_factor": self.dense_macs / macs,
                              "entropy": entropy, "died": died})
                if progress:
                    progress(i + 1, plan, f"loss {task.item():.3f}  MACs {self.dense_macs / macs:.2f}x  entropy {entropy:.2f}")
        finally:
            self.student.eval()
        every = max(1, len(trace) // 40)
        return {"steps": len(trace), "planned_steps": plan, "seconds": time.perf_counter() - t0, "target_macs": float(target_macs),
                "trace": trace[::every], "decided": sum(g.decided() for g in self.groups), "groups": len(self.groups)}

    def reopen(self) -> int:
        """Re-open every group below its choice (:meth:`WidthGroup.reopen`) so that the next
        :meth:`run` can cut further; that run replays the first one's schedule (w falls from
        w_start, the one-hot loss and candidate dying wait for the warm-up) within the narrower
        space. How many groups were re-opened."""
        count = sum(g.reopen() for g in self.groups)
        self._reopened = self._reopened or count > 0
        return count

    # -- result -----------------------------------------------------------------------------
    def widths(self) -> dict[str, int]:
        """The chosen width of every searched group."""
        return {g.name: int(g.widths[g.choice()]) for g in self.groups}

    def hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The masked student at its final masks (what :meth:`slim` must reproduce)."""
        self.hard = True
        try:
            with torch.no_grad():
                return self.student.eval()(x)
        finally:
            self.hard = False

    @torch.no_grad()
    def slim(self) -> nn.Module:
        """Fold the final masks into a copy's weights and remove every unit outside them."""
        model = copy.deepcopy(self.student)
        ids = {h.id for h in self._hooks}  # the copy carries copies of the search's hooks: drop them
        for m in model.modules():
            for hid in ids:
                m._forward_hooks.pop(hid, None)
                m._forward_pre_hooks.pop(hid, None)
        prunable = {pm.name: pm for pm in find_prunable(model)}
        for name, g in self.unit_groups.items():
            keep, scale = g.final(self.w)
            module = model.get_submodule(name)
            if g.kind == "heads":  # q, k and v rows of each head
                scale = scale.repeat_interleave(self.head_dim[name]).repeat(3)
            linear = module.qkv if g.kind == "heads" else module.fc1
            linear.weight.mul_(scale[:, None])
            if linear.bias is not None:
                linear.bias.mul_(scale)
            keep_units(model, prunable[name], keep)
        if self.embed is not None:
            keep, full = self.embed.final(self.w)
            for name, norm in [(n, m) for n, m in model.named_modules() if isinstance(m, _MaskedLayerNorm)]:
                inner = norm.norm
                if inner.weight is None:  # an affine-free norm gets parameters to carry the scale
                    inner.weight = nn.Parameter(torch.ones(self.embed.units))
                    inner.bias = nn.Parameter(torch.zeros(self.embed.units))
                    inner.elementwise_affine = True
                inner.weight.mul_(full)
                if inner.bias is not None:
                    inner.bias.mul_(full)
                set_submodule(model, name, inner)
            keep_embed_channels(model, keep)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.eval()
