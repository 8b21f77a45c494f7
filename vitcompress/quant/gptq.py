"""Error-compensating weight rounding (GPTQ, Frantar et al., arXiv 2210.17323) for Linear and Conv2d.

Nearest rounding treats every weight alone. GPTQ rounds a layer's input columns one at a time and
spreads each column's rounding error over the columns not yet rounded, weighted by the inverse of
the input Hessian H = Σ x xᵀ, so the layer's output error ||W x - Q(W) x||² over the calibration
inputs is what gets minimised. The grid (bits, per-output-channel scales) is the one the weight
quantizer already holds: only the rounding decisions change, so export and kernels are untouched.

Our choices (not from a ViT paper; an extra step wherever a method offers it):
- x is the layer's input as the quantized model feeds it (after its own input quantizer, with every
  layer before it already quantized and rounded), layers taken in execution order: each layer
  compensates what it will really see.
- Dampening: 1 % of the mean diagonal of H is added (GPTQ's default), columns in natural order.
- Convolutions: a dense conv is a Linear over its unfolded input patches (columns in the weight's
  (in, kh, kw) order); a depthwise conv's output channels each read one input channel, so each has
  its own k×k Hessian and is rounded alone. Other grouped convs keep nearest rounding.
- After rounding, the layer's weight holds the rounded values themselves (exactly on its grid), so
  the weight quantizer reproduces them and checkpoints keep them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .api import run_batches
from .modules import TensorQuantizer
from .placement import is_depthwise
from .spec import fake_quantize

DAMPENING = 0.01


def _inverse_hessian_factor(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of H⁻¹ (dampened; inputs that are always zero made harmless), batched,
    and the mask of those dead inputs."""
    h = h.double().clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0  # inputs that are always zero: their weights cannot matter
    diag[dead] = 1.0
    damp = DAMPENING * diag.mean(-1, keepdim=True)
    diag += damp
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, quantizer: TensorQuantizer, block: int = 128) -> torch.Tensor:
    """Round ``weight`` (out x in) onto ``quantizer``'s grid column by column, compensating each
    column's error on the remaining ones through the inverse Hessian; returns the rounded weight.

    ``hessian`` is (in, in), shared by every output row, or (out, in, in), one per output row."""
    spec, scale, zero_point = quantizer.spec, quantizer.scale, quantizer.zero_point
    w = weight.detach().double().clone()
    hinv, dead = _inverse_hessian_factor(hessian)
    w[dead.expand_as(w)] = 0.0

    def round_column(col: torch.Tensor) -> torch.Tensor:  # one input column: a weight of every output channel
        return fake_quantize(col.float(), scale, zero_point, spec).double()

    if hinv.dim() == 3:  # per-row Hessians (depthwise convs: a few columns), no lazy blocks needed
        for i in range(w.shape[1]):
            col = w[:, i]
            q = round_column(col)
            err = (col - q) / hinv[:, i, i]
            w[:, i:] -= err.unsqueeze(1) * hinv[:, i, i:]
            w[:, i] = q
        return w.to(weight.dtype)
    n = w.shape[1]
    for start in range(0, n, block):
        end = min(start + block, n)
        wb = w[:, start:end].clone()
        errors = torch.zeros_like(wb)
        hb = hinv[start:end, start:end]
        for i in range(end - start):
            col = wb[:, i]
            q = round_column(col)
            err = (col - q) / hb[i, i]
            wb[:, i:] -= err.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            wb[:, i] = q
            errors[:, i] = err
        w[:, start:end] = wb
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w.to(weight.dtype)


def supports_gptq(layer: nn.Module) -> bool:
    """Linear, dense Conv2d and depthwise Conv2d with numeric (not "same"/"valid") padding."""
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str) and layer.padding_mode == "zeros"
            and (layer.groups == 1 or is_depthwise(layer)))


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight multiplies: (rows, in) for Linear and dense convs (unfolded
    patches), (channels, rows, kh·kw) for depthwise convs."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, C·kh·kw, L)
    if layer.groups == 1:
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    k = layer.kernel_size[0] * layer.kernel_size[1]
    n, _, length = patches.shape
    return patches.reshape(n, layer.in_channels, k, length).permute(1, 0, 3, 2).reshape(layer.in_channels, -1, k)


def _input_hessian(model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ x xᵀ over the calibration rows of ``layer``'s quantized input (the model quantized as it is);
    one per output row for depthwise convs."""
    acc: dict[str, torch.Tensor] = {}

    def hook(mod, inp):
        x = _input_rows(mod, mod.input_quantizer(inp[0]).detach()).double()
        acc["h"] = acc.get("h", 0) + x.transpose(-2, -1) @ x

    handle = layer.register_forward_pre_hook(hook)
    try:
        run_batches(model, batches)
    finally:
        handle.remove()
    h = acc["h"]
    if h.dim() == 3:  # depthwise with a channel multiplier: output channel o reads input channel o // m
        h = h.repeat_interleave(layer.out_channels // layer.in_channels, dim=0)
    return h


def gptq_layers(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor]) -> list[str]:
    """GPTQ-round the weights of the named quantized layers (see ``supports_gptq``), in the given
    (execution) order; every quantizer must already hold its final parameters. Returns the layers
    rounded."""
    done = []
    for name in names:
        layer = model.get_submodule(name)
        wq = getattr(layer, "weight_quantizer", None)
        if wq is None or wq.mode != "quantize" or not supports_gptq(layer):
            continue
        h = _input_hessian(model, layer, batches)
        with torch.no_grad():
            w2d = layer.weight.reshape(layer.weight.shape[0], -1)
            layer.weight.copy_(gptq_round(w2d, h, wq).reshape(layer.weight.shape))
        done.append(name)
    return done
