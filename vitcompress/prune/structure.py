"""Structural units of timm transformer blocks and their physical removal.

A *unit* is the smallest piece that can be cut out of a dense model and leave a smaller dense
model behind:

- an attention head of ``timm.layers.Attention``: its ``head_dim`` rows in each of the q, k and v
  parts of ``qkv`` (weight and bias) and the matching ``head_dim`` columns of ``proj``;
- an MLP hidden unit of ``timm.layers.Mlp``: one row of ``fc1`` (and its bias) and the matching
  column of ``fc2``.

Removing units rebuilds the Linear layers with fewer rows/columns and updates ``num_heads`` /
``attn_dim`` (attention) so timm's own ``forward`` runs the smaller model unchanged. A module
that loses every unit is replaced by :class:`BiasBranch` (its output is then the constant output
bias) and the LayerNorm feeding it becomes an Identity, so the exported graph drops the branch.

The *layout* (units kept per module) is a plain dict stored in checkpoints; :func:`apply_layout`
reshapes a freshly built model to it before the weights are loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import VitcompressError


@dataclass(frozen=True)
class PrunableModule:
    """One attention or MLP module of a transformer block, with its structural units."""

    name: str  # module path, e.g. "blocks.3.attn"
    kind: str  # "attn" | "mlp"
    units: int  # heads or hidden units present now
    in_width: int  # input features of the module (token width)
    unit_width: int  # head_dim for attention, 1 for MLP
    macs_per_unit: int  # multiply-accumulates per image for one unit (Linear + attention matmuls)
    norm_name: str | None  # the LayerNorm feeding it inside its block (Identity once the module is gone)


class BiasBranch(nn.Module):
    """What an attention/MLP module becomes when all its units are removed: its output bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], self.bias.shape[0])


def _attention_cls():
    from timm.layers import Attention

    return Attention


def _mlp_cls():
    from timm.layers import Mlp

    return Mlp


def _check_attention(name: str, m: nn.Module) -> None:
    if getattr(m, "gate", None) is not None or not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        raise VitcompressError(f"{name}: gated or scale-normalised attention is not supported by structural pruning")


def _check_mlp(name: str, m: nn.Module) -> None:
    if not isinstance(m.fc1, nn.Linear) or not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        raise VitcompressError(f"{name}: only Linear MLPs without a hidden norm can be pruned structurally")


def token_count(model: nn.Module) -> int:
    """Tokens per image (patches plus class/prefix tokens) of a ViT-style model."""
    pe = getattr(model, "patch_embed", None)
    n = int(getattr(pe, "num_patches", 0) or 0)
    n += int(getattr(model, "num_prefix_tokens", 0) or 0)
    return max(n, 1)


def find_prunable(model: nn.Module) -> list[PrunableModule]:
    """Every timm Attention / Mlp (or already emptied branch) inside a block, in model order."""
    Attention, Mlp = _attention_cls(), _mlp_cls()
    tokens = token_count(model)
    found: list[PrunableModule] = []
    modules = dict(model.named_modules())
    for name, m in model.named_modules():
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name)
        norm_name = None
        if leaf in ("attn", "mlp") and parent is not None:
            cand = "norm1" if leaf == "attn" else "norm2"
            if hasattr(parent, cand):
                norm_name = f"{parent_name}.{cand}"
        if isinstance(m, Attention):
            _check_attention(name, m)
            c, d = m.qkv.in_features, m.head_dim
            macs = tokens * (3 * c * d + d * m.proj.out_features + 2 * tokens * d)
            found.append(PrunableModule(name, "attn", m.num_heads, c, d, macs, norm_name))
        elif isinstance(m, Mlp):
            _check_mlp(name, m)
            c = m.fc1.in_features
            found.append(PrunableModule(name, "mlp", m.fc1.out_features, c, 1, tokens * (c + m.fc2.out_features), norm_name))
        elif isinstance(m, BiasBranch) and leaf in ("attn", "mlp"):
            found.append(PrunableModule(name, leaf, 0, m.bias.shape[0], 1, 0, norm_name))
    if not found:
        raise VitcompressError("no timm Attention/Mlp modules found: structural pruning supports ViT/DeiT-style models")
    return found


def unit_slices(model: nn.Module, pm: PrunableModule) -> list[tuple[nn.Parameter, int, int]]:
    """The parameters a unit spans, as (parameter, axis, parts) triples: unit ``u`` owns indices
    ``[u*w, (u+1)*w)`` along ``axis`` within each of the ``parts`` equal chunks of that axis
    (qkv has 3 parts: q, k, v), where ``w`` is the unit width (see :func:`unit_index`)."""
    m = model.get_submodule(pm.name)
    if pm.kind == "attn":
        out = [(m.qkv.weight, 0, 3), (m.proj.weight, 1, 1)]
        if m.qkv.bias is not None:
            out.append((m.qkv.bias, 0, 3))
        return out
    if pm.kind == "mlp":
        out = [(m.fc1.weight, 0, 1), (m.fc2.weight, 1, 1)]
        if m.fc1.bias is not None:
            out.append((m.fc1.bias, 0, 1))
        return out
    return []


def unit_index(pm: PrunableModule, param_len: int, parts: int, units: Sequence[int]) -> torch.Tensor:
    """Indices along a parameter's unit axis that belong to ``units``."""
    chunk = param_len // parts
    w = pm.unit_width
    idx = [p * chunk + u * w + j for p in range(parts) for u in units for j in range(w)]
    return torch.tensor(idx, dtype=torch.long)


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.to(old.weight.dtype)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def _empty(model: nn.Module, pm: PrunableModule, out_bias: torch.Tensor | None, dim: int) -> None:
    branch = BiasBranch(dim)
    if out_bias is not None:
        with torch.no_grad():
            branch.bias.copy_(out_bias)
    _set(model, pm.name, branch)
    if pm.norm_name is not None:
        _set(model, pm.norm_name, nn.Identity())


def keep_units(model: nn.Module, pm: PrunableModule, keep: Iterable[int]) -> None:
    """Physically remove every unit of ``pm`` not in ``keep`` (in place); the function of the
    model is unchanged when the removed units' weights were zero."""
    keep = sorted(set(int(k) for k in keep))
    if any(k < 0 or k >= pm.units for k in keep):
        raise VitcompressError(f"{pm.name}: unit index out of range 0..{pm.units - 1}")
    m = model.get_submodule(pm.name)
    if pm.kind == "attn":
        if not keep:
            _empty(model, pm, m.proj.bias, m.proj.out_features)
            return
        rows = unit_index(pm, m.qkv.out_features, 3, keep)
        cols = unit_index(pm, m.proj.in_features, 1, keep)
        m.qkv = _linear_like(m.qkv, m.qkv.weight[rows], None if m.qkv.bias is None else m.qkv.bias[rows])
        m.proj = _linear_like(m.proj, m.proj.weight[:, cols], m.proj.bias)
        m.num_heads = len(keep)
        m.attn_dim = len(keep) * m.head_dim
    elif pm.kind == "mlp":
        if not keep:
            _empty(model, pm, m.fc2.bias, m.fc2.out_features)
            return
        idx = torch.tensor(keep, dtype=torch.long)
        m.fc1 = _linear_like(m.fc1, m.fc1.weight[idx], None if m.fc1.bias is None else m.fc1.bias[idx])
        m.fc2 = _linear_like(m.fc2, m.fc2.weight[:, idx], m.fc2.bias)
    elif keep:
        raise VitcompressError(f"{pm.name} has no units left to keep")


def layout_of(model: nn.Module) -> dict[str, int]:
    """Units present per prunable module: the structure a pruned checkpoint records."""
    return {pm.name: pm.units for pm in find_prunable(model)}


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Reshape a freshly built model to a recorded layout (weights are loaded afterwards)."""
    by_name = {pm.name: pm for pm in find_prunable(model)}
    for name, units in layout.items():
        pm = by_name.get(name)
        if pm is None:
            raise VitcompressError(f"pruned layout names {name}, which this architecture does not have")
        units = int(units)
        if units > pm.units or units < 0:
            raise VitcompressError(f"pruned layout asks {units} units for {name}, which has {pm.units}")
        if units < pm.units:
            keep_units(model, pm, range(units))


def macs(model: nn.Module) -> int:
    """Multiply-accumulates per image of all prunable modules (the part pruning can change)."""
    return sum(pm.units * pm.macs_per_unit for pm in find_prunable(model))


PRUNE_STATE_ATTR = "vitcompress_prune_state"  # a pruned model carries its checkpoint record here


def apply_prune_state(model: nn.Module, prune_state: dict) -> None:
    """Shape a fresh model like the pruned one a checkpoint's ``prune_state`` describes."""
    layout = prune_state.get("layout") if isinstance(prune_state, dict) else None
    if not isinstance(layout, dict):
        raise VitcompressError("the checkpoint's prune_state has no layout")
    apply_layout(model, layout)
    setattr(model, PRUNE_STATE_ATTR, prune_state)


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates per image of every Linear/Conv2d plus the attention products
    (q·kᵀ and attn·v), counted by running the model once at batch 1."""
    Attention = _attention_cls()
    total = [0]

    def linear(m, inp, out):
        total[0] += out.numel() * m.in_features

    def conv(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def attention(m, inp, out):
        n = inp[0].shape[-2]
        total[0] += 2 * n * n * m.attn_dim * inp[0].shape[0]

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attention))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return int(total[0])
