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
- Dampening: 1 % of the mean diagonal of H is added (GPTQ's default). Columns go in natural order,
  or with ``act_order`` in decreasing order of H's diagonal (GPTQ's "act-order"): the inputs that
  carry the most energy are rounded first, while many columns are left to absorb their error.
  Depthwise convs (a few columns per channel) keep natural order.
- Convolutions: a dense conv is a Linear over its unfolded input patches (columns in the weight's
  (in, kh, kw) order); a depthwise conv's output channels each read one input channel, so each has
  its own k×k Hessian and is rounded alone. Other grouped convs keep nearest rounding.
- After rounding, the layer's weight holds the rounded values themselves (exactly on its grid), so
  the weight quantizer reproduces them and checkpoints keep them.
- Layers go block by block (``blockwise.layer_passes``): each layer's statistics come from running
  only its block on the block's captured input, the same numbers as the whole model's passes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import layer_passes
from .calibration import batch_shards, map_or_here
from .modules import TensorQuantizer
from .placement import is_depthwise
from .spec import fake_quantize
from .tracing import StopAfter

DAMPENING = 0.01
# The float-output target is a least-squares fit per layer: with few calibration rows per input it
# memorises them (mobilevit_xxs W8A8, 128 images, every layer: calibration KL 8e-6, val KL +27 %),
# so layers with fewer rows than this per weight input keep GPTQ's own-output objective.
MIN_ROWS_PER_INPUT = 16


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


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, quantizer: TensorQuantizer, block: int = 128,
               act_order: bool = False) -> torch.Tensor:
    """Round ``weight`` (out x in) onto ``quantizer``'s grid column by column, compensating each
    column's error on the remaining ones through the inverse Hessian; returns the rounded weight.

    ``hessian`` is (in, in), shared by every output row, or (out, in, in), one per output row.
    ``act_order``: take the columns of a shared Hessian in decreasing order of its diagonal."""
    if act_order and hessian.dim() == 2:
        # grids are per output row (or per tensor): permuting input columns leaves every weight on its grid
        perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        rounded = gptq_round(weight[:, perm], hessian[perm][:, perm], quantizer, block)
        return rounded[:, torch.argsort(perm)]
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


def _input_statistics(model: nn.Module, name: str, batches: Sequence[torch.Tensor],
                      float_model: nn.Module | None = None,
                      map_shards: Callable[[Callable, list], list] | None = None,
                      float_batches: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """H = Σ x̃ x̃ᵀ over the calibration rows of layer ``name``'s quantized input x̃ (the model quantized
    as it is), one per output row for depthwise convs; with ``float_model`` also the cross term
    Σ (x - x̃) x̃ᵀ, x the float model's input to the same layer for the same image. The float model
    runs on ``float_batches`` where given (a block's float inputs), else on ``batches``.

    The sums are taken over fixed shards of batches, then added in shard order, so they are the same
    numbers whether ``map_shards`` (a worker pool's map) runs the shards or this process does."""
    layer = model.get_submodule(name)
    float_shards = batch_shards(float_batches if float_batches is not None else batches)
    parts = map_or_here(_shard_statistics, [(model, name, shard, float_model, float_shard)
                                            for shard, float_shard in zip(batch_shards(batches), float_shards)], map_shards)
    acc: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            acc[key] = acc[key] + value if key in acc else value
    h, cross = acc["h"], acc.get("cross")
    if cross is not None and acc["rows"] < MIN_ROWS_PER_INPUT * h.shape[-1]:
        cross = None
    if h.dim() == 3:  # depthwise with a channel multiplier: output channel o reads input channel o // m
        m = layer.out_channels // layer.in_channels
        h = h.repeat_interleave(m, dim=0)
        cross = cross.repeat_interleave(m, dim=0) if cross is not None else None
    return h, cross


def _shard_statistics(model: nn.Module, name: str, batches: Sequence[torch.Tensor],
                      float_model: nn.Module | None, float_batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One shard's sums for ``_input_statistics`` (in a worker, on its own copy of the models)."""
    layer = model.get_submodule(name)
    acc: dict[str, torch.Tensor] = {}
    float_rows: list[torch.Tensor] = []

    def hook(mod, inp):
        x = _input_rows(mod, mod.input_quantizer(inp[0]).detach()).double()
        acc["h"] = acc.get("h", 0) + x.transpose(-2, -1) @ x
        acc["rows"] = acc.get("rows", 0) + x.shape[-2]
        if float_rows:
            acc["cross"] = acc.get("cross", 0) + (float_rows.pop() - x).transpose(-2, -1) @ x

    def float_hook(mod, inp):
        float_rows.append(_input_rows(mod, inp[0].detach()).double())

    handles = [layer.register_forward_pre_hook(hook)]
    if float_model is not None:
        handles.append(float_model.get_submodule(name).register_forward_pre_hook(float_hook))
    # the layers after this one are not needed: each forward stops after it
    run = StopAfter(layer)
    run_float = StopAfter(float_model.get_submodule(name)) if float_model is not None else None
    try:
        for x, float_x in zip(batches, float_batches):
            if run_float is not None:
                run_float(float_model, float_x)  # its layer input first, then the quantized model's hook pairs it
            run(model, x)
    finally:
        for handle in [*handles, run, *([run_float] if run_float is not None else [])]:
            handle.remove()
    return acc


def float_output_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The unrounded weight W* whose output on the quantized inputs best matches the float layer's
    output on the float inputs: argmin ||W x - W* x̃||² = W (H + C) H⁻¹ with H = Σ x̃ x̃ᵀ (dampened
    as GPTQ dampens it, which makes this a ridge fit pulled towards W) and C = Σ (x - x̃) x̃ᵀ.
    ``weight`` is (out, in); per-row statistics (out, in, in) for depthwise convs."""
    h = hessian.double().clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag += DAMPENING * diag.mean(-1, keepdim=True) + (diag == 0).double()
    w = weight.double()
    if h.dim() == 3:  # one row each: w_o* = w_o (H_o + C_o) H_o⁻¹, i.e. H_o w_o*ᵀ = (H_o + C_o)ᵀ w_oᵀ
        rhs = (h + cross).transpose(-2, -1) @ w.unsqueeze(-1)
        return torch.linalg.solve(h, rhs).squeeze(-1).to(weight.dtype)
    # symmetric H: W* = W (H + C) H⁻¹  <=>  H W*ᵀ = (H + C)ᵀ Wᵀ
    return torch.linalg.solve(h, (h + cross).transpose(0, 1) @ w.t()).t().to(weight.dtype)


def _round_layer(model: nn.Module, name: str, batches: Sequence[torch.Tensor], float_model: nn.Module | None,
                 act_order: bool, map_shards: Callable[[Callable, list], list] | None,
                 float_batches: Sequence[torch.Tensor] | None = None) -> None:
    layer = model.get_submodule(name)
    h, cross = _input_statistics(model, name, batches, float_model, map_shards, float_batches)
    with torch.no_grad():
        w2d = layer.weight.reshape(layer.weight.shape[0], -1)
        if cross is not None:
            w2d = float_output_target(w2d, h, cross)
        layer.weight.copy_(gptq_round(w2d, h, layer.weight_quantizer, act_order=act_order).reshape(layer.weight.shape))


def gptq_layers(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor],
                float_model: nn.Module | None = None, act_order: bool = False,
                map_shards: Callable[[Callable, list], list] | None = None) -> list[str]:
    """GPTQ-round the weights of the named quantized layers (see ``supports_gptq``), in the given
    (execution) order; every quantizer must already hold its final parameters. Returns the layers
    rounded.

    With ``float_model`` (the same network unquantized, same module names) each layer is rounded
    towards the float model's output rather than its own: GPTQ runs on ``float_output_target``, so
    the rounding also compensates, as far as a linear map can, the error its quantized input
    carries from the layers before it (the asymmetric objective of GPTAQ, arXiv 2504.02692; we solve
    for the target once and round it, where GPTAQ folds the term into its column updates). Layers
    with fewer than ``MIN_ROWS_PER_INPUT`` calibration rows per weight input keep the plain
    objective. ``act_order``: see ``gptq_round``. ``map_shards`` (a worker pool's map): each layer's
    input statistics are summed over shards of the batches on the workers (the same sums, see
    ``_input_statistics``); the rounding itself runs here."""
    eligible = []
    for name in names:
        layer = model.get_submodule(name)
        wq = getattr(layer, "weight_quantizer", None)
        if wq is not None and wq.mode == "quantize" and supports_gptq(layer):
            eligible.append(name)
    for p in layer_passes(model, eligible, batches, float_model):
        _round_layer(p.model, p.layer, p.batches, p.float_model, act_order, map_shards, p.float_batches)
    return eligible
