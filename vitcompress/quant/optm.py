"""OPT-m: a two-region uniform quantizer for post-GELU and post-Softmax activations (MPTQ-ViT).

Post-GELU and post-Softmax values crowd near zero with a long positive tail. A b-bit OPT-m
quantizer spends half its codes (b-1 bits) on a fine region with base scale delta, and the other
half on a coarse region with scale m * delta, m a power of two:

    fine(x)   = FQ(x;          delta,     z)   on [lo, t], t = delta * (2^(b-1) - 1 - z)
    coarse(x) = FQ(relu(x - t); m * delta, 0)  on [t, t + m * delta * (2^(b-1) - 1)]
    q(x) = fine(x) + coarse(x)

Interpretations (see docs/mptq.md): the coarse region continues where the fine region ends (its
grid starts at t rather than at 0), so q is the sum of two clipped uniform quantizers. That is
what makes it exportable honestly: each region is an ordinary QuantizeLinear/DequantizeLinear pair
on (b-1)-bit codes, and the consuming product is linear, so W q(x) = W fine(x) + W coarse(x) runs
as two integer MatMuls on the same integer weights (``TwoRegionLinear``/``TwoRegionMatMul``),
summed in float. The price is twice the MACs of that product; the report says so. (With m = 1 the
two regions form one uniform grid of 2^b - 1 levels, i.e. an ordinary b-bit quantizer.) m and
delta are searched per layer on calibration data to minimise the error of the layer's output
(the consuming product), with the other operand quantized as it will be.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..errors import VitcompressError
from .modules import QuantLinear, QuantMatMul, TensorQuantizer
from .spec import QuantSpec, fake_quantize

RATIOS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
RANGE_FRACTIONS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


class TwoRegionQuantizer(TensorQuantizer):
    """OPT-m quantizer: its own scale/zero point are the fine region's; ``coarse`` holds m * delta.

    ``total_bits`` is the width it stands for (b); each region uses b-1 bits.
    """

    def __init__(self, total_bits: int, observer: str = "minmax"):
        if total_bits < 3:
            raise VitcompressError(f"OPT-m needs at least 3 bits (two regions of b-1 bits), got {total_bits}")
        super().__init__(QuantSpec(total_bits - 1, symmetric=False), observer)
        self.coarse = TensorQuantizer(QuantSpec(total_bits - 1, symmetric=False))
        self.register_buffer("ratio", torch.ones(()), persistent=True)

    @property
    def total_bits(self) -> int:
        return self.spec.bits + 1

    def set_total_bits(self, bits: int) -> None:
        if bits < 3:
            raise VitcompressError(f"OPT-m needs at least 3 bits (two regions of b-1 bits), got {bits}")
        self.spec = replace(self.spec, bits=bits - 1)
        self.coarse.spec = replace(self.coarse.spec, bits=bits - 1)

    def set_regions(self, base_scale: torch.Tensor, zero_point: torch.Tensor, ratio: int) -> None:
        self.set_qparams(base_scale, zero_point)
        self.coarse.set_qparams(base_scale * ratio, torch.zeros((), dtype=torch.int32))
        self.ratio = torch.tensor(float(ratio))

    @property
    def boundary(self) -> torch.Tensor:
        """t: the largest value of the fine region, where the coarse region starts."""
        return self.scale * (self.spec.qmax - self.zero_point.float())

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fine, coarse) quantized parts; their sum is the quantized tensor."""
        t = self.boundary
        if self.mode != "quantize":
            raise VitcompressError("a two-region quantizer has no parts before calibration")
        from . import modules

        if modules._EXPORTING:
            return self._export_qdq(x), self.coarse._export_qdq(F.relu(x - float(t)))
        return fake_quantize(x, self.scale, self.zero_point, self.spec), self.coarse(F.relu(x - t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quantize":
            return super().forward(x)
        fine, coarse = self.parts(x)
        return fine + coarse

    def extra_repr(self) -> str:
        return f"OPT-m {self.total_bits}b (2 x {self.spec.bits}b regions) m={int(self.ratio)} mode={self.mode}"

    def state(self) -> dict:
        return {**super().state(), "kind": "opt-m", "total_bits": self.total_bits, "ratio": int(self.ratio)}


class TwoRegionLinear(QuantLinear):
    """A QuantLinear whose input may be two-region: W q(x) = W fine(x) + W coarse(x), two integer products."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        iq = self.input_quantizer
        if not (isinstance(iq, TwoRegionQuantizer) and iq.mode == "quantize"):
            return super().forward(x)
        fine, coarse = iq.parts(x)
        wt = self.weight_quantizer(self.weight).t()  # one transpose shared by both products
        out = fine @ wt + coarse @ wt
        return out + self.bias if self.bias is not None else out


class TwoRegionMatMul(QuantMatMul):
    """a @ b with a two-region ``a`` (post-Softmax): fine(a) @ b + coarse(a) @ b."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        aq = self.a_quantizer
        if not (isinstance(aq, TwoRegionQuantizer) and aq.mode == "quantize"):
            return super().forward(a, b)
        fine, coarse = aq.parts(a)
        bq = self.b_quantizer(b)
        return fine @ bq + coarse @ bq


def two_region_quantize(x: torch.Tensor, base_scale: torch.Tensor, zero_point: torch.Tensor, ratio: int,
                        bits: int) -> torch.Tensor:
    """The OPT-m quantizer as a pure function (used by the search; equals TwoRegionQuantizer's forward)."""
    spec = QuantSpec(bits - 1, symmetric=False)
    t = base_scale * (spec.qmax - zero_point.float())
    coarse = fake_quantize(F.relu(x - t), base_scale * ratio, torch.zeros((), dtype=torch.int32), spec)
    return fake_quantize(x, base_scale, zero_point, spec) + coarse


def region_params(lo: float, top: float, ratio: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Base scale and zero point so that the two regions together span [lo, ~top]."""
    levels = 2 ** (bits - 1) - 1
    lo = min(lo, 0.0)
    delta = max((top - lo) / (levels * (1 + ratio)), torch.finfo(torch.float32).eps)
    zp = int(min(max(round(-lo / delta), 0), levels))
    return torch.tensor(delta, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32)


def search_two_region(x: torch.Tensor, product, bits: int, ratios=RATIOS, fractions=RANGE_FRACTIONS) -> dict:
    """Search (m, delta) minimising ||product(q(x)) - product(x)||^2 on calibration samples ``x``.

    ``product`` maps an activation tensor to the layer's output (e.g. x @ Q(W)^T). The range top is
    searched as a fraction of max(x) (so clipping the tail is allowed); the bottom is min(x).
    Returns the best ratio, base scale, zero point and errors, including the best single-scale
    (m = 1) error for comparison.
    """
    lo, hi = float(x.min()), float(x.max())
    ref = product(x)
    best, best_uniform = None, None
    for ratio in ratios:
        for frac in fractions:
            scale, zp = region_params(lo, max(hi * frac, 1e-8), ratio, bits)
            err = (product(two_region_quantize(x, scale, zp, ratio, bits)) - ref).pow(2).mean().item()
            if best is None or err < best["output_mse"]:
                best = {"ratio": ratio, "base_scale": scale, "zero_point": zp, "output_mse": err}
            if ratio == 1 and (best_uniform is None or err < best_uniform):
                best_uniform = err
    return {**best, "output_mse_single_scale": best_uniform}
