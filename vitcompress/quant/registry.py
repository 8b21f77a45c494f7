"""The quantization methods' registries: a method by name, and how to re-create the quantizers it
adds beyond the placement when a checkpoint reloads. Methods register themselves on import."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .config import QuantConfig

Progress = Callable[[int, int], None]  # (done, total)
QuantMethod = Callable[[nn.Module, QuantConfig, Sequence[torch.Tensor], Progress | None], dict]

METHODS: dict[str, QuantMethod] = {}


# A method that adds quantizers beyond the placement registers how to re-create them from a
# checkpoint's quantizer state (before their values load), so its checkpoints reload.
Restorer = Callable[[nn.Module, QuantConfig, dict], None]
RESTORERS: dict[str, Restorer] = {}


def _registrar(table: dict):
    """``@register(name)``: a decorator that files the function under ``name`` in ``table``."""
    def register(name: str):
        def deco(fn):
            table[name] = fn
            return fn

        return deco

    return register


register_method = _registrar(METHODS)
register_restorer = _registrar(RESTORERS)
