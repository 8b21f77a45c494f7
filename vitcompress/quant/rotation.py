"""Residual-stream rotation of pre-norm transformers (ours, after QuaRot), before quantization.

A pre-norm transformer block reads its residual stream x only through a LayerNorm and writes it
only through Linear outputs (attention projection, MLP output). An orthogonal Q can therefore turn
the stream into xQ without changing what the model computes, and the Linears reading the
LayerNorms' outputs then see rotated inputs: a few channels with large ranges (the outliers that
set a per-tensor activation scale) are spread over all channels, so the same bits resolve the
rest better. QuaRot (Ashkboos et al., arXiv 2404.00456) does this for LLMs with Hadamard
matrices; the mechanism here is the same, made exact for LayerNorm instead of RMSNorm:

1. Each LayerNorm's affine (γ, β) moves into the Linears reading it (W·diag γ, b + W·β).
2. Every writer into the stream is centred (its output channels' mean removed: weights, bias,
   class/position embeddings), so the stream is mean-free and LayerNorm equals RMS normalisation.
3. Q keeps the all-ones direction (Q·1 = 1), so a mean-free stream stays mean-free and the
   LayerNorms stay plain LayerNorms: no new operator, the export is the same graph.
   Writers become Qᵀ·W, readers W·Q. Q = H·diag(1, ±1, ...)·H for a Hadamard H when the width is
   a power of two (dense, every channel mixed), else a seeded random orthogonal fixing 1.
4. ``values``: per head, the value projection's outputs and the output projection's inputs are
   rotated together (attention mixes tokens, never channels, so that is exact too).

What is not rotated (simplifications, docs/mptq.md): the MLP's hidden activation (post-GELU),
where QuaRot inserts an online Hadamard transform (an extra operator in the exported graph).
Each rotation is checked: the model's output on an example must not move beyond float rounding,
else every change is undone and the stream is reported as not rotated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

_TOLERANCE = 1e-4  # relative change of the model's output a rotation may cause (float32 rounding)


@dataclass
class Stream:
    """One residual stream: what writes into it, what reads it (LayerNorms and their readers)."""
    name: str
    dim: int
    writers: list[nn.Module]  # Linear/Conv2d whose output channels are added into the stream
    embeddings: list[nn.Parameter]  # added into the stream (class, register, position tokens); last dim = channels
    norms: list[tuple[nn.LayerNorm, list[nn.Module]]]  # each LayerNorm reading the stream, the layers reading it
    attentions: list[nn.Module] = field(default_factory=list)  # timm Attention (fused qkv, proj) of the blocks


def _is_prenorm_block(blk: nn.Module) -> bool:
    attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
    return (isinstance(getattr(blk, "norm1", None), nn.LayerNorm) and isinstance(getattr(blk, "norm2", None), nn.LayerNorm)
            and isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)
            and isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear))


def _block_parts(blocks: list[nn.Module]) -> tuple[list[nn.Module], list, list[nn.Module]]:
    writers = [m for b in blocks for m in (b.attn.proj, b.mlp.fc2)]
    norms = [pair for b in blocks for pair in ((b.norm1, [b.attn.qkv]), (b.norm2, [b.mlp.fc1]))]
    return writers, norms, [b.attn for b in blocks]


def _vit_stream(model: nn.Module) -> list[Stream]:
    """timm's VisionTransformer (ViT, DeiT, distilled DeiT): patch embedding and tokens in, the
    final LayerNorm (or the pooled one, ``fc_norm``) out to the head(s)."""
    blocks = list(getattr(model, "blocks", []))
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not blocks or not all(_is_prenorm_block(b) for b in blocks) or not isinstance(proj, (nn.Conv2d, nn.Linear)):
        return []
    final = [n for n in (getattr(model, "norm", None), getattr(model, "fc_norm", None)) if isinstance(n, nn.LayerNorm)]
    heads = [h for h in (getattr(model, "head", None), getattr(model, "head_dist", None)) if isinstance(h, nn.Linear)]
    if len(final) != 1 or not heads or getattr(model, "attn_pool", None) is not None:
        return []
    writers, norms, attentions = _block_parts(blocks)
    tokens = [p for p in (getattr(model, k, None) for k in ("cls_token", "reg_token", "dist_token", "pos_embed"))
              if isinstance(p, nn.Parameter)]
    return [Stream("", final[0].normalized_shape[0], [proj] + writers, tokens, norms + [(final[0], heads)], attentions)]


def _mobilevit_streams(model: nn.Module) -> list[Stream]:
    """timm's MobileViT blocks: a 1x1 conv writes the stream, the transformer blocks run on it,
    a LayerNorm and the 1x1 projection conv read it out (unfold/fold only move positions)."""
    streams = []
    for name, m in model.named_modules():
        inner, norm = getattr(m, "transformer", None), getattr(m, "norm", None)
        into, out = getattr(m, "conv_1x1", None), getattr(getattr(m, "conv_proj", None), "conv", getattr(m, "conv_proj", None))
        if (isinstance(inner, nn.Sequential) and len(inner) and all(_is_prenorm_block(b) for b in inner)
                and isinstance(norm, nn.LayerNorm) and isinstance(into, nn.Conv2d) and isinstance(out, nn.Conv2d)):
            writers, norms, attentions = _block_parts(list(inner))
            streams.append(Stream(name, norm.normalized_shape[0], [into] + writers, [], norms + [(norm, [out])], attentions))
    return streams


# Where residual streams are found: (architecture, finder). A model matching none is not rotated.
STREAM_FINDERS: tuple[tuple[str, Callable[[nn.Module], list[Stream]]], ...] = (
    ("timm VisionTransformer", _vit_stream),
    ("timm MobileViT blocks", _mobilevit_streams),
)


def find_streams(model: nn.Module) -> list[Stream]:
    for _, finder in STREAM_FINDERS:
        found = finder(model)
        if found:
            return found
    return []


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def mean_keeping_rotation(n: int, seed: int) -> torch.Tensor:
    """A dense orthogonal n×n matrix Q (float64) with Q·1 = 1, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    if n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        signs[0] = 1.0  # the Hadamard's first row is the all-ones direction: kept as it is
        h = _sylvester(n)
        return h @ torch.diag(signs) @ h
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(n, 1, dtype=torch.float64),
                                          torch.randn(n, n - 1, generator=g, dtype=torch.float64)], 1))
    inner, r = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=g, dtype=torch.float64))
    inner = inner * torch.sign(torch.diagonal(r))  # Haar-distributed
    return basis @ torch.block_diag(torch.ones(1, 1, dtype=torch.float64), inner) @ basis.T


def _set(t: torch.Tensor, value: torch.Tensor) -> None:
    t.copy_(value.to(t.dtype))


def _fold_norm(norm: nn.LayerNorm, readers: list[nn.Module]) -> None:
    gamma = norm.weight.double() if norm.weight is not None else None
    beta = norm.bias.double() if norm.bias is not None else None
    for r in readers:
        w = r.weight.double()  # [out, in(, 1, 1)]: the input channels are dim 1
        shape = (1, -1) + (1,) * (w.dim() - 2)
        if beta is not None:
            shift = (w * beta.view(shape)).flatten(2).sum(-1).sum(-1) if w.dim() > 2 else w @ beta
            if r.bias is None:
                r.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=r.weight.dtype))
            _set(r.bias, r.bias.double() + shift)
        if gamma is not None:
            _set(r.weight, w * gamma.view(shape))
    if norm.weight is not None:
        norm.weight.fill_(1.0)
    if norm.bias is not None:
        norm.bias.zero_()


def _rotate_writer(m: nn.Module, q: torch.Tensor) -> None:
    """Output channels (dim 0) centred, then rotated: W ← Qᵀ(W − mean), b ← Qᵀ(b − mean)."""
    w = m.weight.double().reshape(m.weight.shape[0], -1)
    _set(m.weight, (q.T @ (w - w.mean(0, keepdim=True))).reshape(m.weight.shape))
    if m.bias is not None:
        b = m.bias.double()
        _set(m.bias, q.T @ (b - b.mean()))


def _rotate_reader(m: nn.Module, q: torch.Tensor) -> None:
    """Input channels (dim 1) rotated: W ← W·Q."""
    w = m.weight.double()
    _set(m.weight, torch.einsum("oi...,ij->oj...", w, q))


def _rotate_values(attn: nn.Module, seed: int) -> None:
    heads, head_dim = attn.num_heads, attn.head_dim
    qb = torch.block_diag(*[mean_keeping_rotation(head_dim, seed + 1 + h) for h in range(heads)])
    inner = heads * head_dim
    w = attn.qkv.weight.double()
    w[2 * inner:] = qb.T @ w[2 * inner:]
    _set(attn.qkv.weight, w)
    if attn.qkv.bias is not None:
        b = attn.qkv.bias.double()
        b[2 * inner:] = qb.T @ b[2 * inner:]
        _set(attn.qkv.bias, b)
    _rotate_reader(attn.proj, qb)


def rotate_stream(s: Stream, seed: int, values: bool = True) -> None:
    """Rotate one stream in place (float exact, see the module docstring)."""
    q = mean_keeping_rotation(s.dim, seed)
    for norm, readers in s.norms:
        _fold_norm(norm, readers)
        for r in readers:
            _rotate_reader(r, q)
    for m in s.writers:
        _rotate_writer(m, q)
    for p in s.embeddings:
        x = p.double()
        _set(p, (x - x.mean(-1, keepdim=True)) @ q)
    if values:
        for a in s.attentions:
            if getattr(a, "num_heads", None) and getattr(a, "head_dim", None) and a.qkv.out_features == 3 * a.num_heads * a.head_dim:
                _rotate_values(a, seed)


def rotate_residual_streams(model: nn.Module, example: torch.Tensor, seed: int = 0, values: bool = True) -> dict:
    """Rotate every residual stream the model has (``STREAM_FINDERS``), in place; returns a report:
    streams rotated (name, width), and those left as they were because the output moved."""
    report: dict = {"rotated": [], "not_exact": []}
    model.eval()
    with torch.no_grad():
        before = model(example)
        scale = float(before.abs().max()) + 1e-6
        for i, s in enumerate(find_streams(model)):
            saved = [(t, t.detach().clone()) for t in model.parameters()]
            had_bias = {r: r.bias is None for _, readers in s.norms for r in readers}
            rotate_stream(s, seed + 1000 * i, values)
            err = float((model(example) - before).abs().max())
            if err > _TOLERANCE * max(1.0, scale):
                for t, old in saved:
                    t.copy_(old)
                for r, none in had_bias.items():
                    if none:
                        r.bias = None
                report["not_exact"].append({"stream": s.name or "model", "change": err})
                continue
            report["rotated"].append({"stream": s.name or "model", "width": s.dim})
    return report
