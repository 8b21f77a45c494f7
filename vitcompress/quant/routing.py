"""Make every weighted layer's computation go through its module call, so the quantizers that
wrap the module see it. Some timm models use a layer's weight directly (``F.linear(x,
self.qkv.weight, ...)``) in their default path and offer a switch to the module call; the rules
below flip that switch, each with its reason. The switch is exact in float.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class CallRoute:
    owner: str  # the class holding the switch: "module.qualname"
    attribute: str
    value: object
    reason: str


ROUTES: tuple[CallRoute, ...] = (
    CallRoute("timm.models.swin_transformer_v2.WindowAttention", "qkv_bias_separate", True,
              "by default Swin v2 computes qkv as F.linear(x, self.qkv.weight, concatenated q/k/v biases), "
              "bypassing the qkv module; separately it calls the module, then adds the same biases"),
)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def route_module_calls(model: nn.Module) -> list[str]:
    """Apply every matching rule; returns the names of the modules switched."""
    switched = []
    for name, m in model.named_modules():
        for route in ROUTES:
            if any(_qualname(c) == route.owner for c in type(m).__mro__) and hasattr(m, route.attribute):
                setattr(m, route.attribute, route.value)
                switched.append(name)
    return switched
