"""Quantized operands of elementwise ops: residual adds, the products inside attention, norm inputs.

Under ``partial`` the tensors between layers stay float, and a runtime converts every layer's int8
output back to float before the next elementwise op. OpenVINO's CPU plugin runs Add, Multiply,
ReduceSum and MVN (GroupNorm, LayerNorm) on int8 operands when their inputs are quantized; then
the layout reorders between its blocked conv outputs and those ops move int8 instead of float
(MobileViT v2, 256 px, OpenVINO 2026.4: float reorders 6.1 ms → 0.5 ms; docs/quantization.md).

The operands sit inside the forwards of timm's blocks (``x + branch(x)``, ``key * scores``), so
each supported block class has a quantized forward here that mirrors timm's and adds the
quantizers; ``ELTWISE_BLOCKS`` is the table of those classes. Normalisation layers outside such
blocks get an input quantizer (``NORM_CLASSES``), and a block may quantize a child conv's output
where it feeds a layout change. Tensors that are non-negative by construction
(Softmax, ReLU outputs) get an unsigned grid with zero point 0, the others the configured
activation grid.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitcompressError
from .modules import QuantConv2d, TensorQuantizer, wrap_input
from .spec import QuantSpec

NORM_CLASSES = (nn.GroupNorm, nn.LayerNorm)


class QuantLinearTransformerBlock(nn.Module):
    """MobileViT v2's ``LinearTransformerBlock`` with both residual adds on quantized operands: the
    stream (shared by the add and the norm that reads it) and the branch output."""

    def forward(self, x: torch.Tensor, x_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x_prev is not None:
            raise VitcompressError("quantized residual adds cover MobileViT v2's self-attention blocks, not cross-attention")
        x = self.stream_quantizer1(x)
        x = x + self.attn_output_quantizer(self.drop_path1(self.attn(self.norm1(x))))
        x = self.stream_quantizer2(x)
        return x + self.mlp_output_quantizer(self.drop_path2(self.mlp(self.norm2(x))))


class QuantLinearSelfAttention(nn.Module):
    """MobileViT v2's ``LinearSelfAttention`` (separable self-attention) with the operands of its
    products quantized: key · softmax(query), summed over tokens into the context vector, then
    relu(value) · context."""

    def forward(self, x: torch.Tensor, x_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x_prev is not None:
            raise VitcompressError("quantized linear attention covers self-attention, not cross-attention")
        query, key, value = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        scores = self.attn_drop(F.softmax(query, dim=-1))
        weighted = self.weighted_key_quantizer(self.key_quantizer(key) * self.scores_quantizer(scores))
        # quantized before its broadcast over the tokens (OpenVINO then expands int8) and after it (and
        # then multiplies in int8); the same grid twice changes no value
        context = self.context_quantizer(self.context_quantizer(weighted.sum(dim=-1, keepdim=True)).expand_as(value))
        out = self.value_quantizer(F.relu(value)) * context
        return self.out_drop(self.out_proj(out))


def _timm_class(qualname: str) -> type | None:
    module, _, name = qualname.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


@dataclass(frozen=True)
class EltwiseBlock:
    """What one timm block class gets under ``Placement.eltwise``, and why."""

    forward: type | None  # quantized forward mixed in over the block's class (None: the block's own)
    quantizers: dict[str, bool]  # the quantizers that forward uses -> non-negative by construction
    reason: str
    conv_outputs: tuple[str, ...] = ()  # child convs whose output is quantized (it feeds a layout change)
    covers_norms: bool = False  # the forward quantizes the inputs of the block's own norms


# Figures in docs/quantization.md ("Elementwise operands").
ELTWISE_BLOCKS: dict[str, EltwiseBlock] = {
    "timm.models.mobilevit.LinearTransformerBlock": EltwiseBlock(
        QuantLinearTransformerBlock,
        {"stream_quantizer1": False, "attn_output_quantizer": False, "stream_quantizer2": False, "mlp_output_quantizer": False},
        "both residual adds and the GroupNorms reading the stream run int8; with them float, OpenVINO reorders the "
        "out_proj/fc2 outputs in float", covers_norms=True),
    "timm.models.mobilevit.LinearSelfAttention": EltwiseBlock(
        QuantLinearSelfAttention,
        {"key_quantizer": False, "scores_quantizer": True, "weighted_key_quantizer": False, "context_quantizer": False,
         "value_quantizer": True},
        "the separable attention's products and token sum run int8; the context is quantized after its broadcast, "
        "which OpenVINO otherwise multiplies in float"),
    "timm.models.mobilevit.MobileVitV2Block": EltwiseBlock(
        None, {}, "the 1x1 conv's output is unfolded into patches (a Reshape): quantized, OpenVINO reorders it in int8",
        conv_outputs=("conv_1x1",)),
}


def eltwise_block(module: nn.Module) -> EltwiseBlock | None:
    """The entry of ``ELTWISE_BLOCKS`` for this module's exact class (a subclass may change the forward)."""
    return next((entry for qualname, entry in ELTWISE_BLOCKS.items() if type(module) is _timm_class(qualname)), None)


def eltwise_modules(model: nn.Module, skipped: Callable[[str], bool]) -> list[str]:
    """Modules whose elementwise operands get quantizers: the blocks of ``ELTWISE_BLOCKS``, and the
    normalisation layers outside the blocks whose forward already quantizes their input."""
    blocks = [n for n, m in model.named_modules() if eltwise_block(m) is not None and not skipped(n)]
    modules = dict(model.named_modules())
    inside = tuple(f"{b}." for b in blocks if b and eltwise_block(modules[b]).covers_norms)
    norms = [n for n, m in modules.items() if isinstance(m, NORM_CLASSES) and not n.startswith(inside) and not skipped(n)]
    return blocks + norms


def wrap_eltwise(module: nn.Module, spec: QuantSpec, observer: str) -> None:
    """Insert the quantizers of one module ``eltwise_modules`` listed, in place (mode "off")."""
    signed = replace(spec, symmetric=True, per_channel=False)
    unsigned = replace(spec, symmetric=False, per_channel=False)  # zero point 0: the range always includes 0
    entry = eltwise_block(module)
    if entry is None:
        wrap_input(module, signed, observer)
        return
    if entry.forward is not None:
        module.__class__ = type("Quant" + type(module).__name__, (entry.forward, type(module)), {})
    for name, non_negative in entry.quantizers.items():
        setattr(module, name, TensorQuantizer(unsigned if non_negative else signed, observer))
    for name in entry.conv_outputs:
        conv = module.get_submodule(name)
        if isinstance(conv, QuantConv2d) and "output_quantizer" not in conv._modules:  # a conv kept float stays so
            conv.output_quantizer = TensorQuantizer(signed, observer)
