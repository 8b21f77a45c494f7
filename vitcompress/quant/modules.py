"""Quantized module wrappers: Linear, Conv2d, SiLU, the attention matmuls of timm's Attention.

Wrapping swaps the module's class for a subclass that owns ``TensorQuantizer`` children, so the
parameters (and state-dict keys) stay where timm put them and a wrapped model still loads
timm checkpoints. During ONNX export the quantizers emit torch's fake-quantize ops, which the
exporter writes as QuantizeLinear/DequantizeLinear carrying exactly the calibrated parameters.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .observers import Observer, make_observer
from .spec import QuantSpec, broadcast_param, fake_quantize

_EXPORTING = False


@contextlib.contextmanager
def onnx_export_mode() -> Iterator[None]:
    """Within this context quantizers emit ONNX-exportable Q/DQ ops instead of simulated ones."""
    global _EXPORTING
    previous, _EXPORTING = _EXPORTING, True
    try:
        yield
    finally:
        _EXPORTING = previous


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor. Modes: "off" (pass through), "observe" (collect range
    statistics, pass through), "quantize" (apply the frozen scale and zero point)."""

    def __init__(self, spec: QuantSpec, observer: str = "minmax"):
        super().__init__()
        self.spec = spec
        self.observer_name = observer
        self.mode = "off"
        self._observer: Observer | None = None
        self.register_buffer("scale", torch.ones(()), persistent=True)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=True)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s.bits}b {'sym' if s.symmetric else 'asym'} {'per-channel' if s.per_channel else 'per-tensor'} mode={self.mode}"

    def observe(self) -> None:
        self._observer = make_observer(self.observer_name, self.spec)
        self.mode = "observe"

    def freeze(self) -> None:
        """Turn the collected statistics into a scale and zero point, and start quantizing."""
        scale, zp = self._observer.compute()
        self.set_qparams(scale, zp)
        self._observer = None

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = scale.detach().float().clone()
        self.zero_point = zero_point.detach().to(torch.int32).clone()
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self._observer.update(x)
            return x
        if _EXPORTING:
            return self._export_qdq(x)
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def _export_qdq(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        lo8, hi8 = (-128, 127) if spec.signed else (0, 255)
        if spec.bits < 8 and not isinstance(x, nn.Parameter):
            # Below 8 bits the int8 grid is clipped explicitly (per channel where the grid is):
            # simulated, not a narrower kernel. Weights need no clip: ``snapped_weights`` put them
            # on the b-bit grid, and a clip would keep their QuantizeLinear from folding into codes.
            s = broadcast_param(self.scale, x, spec.axis)
            z = broadcast_param(self.zero_point.float(), x, spec.axis)
            x = torch.minimum(torch.maximum(x, s * (spec.qmin - z)), s * (spec.qmax - z))
        if spec.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, spec.axis % x.dim(), lo8, hi8)
        scale, zp = float(self.scale), int(self.zero_point)
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, lo8, hi8)

    def state(self) -> dict:
        """Plain-typed description, saved in compressed checkpoints and reports."""
        s = self.spec
        return {
            "bits": s.bits, "symmetric": s.symmetric, "per_channel": s.per_channel, "axis": s.axis,
            "observer": self.observer_name, "scale": self.scale.clone(), "zero_point": self.zero_point.clone(),
        }


class QuantLinear(nn.Linear):
    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _EXPORTING and x.dim() == 2:
            # A 2-D Linear (a classifier head) exports as Gemm, and onnxruntime fuses DQ -> Gemm
            # only when a Q follows; as a 3-D MatMul it becomes MatMulIntegerToFloat like every other Linear.
            return self.forward(x.unsqueeze(1)).squeeze(1)
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer
    # output_quantizer: a child only under placements that fuse QLinearConv (no class default:
    # a class attribute would shadow the registered submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        output_quantizer = self._modules.get("output_quantizer")
        return y if output_quantizer is None else output_quantizer(y)


class QuantSiLU(nn.SiLU):
    """x·Q(sigmoid(x)): with x already quantized (a quantized conv's output) onnxruntime runs this as
    QLinearSigmoid + QLinearMul (the product is quantized by the consumer's input quantizer)."""

    gate_quantizer: TensorQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate_quantizer(torch.sigmoid(x))


class QuantMatMul(nn.Module):
    """a @ b with both operands quantized (per tensor)."""

    def __init__(self, a_quantizer: TensorQuantizer, b_quantizer: TensorQuantizer):
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)


def _timm_attention_cls():
    from timm.layers import Attention

    return Attention


class QuantAttention(nn.Module):
    """timm ``Attention`` with its two products (q·kᵀ and attn·v) as ``QuantMatMul`` modules.

    The forward mirrors timm's unfused path; the class is mixed in over the instance's own class.
    """

    qk_matmul: QuantMatMul
    av_matmul: QuantMatMul

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        if attn_mask is not None or is_causal:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.av_matmul(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def wrap_weighted(module: nn.Module, wspec: QuantSpec, aspec: QuantSpec, w_observer: str, a_observer: str,
                  output: QuantSpec | None = None) -> None:
    """Turn an nn.Linear / nn.Conv2d into its quantized subclass, in place (``output``: a conv also
    quantizes its output on this grid)."""
    cls = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}[type(module)]
    module.__class__ = cls
    module.weight_quantizer = TensorQuantizer(wspec, w_observer)
    module.input_quantizer = TensorQuantizer(aspec, a_observer)
    if output is not None and cls is QuantConv2d:
        module.output_quantizer = TensorQuantizer(output, a_observer)


def wrap_silu(module: nn.SiLU, bits: int, a_observer: str) -> None:
    """Quantize the sigmoid inside a SiLU (unsigned: its range is [0, 1]), in place."""
    module.__class__ = QuantSiLU
    module.gate_quantizer = TensorQuantizer(QuantSpec(bits, symmetric=False, per_channel=False), a_observer)


def wrap_attention(module: nn.Module, aspec: QuantSpec, a_observer: str) -> None:
    """Expose the attention products of a timm Attention as quantizable matmuls, in place."""
    module.__class__ = type("Quant" + type(module).__name__, (QuantAttention, type(module)), {})
    module.qk_matmul = QuantMatMul(TensorQuantizer(aspec, a_observer), TensorQuantizer(aspec, a_observer))
    module.av_matmul = QuantMatMul(TensorQuantizer(aspec, a_observer), TensorQuantizer(aspec, a_observer))


_INPUT_CLASSES: dict[type, type] = {}


class _QuantizedInput:
    """Mixin: quantize the module's input, then run the module's own forward (LayerNorm, GELU, GroupNorm)."""

    input_quantizer: TensorQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x))


def wrap_input(module: nn.Module, spec: QuantSpec, observer: str) -> None:
    """Quantize a module's (single) input before its own forward, in place."""
    cls = type(module)
    if cls not in _INPUT_CLASSES:
        _INPUT_CLASSES[cls] = type("QuantInput" + cls.__name__, (_QuantizedInput, cls), {})
    module.__class__ = _INPUT_CLASSES[cls]
    module.input_quantizer = TensorQuantizer(spec, observer)


@contextlib.contextmanager
def snapped_weights(model: nn.Module) -> Iterator[None]:
    """Temporarily replace quantized weights by their fake-quantized values (for export)."""
    saved = []
    with torch.no_grad():
        for m in model.modules():
            wq = getattr(m, "weight_quantizer", None)
            if isinstance(wq, TensorQuantizer) and wq.mode == "quantize":
                saved.append((m.weight, m.weight.detach().clone()))
                m.weight.copy_(fake_quantize(m.weight, wq.scale, wq.zero_point, wq.spec))
    try:
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


def quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            yield name, m


def is_wrappable_weighted(module: nn.Module) -> bool:
    # Exact types only: a subclass (e.g. a same-padding conv) may change forward semantics.
    return type(module) in (nn.Linear, nn.Conv2d)


def is_wrappable_attention(module: nn.Module) -> bool:
    return type(module) is _timm_attention_cls()
