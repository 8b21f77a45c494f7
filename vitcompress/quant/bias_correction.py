"""Empirical bias correction: the mean output shift that quantization causes, put back in the bias.

Clipping a skewed activation (post-SiLU, post-GELU) or rounding weights moves the mean of a
layer's output; the layers after it see a biased input and the error compounds. For every
quantized layer with a bias, in execution order, the per-output-channel mean of the quantized
model's output is measured on the calibration images and the bias is shifted so that mean equals
the float model's (Nagel et al., "Data-Free Quantization", 2019, in its empirical form). Layers are
corrected one after another so each sees the corrections upstream of it. Exact in expectation
over the calibration images; it changes only biases, so export and integer kernels are untouched.
Each layer's pass runs only its block (``blockwise.layer_passes``), the same numbers as the whole model's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blockwise import layer_passes
from .calibration import quantizers_off, run_batches
from .tracing import StopAfter


def _channel_mean(out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Mean over everything but the output-channel axis (1 for conv maps, last for Linear)."""
    if isinstance(layer, nn.Conv2d):
        return out.detach().double().mean(dim=(0, 2, 3))
    return out.detach().double().reshape(-1, out.shape[-1]).mean(0)


def _output_means(model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: sums.__setitem__(n, sums.get(n, 0) + _channel_mean(o, mod)))
             for n, m in layers.items()]
    stop = StopAfter(next(iter(layers.values()))) if len(layers) == 1 else None  # one layer: each forward ends after it
    try:
        for x in batches:
            if stop is not None:
                stop(model, x)
            else:
                run_batches(model, [x])
    finally:
        for h in [*hooks, *([stop] if stop is not None else [])]:
            h.remove()
    return {n: s / len(batches) for n, s in sums.items()}


def float_output_means(model: nn.Module, layer_names: Sequence[str], batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-output-channel means of the named layers with every quantizer off. Take them before any
    step rewrites weights (GPTQ stores its rounded weights): after it, "quantizers off" is no longer
    the float model, and a correction against it would leave the rounding's mean shift in place."""
    layers = {n: model.get_submodule(n) for n in layer_names}
    with quantizers_off(model):
        return _output_means(model, layers, batches)


def correct_bias(model: nn.Module, layer_names: Sequence[str], batches: Sequence[torch.Tensor],
                 float_means: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Shift the bias of each named layer (in the given execution order) so its quantized output
    mean matches the float model's on ``batches``; returns the layers corrected (those with a bias).
    ``float_means`` (from ``float_output_means``) is required once the weights are no longer float."""
    layers = {n: model.get_submodule(n) for n in layer_names}
    layers = {n: m for n, m in layers.items() if getattr(m, "bias", None) is not None}
    if float_means is None:
        float_means = float_output_means(model, list(layers), batches)
    # one pass per layer, block by block: its input already carries the corrections made upstream
    for p in layer_passes(model, list(layers), batches):
        quant_mean = _output_means(p.model, {p.layer: p.model.get_submodule(p.layer)}, p.batches)[p.layer]
        with torch.no_grad():
            layers[p.name].bias -= (quant_mean - float_means[p.name]).to(layers[p.name].bias.dtype)
    return list(layers)
