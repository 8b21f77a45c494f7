"""Quantization configs: frozen dataclasses, as plain as a YAML recipe step."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import VitcompressError
from .options import precision
from .spec import QuantSpec


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    wbits/abits: weight and activation bit-widths (2-8). Below 8 they are simulated on the int8 grid.
    weight_per_channel: per-output-channel weight scales (else per tensor).
    act_symmetric: signed symmetric activations (else unsigned with a zero point).
    placement: which layers get quantized (see ``placement.PLACEMENTS``).
    skip: module-name patterns (fnmatch) kept float in addition to the placement's own.
    fold_batchnorm: fold Conv2d -> BatchNorm2d pairs before quantizing (what a deployed conv computes).
    fold_layer_scale: move timm's layer scales (per-channel branch scales) into the layer feeding
        them before quantizing: exact in float, one Mul fewer per residual branch once exported.
    reduce_range: weights use 7 bits of their grid (for int8 kernels without VNNI, see ``vitcompress.cpu``).
    image_input_bits: width of the input quantizer of layers reading the image (``placement.reads_image``):
        the image is 8-bit data, so by default it keeps 8 bits whatever ``abits`` says.
    narrow_layer_bits: the least width of the weights and inputs of narrow layers (``placement.is_narrow``:
        fewer than 64 products per output, e.g. depthwise convs): below it their rounding noise, not
        averaged over many products, dominates the model's error (docs/quantization.md). Set it to
        ``min(wbits, abits)`` or below to quantize them like every other layer.
    method_options: knobs of the chosen method (see each method's options dataclass).
    """

    method: str = "minmax"
    wbits: int = 8
    abits: int = 8
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    weight_per_channel: bool = True
    weight_symmetric: bool = True
    act_symmetric: bool = False
    placement: str = "partial"
    skip: tuple[str, ...] = field(default_factory=tuple)
    fold_batchnorm: bool = True
    fold_layer_scale: bool = True
    reduce_range: bool = False
    image_input_bits: int = 8
    narrow_layer_bits: int = 8
    method_options: dict = field(default_factory=dict)  # method-specific knobs, e.g. qhyvit's rounds

    def __post_init__(self):
        for name in ("wbits", "abits", "image_input_bits", "narrow_layer_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 2 <= v <= 8:
                raise VitcompressError(f"{name} must be an integer between 2 and 8, got {v}")

    @property
    def weight_spec_linear(self) -> QuantSpec:
        return QuantSpec(self.weight_bits(self.wbits), self.weight_symmetric, self.weight_per_channel, axis=0)

    def weight_bits(self, bits: int) -> int:
        """The grid width weights really get for a requested width (7 at most under reduce_range)."""
        return min(bits, 7) if self.reduce_range else bits

    def layer_bits(self, narrow: bool) -> tuple[int, int]:
        """(weight, activation) widths a layer asks for: ``narrow`` ones keep ``narrow_layer_bits`` at least."""
        if not narrow:
            return self.wbits, self.abits
        return max(self.wbits, self.narrow_layer_bits), max(self.abits, self.narrow_layer_bits)

    @property
    def act_spec(self) -> QuantSpec:
        return QuantSpec(self.abits, self.act_symmetric, per_channel=False)

    def _precision(self) -> tuple[str, bool] | None:
        """What the method's options make of the bit widths: (label, below 8 bits?), or None."""
        return precision(self.method, self.method_options or {})

    @property
    def uniform_widths(self) -> bool:
        """One width for every layer (bar the image-reading and narrow ones); False where the method
        assigns widths per layer (mixed precision), which then also decides the narrow layers'."""
        return self._precision() is None

    @property
    def widens_narrow_layers(self) -> bool:
        """Do narrow layers get a wider width than the rest (``narrow_layer_bits`` above the width asked)?"""
        return self.uniform_widths and self.narrow_layer_bits > min(self.wbits, self.abits)

    @property
    def label(self) -> str:
        """'int8' only when everything quantized is 8-bit; otherwise the simulated WxAy name (or the
        method's own, e.g. mp5 for mixed precision at 5 bits on average)."""
        method = self._precision()
        if method is not None:
            return method[0]
        return "int8" if (self.wbits, self.abits) == (8, 8) else f"w{self.wbits}a{self.abits}"

    @property
    def simulated(self) -> bool:
        method = self._precision()
        return self.wbits < 8 or self.abits < 8 or (method is not None and method[1])
