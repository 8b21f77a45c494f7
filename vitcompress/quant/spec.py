"""Quantization grids: a plain description of one tensor's integer grid and the arithmetic on it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import VitcompressError


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid for one tensor.

    symmetric grids are signed (-2^(b-1) .. 2^(b-1)-1, zero point 0); asymmetric grids are
    unsigned (0 .. 2^b-1) with a zero point. ``per_channel`` quantizes each slice along ``axis``
    with its own scale. Below 8 bits the grid is the int8/uint8 grid with a clipped range, which is
    how it is exported ("simulated on an int8 grid").
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise VitcompressError(f"bits must be between 2 and 8, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def signed(self) -> bool:
        return self.symmetric


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [lo, hi] (widened to include 0, so the zero point always fits)."""
    lo = torch.minimum(lo, torch.zeros_like(lo)).float()
    hi = torch.maximum(hi, torch.zeros_like(hi)).float()
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / spec.qmax, min=eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / (spec.qmax - spec.qmin), min=eps)
        zero_point = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def broadcast_param(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against x along ``axis`` (0-d when per tensor)."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as int32) of x; rounding is half-to-even, as ONNX QuantizeLinear does."""
    s = broadcast_param(scale, x, spec.axis)
    z = broadcast_param(zero_point, x, spec.axis)
    return torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax).to(torch.int32)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize, with a straight-through gradient (used by gradient-based methods).

    When ``scale`` itself requires grad (learned step sizes, ``scale_tuning.py``) the rounding alone
    is passed straight through, as in LSQ, so the gradient reaches the scale: d/ds of s·round(x/s)
    is round(x/s) − x/s inside the grid and the grid's end outside it."""
    s = broadcast_param(scale, x, spec.axis)
    z = broadcast_param(zero_point.to(x.dtype), x, spec.axis)
    xs = x / s
    if scale.requires_grad:
        return (torch.clamp(xs + (torch.round(xs) - xs).detach() + z, spec.qmin, spec.qmax) - z) * s
    q = torch.clamp(torch.round(xs) + z, spec.qmin, spec.qmax)
    y = (q - z) * s
    return x + (y - x).detach() if x.requires_grad else y
