"""SQ-b: SmoothQuant with a bias term, for every Linear fed by a LayerNorm (MPTQ-ViT).

A LayerNorm's output is strongly asymmetric per channel in ViTs (a few channels sit far from 0).
SQ-b shifts each channel j of that output by a centre mu_j and divides it by a smoothing factor
s_j; both are folded into the LayerNorm's affine parameters, and the consuming Linear(s) absorb
the inverse, so the float function is unchanged:

    LN'(x) = (LN(x) - mu) / s      ->  gamma' = gamma / s,  beta' = (beta - mu) / s
    Linear'(y') = W diag(s) y' + (b + W mu)

Interpretations (the paper's text is partly unavailable here; see docs/mptq.md):
- mu_j = (max_j + min_j) / 2 of the LayerNorm output over the calibration images (the centre of
  the channel's range, which makes the range symmetric around 0).
- s_j = r_j^alpha / max|W_:,j|^(1 - alpha), with r_j = (max_j - min_j) / 2 the centred half-range
  and W the concatenated weights of every Linear the LayerNorm feeds (SmoothQuant's formula).
- alpha is searched per LayerNorm over a grid (plus "centre only", s = 1) by the output error of
  the consuming Linear(s) with their weights and inputs quantized at that layer's bit-widths.
Pairs come from the dataflow (one forward pass with hooks: which Linear consumes exactly the
tensor a LayerNorm produced, or, ours, reads it through token selection or pooling: ViT's final
norm -> head), never from module names. A LayerNorm whose output also feeds
anything other than Linears is left alone (its other consumer would see the changed output): each
pair is checked by folding an arbitrary shift and scale and comparing the float output, and the
output is checked again after the real folding, as BatchNorm folding does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import VitcompressError
from .modules import TensorQuantizer
from .spec import QuantSpec, fake_quantize, qparams_from_range
from .tracing import forward_with_hooks

ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SAMPLE_ROWS = 1024  # LayerNorm output rows kept per pair for the alpha search


@dataclass
class SmoothPair:
    """A producer whose output channels can absorb (x - mu) / s, and the Linear layers consuming it.

    kind "layernorm": the producer is a LayerNorm (gamma, beta absorb it). kind "value": the producer
    is an attention block's value projection (the v rows of qkv absorb it; attn @ v passes it through
    because every Softmax row sums to 1) and the consumer is the block's output projection.
    """

    norm: str
    linears: list[str]
    kind: str = "layernorm"


def find_layernorm_linear_pairs(model: nn.Module, example: torch.Tensor) -> list[SmoothPair]:
    """Every LayerNorm whose output tensor is consumed only by Linear layers (found by dataflow).

    The forward pass records, per LayerNorm output tensor, the Linear modules that receive it, and
    counts how many modules of any other kind receive it; a LayerNorm with another module consumer is
    skipped. A consumer the hooks cannot see (a residual add of the normalised tensor, a reshape into
    a conv) is found by folding an arbitrary shift and scale into each pair and checking that the
    float output does not move; such a pair is skipped too.

    A LayerNorm whose output reaches no module directly (ViT's final norm: the class token is
    selected, or the tokens averaged, before the head) is paired with the first Linear of its width
    executed after it that reads no LayerNorm directly; selection and averaging over tokens commute
    with a per-channel shift and scale, and the same fold check keeps only pairs where that holds.
    """
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is kept alive so its id is not reused
    linear_consumers: dict[str, list[str]] = {}
    other_consumers: dict[str, int] = {}
    executed: list[tuple[str, bool]] = []  # in order: a LayerNorm (True) or a Linear reading no LayerNorm (False)
    hooks = []

    def produce(mod, out, n):
        produced[id(out)] = (n, out)
        executed.append((n, True))

    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None:
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: produce(mod, out, n)))

    def pre(mod, inp, n):
        if not inp or not isinstance(inp[0], torch.Tensor):
            return
        entry = produced.get(id(inp[0]))
        if entry is None or entry[1] is not inp[0]:
            if isinstance(mod, nn.Linear):
                executed.append((n, False))
            return
        norm = entry[0]
        if isinstance(mod, nn.Linear):
            users = linear_consumers.setdefault(norm, [])
            if n not in users:
                users.append(n)
        else:
            other_consumers[norm] = other_consumers.get(norm, 0) + 1

    for name, m in model.named_modules():
        # leaf modules (and Linears, which may own quantizer children); quantizers pass tensors through
        if (isinstance(m, nn.Linear) or not list(m.children())) and not isinstance(m, (nn.LayerNorm, TensorQuantizer)):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: pre(mod, inp, n)))
    forward_with_hooks(model, example, hooks)
    pairs = [SmoothPair(norm, linears) for norm, linears in linear_consumers.items() if norm not in other_consumers]
    pairs += _pooled_pairs(model, executed, seen=set(linear_consumers) | set(other_consumers))
    if not pairs:
        return []
    with torch.no_grad():
        reference = model(example)
    return [p for p in pairs if _fold_keeps_function(model, p, example, reference)]


def _pooled_pairs(model: nn.Module, executed: Sequence[tuple[str, bool]], seen: set[str]) -> list[SmoothPair]:
    """Candidate pairs for LayerNorms whose output reached no module directly: each with the first
    Linear of its width executed after it that reads no LayerNorm (the fold check decides)."""
    modules = dict(model.named_modules())
    pairs, taken = [], set()
    for i, (norm, is_norm) in enumerate(executed):
        if not is_norm or norm in seen or norm in taken:
            continue
        width = modules[norm].weight.shape[0]
        later = (n for n, is_n in executed[i + 1:] if not is_n and modules[n].in_features == width and n not in taken)
        linear = next(later, None)
        if linear is not None:
            pairs.append(SmoothPair(norm, [linear]))
            taken |= {norm, linear}
    return pairs


def _fold_keeps_function(model: nn.Module, pair: SmoothPair, example: torch.Tensor, reference: torch.Tensor,
                         atol: float = 1e-4) -> bool:
    """Whether folding an arbitrary shift and scale into the pair leaves the model's output as it
    was: false when the LayerNorm's output also reaches an op the hooks cannot see (PVT v2 reshapes
    it into a conv's input). The pair's parameters are restored afterwards."""
    modules = dict(model.named_modules())
    norm, linears = modules[pair.norm], [modules[n] for n in pair.linears]
    saved = [(t, t.detach().clone()) for m in (norm, *linears) for t in (m.weight, m.bias) if t is not None]
    biasless = [lin for lin in linears if lin.bias is None]
    gen = torch.Generator().manual_seed(0)
    width = norm.weight.shape[0]
    fold_smoothing(norm, linears, torch.randn(width, generator=gen), torch.rand(width, generator=gen) + 0.5)
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
        for lin in biasless:
            lin.bias = None
    return (out - reference).abs().max().item() <= atol * max(1.0, reference.abs().max().item())


def find_value_proj_pairs(model: nn.Module) -> list[SmoothPair]:
    """timm Attention blocks whose attn @ v output reaches ``proj`` unchanged (no inner norm or gate)."""
    from .modules import is_wrappable_attention, QuantAttention

    pairs = []
    for name, m in model.named_modules():
        if not (is_wrappable_attention(m) or isinstance(m, QuantAttention)):
            continue
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and qkv.out_features == 3 * proj.in_features):
            continue
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity) or getattr(m, "gate", None) is not None:
            continue
        pairs.append(SmoothPair(name, [f"{name}.proj"], kind="value"))
    return pairs


def fold_value_smoothing(attention: nn.Module, centre: torch.Tensor, scale: torch.Tensor) -> None:
    """v' = (v - centre) / scale in the v rows of qkv; the proj Linear absorbs the inverse."""
    qkv = attention.qkv
    d = centre.numel()
    with torch.no_grad():
        if qkv.bias is None:
            qkv.bias = nn.Parameter(torch.zeros(qkv.out_features))
        qkv.weight[2 * d:].copy_((qkv.weight[2 * d:].double() / scale.double()[:, None]).float())
        qkv.bias[2 * d:].copy_(((qkv.bias[2 * d:].double() - centre.double()) / scale.double()).float())
    _fold_into_linears([attention.proj], centre, scale)


def smoothing_factors(lo: torch.Tensor, hi: torch.Tensor, weight_absmax: torch.Tensor,
                      alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel centre mu and smoothing factor s; ``alpha=None`` means centre only (s = 1)."""
    centre = (hi + lo) / 2
    if alpha is None:
        return centre, torch.ones_like(centre)
    half_range = ((hi - lo) / 2).clamp(min=1e-5)
    s = half_range.pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    return centre, s.clamp(1e-4, 1e4)


def smoothed_output_error(x: torch.Tensor, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                          centre: torch.Tensor, scale: torch.Tensor, wspec: QuantSpec, aspec: QuantSpec) -> float:
    """Mean squared error of the Linear output when its smoothed input and weight are quantized.

    The bias cancels (b' = b + W mu holds exactly in float), so only W' x' vs Q(W') Q(x') is compared.
    """
    xs = (x - centre) / scale
    ws = weight * scale
    a_scale, a_zp = qparams_from_range(((lo - centre) / scale).min(), ((hi - centre) / scale).max(), aspec)
    w_lo, w_hi = ws.amin(dim=1), ws.amax(dim=1)
    w_scale, w_zp = qparams_from_range(w_lo, w_hi, wspec)
    ref = xs @ ws.t()
    out = fake_quantize(xs, a_scale, a_zp, aspec) @ fake_quantize(ws, w_scale, w_zp, wspec).t()
    return (out - ref).pow(2).mean().item()


def fold_smoothing(norm: nn.LayerNorm, linears: Sequence[nn.Linear], centre: torch.Tensor, scale: torch.Tensor) -> None:
    """Fold y' = (y - centre) / scale into the LayerNorm and the inverse into each Linear, in place."""
    _fold_into_linears(linears, centre, scale)
    with torch.no_grad():
        norm.bias.copy_(((norm.bias.double() - centre.double()) / scale.double()).float())
        norm.weight.copy_((norm.weight.double() / scale.double()).float())


def _fold_into_linears(linears: Sequence[nn.Linear], centre: torch.Tensor, scale: torch.Tensor) -> None:
    """W' = W diag(scale), b' = b + W centre: the consumers of a smoothed tensor keep their function."""
    with torch.no_grad():
        for lin in linears:
            shift = lin.weight.double() @ centre.double()
            if lin.bias is None:
                lin.bias = nn.Parameter(shift.float())
            else:
                lin.bias.copy_((lin.bias.double() + shift).float())
            lin.weight.copy_((lin.weight.double() * scale.double()).float())


def apply_sqb(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    specs_for: Callable[[str], tuple[QuantSpec, QuantSpec] | None],
    alphas: Sequence[float] = ALPHAS,
    atol: float = 1e-4,
    layernorms: bool = True,
    values: bool = False,
) -> dict[str, dict]:
    """Search alpha per LayerNorm -> Linear pair and fold SQ-b in place; returns what was chosen.

    ``specs_for(linear_name)`` gives the (weight, activation) grids the search quantizes with, or None for a Linear kept float (skipped).
    ``values``: also smooth the value -> output-projection pair of each attention block (beyond
    the paper, which smooths LayerNorm-fed Linears only).
    Quantizers must be "off" (the search needs the float activations).
    """
    model.eval()
    pairs = find_layernorm_linear_pairs(model, batches[0][:2]) if layernorms else []
    if values:
        pairs += find_value_proj_pairs(model)
    if not pairs:
        return {}
    modules = dict(model.named_modules())
    stats: dict[str, dict] = {p.norm: {"lo": None, "hi": None, "rows": []} for p in pairs}
    gen = torch.Generator().manual_seed(0)
    per_batch = max(1, SAMPLE_ROWS // len(batches))

    def record(mod, inp, n):  # the first consumer's input: the producer's output as the Linear sees it
        y = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        st = stats[n]
        lo, hi = y.amin(0), y.amax(0)
        st["lo"] = lo if st["lo"] is None else torch.minimum(st["lo"], lo)
        st["hi"] = hi if st["hi"] is None else torch.maximum(st["hi"], hi)
        st["rows"].append(y[torch.randperm(y.shape[0], generator=gen)[:per_batch]])

    hooks = [modules[p.linears[0]].register_forward_pre_hook(lambda m, i, n=p.norm: record(m, i, n)) for p in pairs]
    try:
        with torch.no_grad():
            before = [model(x) for x in batches[:1]]
            for x in batches[1:]:
                model(x)
    finally:
        for h in hooks:
            h.remove()

    chosen: dict[str, dict] = {}
    for p in pairs:
        specs = specs_for(p.linears[0])
        if specs is None:
            continue  # a Linear kept float (placement or --skip) needs no smoothing
        st = stats[p.norm]
        x = torch.cat(st["rows"])
        linears = [modules[n] for n in p.linears]
        weight = torch.cat([lin.weight.detach().float() for lin in linears])
        w_absmax = weight.abs().amax(dim=0)
        wspec, aspec = specs
        best = None
        for alpha in (None, *alphas):
            centre, scale = smoothing_factors(st["lo"], st["hi"], w_absmax, alpha)
            err = smoothed_output_error(x, weight, st["lo"], st["hi"], centre, scale, wspec, aspec)
            if best is None or err < best[0]:
                best = (err, alpha, centre, scale)
        centre, scale = smoothing_factors(st["lo"], st["hi"], w_absmax, None)
        base_err = smoothed_output_error(x, weight, st["lo"], st["hi"], torch.zeros_like(centre), scale, wspec, aspec)
        err, alpha, centre, scale = best
        if p.kind == "value":
            fold_value_smoothing(modules[p.norm], centre, scale)
        else:
            fold_smoothing(modules[p.norm], linears, centre, scale)
        chosen[p.norm] = {"kind": p.kind, "linears": p.linears, "alpha": alpha, "output_mse": err,
                          "output_mse_unsmoothed": base_err}

    with torch.no_grad():
        after = model(batches[0])
    err = (after - before[0]).abs().max().item()
    if err > atol * max(1.0, before[0].abs().max().item()):
        raise VitcompressError(f"SQ-b folding changed the float output by {err:.3g}: a LayerNorm output is used by a non-Linear op")
    return chosen
