"""BatchNorm folding: Conv2d -> BatchNorm2d pairs become one conv with adjusted weights and bias.

Pairs are found from the model's dataflow, not from module names: one forward pass records
which BatchNorm consumes which conv's output tensor. The BatchNorm module stays in place with
identity statistics and a class that skips normalisation (keeping its activation and dropout,
as timm's BatchNormAct2d has them), so state-dict keys are unchanged and the exported graph has
no BatchNormalization left between the quantized conv and what follows.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import VitcompressError
from .tracing import forward_with_hooks


def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
    if isinstance(getattr(self, "drop", None), nn.Module):
        x = self.drop(x)
    if isinstance(getattr(self, "act", None), nn.Module):
        x = self.act(x)
    return x


_FOLDED_CLASSES: dict[type, type] = {}


def _mark_folded(bn: nn.Module) -> None:
    cls = type(bn)
    if cls not in _FOLDED_CLASSES:
        _FOLDED_CLASSES[cls] = type("Folded" + cls.__name__, (cls,), {"forward": _folded_forward})
    bn.__class__ = _FOLDED_CLASSES[cls]


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) for every BatchNorm2d fed directly by a Conv2d's output."""
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d:
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: produced.__setitem__(id(out), n)))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            def pre(mod, inp, n=name):
                conv = produced.get(id(inp[0]))
                if conv is not None and all(b != n for _, b in pairs):
                    pairs.append((conv, n))
            hooks.append(m.register_forward_pre_hook(pre))
    forward_with_hooks(model, example, hooks)
    convs = [c for c, _ in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1]  # a conv feeding two norms stays unfolded


def prepare_folded_layout(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Give a fresh model the layout of a folded one (conv biases, folded BatchNorm classes), so
    a checkpoint written after folding loads into it."""
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise VitcompressError(f"checkpoint folds {bn_name} into {conv_name}, which this model does not have")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        _mark_folded(bn)


def fold_batchnorm(model: nn.Module, example: torch.Tensor, atol: float = 1e-3) -> list[tuple[str, str]]:
    """Fold every Conv2d -> BatchNorm2d pair in place (eval mode); returns the pairs folded.

    The model's output on ``example`` is checked before and after: folding is exact up to float
    rounding, so a larger change means a pairing was wrong and is reported, not hidden.
    """
    model.eval()
    pairs = find_conv_bn_pairs(model, example)
    if not pairs:
        return []
    with torch.no_grad():
        before = model(example)
        modules = dict(model.named_modules())
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
            factor = gamma / std
            conv.weight.mul_(factor.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
            new_bias = (bias - bn.running_mean) * factor + beta
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias)
            else:
                conv.bias.copy_(new_bias)
            # identity statistics, so even an unmarked copy of this module computes ~identity
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            if bn.weight is not None:
                bn.weight.fill_(1.0)
            if bn.bias is not None:
                bn.bias.zero_()
            _mark_folded(bn)
        after = model(example)
    err = (after - before).abs().max().item()
    scale = before.abs().max().item() + 1e-6
    if err > atol * max(1.0, scale):
        raise VitcompressError(f"BatchNorm folding changed the model's output by {err:.3g}; a conv output is used elsewhere")
    return pairs
