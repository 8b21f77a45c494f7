"""The public quantization call: ``quantize_(model, config, calibration_batches)``.

Methods register themselves by name (``registry.py``); each receives the prepared model (quantizers
inserted, in "off" mode) and the calibration batches, and leaves every quantizer frozen.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import VitcompressError
from ..registry import lookup
from . import minmax  # noqa: F401  (registers the "minmax" method)
from .config import QuantConfig
from .eltwise import wrap_eltwise
from .fold import fold_batchnorm, fold_layer_scale
from .modules import TensorQuantizer, quantizers, wrap_attention, wrap_silu, wrap_weighted
from .spec import QuantSpec
from .placement import PlacementPlan, check_placement_method, get_placement, is_narrow, kind_of, plan, reads_image
from .registry import METHODS, RESTORERS, Progress
from .routing import route_module_calls
from .tracing import consumers_of, layer_macs


@dataclass
class QuantResult:
    config: QuantConfig
    plan: PlacementPlan
    method_info: dict = field(default_factory=dict)
    folded_pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv, batchnorm)
    folded_scales: list[tuple[str, str]] = field(default_factory=list)  # (producer, layer scale)
    narrow_mac_share: float = 0.0  # share of the quantized layers' MACs in narrow layers (QuantConfig.narrow_layer_bits)

    def summary(self) -> dict:
        return {
            "quantized_layers": len(self.plan.weighted),
            "quantized_attention_blocks": len(self.plan.attention),
            "kept_float": self.plan.float_modules,
            "kept_float_weighted_layers": self.plan.skipped,
            "functional_ops_float": ("softmax and GELU are not quantized; the operands of residual adds, attention "
                                     "products and normalisation are, where the placement knows the block "
                                     f"({len(self.plan.eltwise)} module(s))" if self.plan.eltwise else
                                     "residual adds, softmax, GELU and normalisation are not quantized")
            + ("" if self.plan.attention else "; attention matmuls are float"),
            "folded_batchnorms": len(self.folded_pairs),
            **({"folded_layer_scales": len(self.folded_scales)} if self.folded_scales else {}),
            **({"quantized_silu_gates": len(self.plan.gated_silu)} if self.plan.gated_silu else {}),
            **({"image_input_bits": {"bits": self.config.image_input_bits, "layers": self.plan.image_readers}}
               if self.plan.image_readers and self.config.image_input_bits != self.config.abits else {}),
            **({"narrow_layer_bits": {"bits": self.config.narrow_layer_bits, "layers": self.plan.narrow,
                                      "mac_share": round(self.narrow_mac_share, 4)}}
               if self.plan.narrow and self.config.widens_narrow_layers else {}),
            **self.method_info,
        }


def prepare(model: nn.Module, config: QuantConfig, family: str = "", example: torch.Tensor | None = None,
            gated_silu: Sequence[str] | None = None) -> PlacementPlan:
    """Insert quantizers (mode "off") where the placement says; returns the plan.

    A placement with ``gated_silu`` needs ``example`` (to find the SiLUs fed by quantized convs
    from the dataflow) or the names themselves (``gated_silu``, when restoring a checkpoint)."""
    placement = get_placement(config.placement)
    route_module_calls(model)  # before wrapping: layers the model bypasses would never be calibrated
    p = plan(model, placement, config.skip, family)
    modules = dict(model.named_modules())
    for name in p.weighted:
        m = modules[name]
        wbits, abits = config.layer_bits(is_narrow(m))
        wspec = replace(config.weight_spec_linear, bits=config.weight_bits(wbits))  # axis 0 = output channel, for Linear and Conv2d alike
        aspec = replace(config.act_spec, bits=config.image_input_bits if reads_image(m) else abits)
        wrap_weighted(m, wspec, aspec, config.weight_observer, config.act_observer,
                      config.act_spec if placement.conv_outputs else None)
    for name in p.attention:
        wrap_attention(modules[name], config.act_spec, config.act_observer)
    for name in p.eltwise:
        wrap_eltwise(modules[name], config.act_spec, config.act_observer)
    if placement.gated_silu:
        if gated_silu is None:
            if example is None:
                raise VitcompressError(f"placement '{placement.name}' needs an example input to trace the model")
            convs = [n for n in p.weighted if kind_of(modules[n]) == "conv"]
            gated_silu = consumers_of(model, convs, nn.SiLU, example[:1])
        for name in gated_silu:
            wrap_silu(modules[name], config.abits, config.act_observer)
        p.gated_silu = list(gated_silu)
    return p


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor],
    progress: Progress | None = None,
    family: str = "",
    map_shards: Callable | None = None,
) -> QuantResult:
    """Quantize ``model`` in place (fake-quant simulation) and return what was done. ``map_shards``
    (a worker pool's map) lets a method that can (min-max calibration) run its pass in shards."""
    method = lookup(METHODS, config.method, "method")
    check_placement_method(config.placement, config.method)
    batches = list(calibration)
    if not batches:
        raise VitcompressError("calibration needs at least one image")
    model.eval()
    # Layer scales first: one that follows a BatchNorm moves into its affine, which BatchNorm folding
    # then carries into the conv.
    scales = fold_layer_scale(model, batches[0][:2]) if config.fold_layer_scale else []
    folded = fold_batchnorm(model, batches[0][:2]) if config.fold_batchnorm else []
    p = prepare(model, config, family, example=batches[0])
    macs = layer_macs(model, p.weighted, batches[0][:1]) if p.narrow and config.widens_narrow_layers else {}  # quantizers are still off
    narrow_share = sum(macs.get(n, 0) for n in p.narrow) / max(1, sum(macs.values()))
    sharding = {"map_shards": map_shards} if map_shards is not None and "map_shards" in inspect.signature(method).parameters else {}
    info = method(model, config, batches, progress, **sharding)
    return QuantResult(config, p, info, folded, scales, narrow_share)


def quant_state(model: nn.Module) -> dict:
    """Every quantizer's parameters, keyed by module name (for checkpoints)."""
    return {name: q.state() for name, q in quantizers(model)}


def restore_quantized(model: nn.Module, config: QuantConfig, state: dict, family: str = "") -> PlacementPlan:
    """Rebuild a quantized model from a checkpoint's saved quantizer parameters (its weights, with
    BatchNorms already folded and the layout prepared by ``prepare_folded_layout``, are loaded)."""
    gated = sorted({n.rsplit(".", 1)[0] for n in state if n.endswith(".gate_quantizer")})
    p = prepare(model, config, family, gated_silu=gated)
    if config.method in RESTORERS:  # quantizers the method added beyond the placement
        RESTORERS[config.method](model, config, state)
    qs = dict(quantizers(model))
    if set(qs) != set(state):
        raise VitcompressError("the checkpoint's quantization state does not match the model's layers")
    for name, q in qs.items():
        st = state[name]
        # each quantizer's own grid: methods choose bits, granularity and scheme per layer
        q.spec = QuantSpec(int(st["bits"]), bool(st["symmetric"]), bool(st["per_channel"]), int(st["axis"]))
        q.set_qparams(st["scale"], st["zero_point"])
    return p


def float_state_dict(model: nn.Module) -> dict:
    """The model's own parameters and buffers, without quantizer buffers (the timm keys). A module
    registered under two names (CoaT shares one conv position encoding between blocks) has its
    quantizers' buffers under both in the state dict: every name is excluded."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, TensorQuantizer)]
    return {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in names)}
