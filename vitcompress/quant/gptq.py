"""Error-compensating weight rounding (GPTQ, Frantar et al., arXiv 2210.17323) for Linear layers.

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
- After rounding, the layer's weight holds the rounded values themselves (exactly on its grid), so
  the weight quantizer reproduces them and checkpoints keep them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .api import run_batches
from .modules import TensorQuantizer
from .spec import fake_quantize

DAMPENING = 0.01


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, quantizer: TensorQuantizer, block: int = 128) -> torch.Tensor:
    """Round ``weight`` (out x in) onto ``quantizer``'s grid column by column, compensating each
    column's error on the remaining ones through the inverse Hessian; returns the rounded weight."""
    spec, scale, zero_point = quantizer.spec, quantizer.scale, quantizer.zero_point
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPENING * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    def round_column(col: torch.Tensor) -> torch.Tensor:  # one input column: a weight of every output channel
        return fake_quantize(col.float(), scale, zero_point, spec).double()

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


def _input_hessian(model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ x xᵀ over the calibration rows of ``layer``'s quantized input (the model quantized as it is)."""
    acc: dict[str, torch.Tensor] = {}

    def hook(mod, inp):
        x = mod.input_quantizer(inp[0]).detach().reshape(-1, inp[0].shape[-1]).double()
        acc["h"] = acc.get("h", 0) + x.t() @ x

    handle = layer.register_forward_pre_hook(hook)
    try:
        run_batches(model, batches)
    finally:
        handle.remove()
    return acc["h"]


def gptq_linears(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor]) -> list[str]:
    """GPTQ-round the weights of the named quantized Linear layers, in the given (execution) order;
    every quantizer must already hold its final parameters. Returns the layers rounded."""
    done = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear) or layer.weight_quantizer.mode != "quantize":
            continue
        wq = layer.weight_quantizer
        h = _input_hessian(model, layer, batches)
        with torch.no_grad():
            layer.weight.copy_(gptq_round(layer.weight, h, wq))
        done.append(name)
    return done
