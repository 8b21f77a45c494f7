"""BatchNorm folding: Conv2d -> BatchNorm2d pairs become one conv with adjusted weights and bias;
layer-scale folding: a per-channel branch scale moves into the layer that feeds it.

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


_FOLDED_CLASSES: dict[tuple[type, object], type] = {}


def _swap_forward(module: nn.Module, forward) -> None:
    """Give ``module`` a "Folded" subclass of its class with ``forward`` (state-dict keys unchanged)."""
    key = (type(module), forward)
    if key not in _FOLDED_CLASSES:
        _FOLDED_CLASSES[key] = type("Folded" + type(module).__name__, (type(module),), {"forward": forward})
    module.__class__ = _FOLDED_CLASSES[key]


def _mark_folded(bn: nn.Module) -> None:
    _swap_forward(bn, _folded_forward)


def _direct_pairs(model: nn.Module, example: torch.Tensor, is_producer, is_consumer) -> list[tuple[str, str]]:
    """(producer name, consumer name) for every consumer module whose input is the very output
    tensor of a producer module, seen in one forward pass; a producer feeding two consumers is left out."""
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # holding the tensors keeps their ids from being reused
    pairs: list[tuple[str, str]] = []
    hooks = []

    def record(out: torch.Tensor, name: str) -> None:
        produced[id(out)] = name
        keep.append(out)

    for name, m in model.named_modules():
        if is_producer(m):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: record(out, n)))
        elif is_consumer(m):
            def pre(mod, inp, n=name):
                producer = produced.get(id(inp[0]))
                if producer is not None and all(c != n for _, c in pairs):
                    pairs.append((producer, n))
            hooks.append(m.register_forward_pre_hook(pre))
    forward_with_hooks(model, example, hooks)
    producers = [p for p, _ in pairs]
    return [(p, c) for p, c in pairs if producers.count(p) == 1]


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) for every BatchNorm2d fed directly by a Conv2d's output."""
    return _direct_pairs(model, example, lambda m: type(m) is nn.Conv2d,
                         lambda m: isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None)


def prepare_folded_layout(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Give a fresh model the layout of a folded one (folded BatchNorm classes), so a checkpoint
    written after folding loads into it (the conv biases folding adds are re-created from the
    checkpoint's state dict, with every other bias compression added: ``checkpoints.load``)."""
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise VitcompressError(f"checkpoint folds {bn_name} into {conv_name}, which this model does not have")
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


# timm's per-channel branch scales (x * gamma before a residual add): LayerScale on [..., C]
# (after a Linear), LayerScale2d on [B, C, H, W] (after a conv). Matched by class name because
# model files define their own copies (EfficientFormer v2 has its own LayerScale2d).
LAYER_SCALE_CLASSES = ("LayerScale", "LayerScale2d")
# Producers whose output is affine per output channel, so gamma can move into their parameters.
_SCALABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def _is_layer_scale(m: nn.Module) -> bool:
    gamma = getattr(m, "gamma", None)
    return type(m).__name__ in LAYER_SCALE_CLASSES and isinstance(gamma, nn.Parameter) and gamma.dim() == 1


def _identity_forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def _mark_scale_folded(ls: nn.Module) -> None:
    _swap_forward(ls, _identity_forward)


def find_layer_scale_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(producer name, layer-scale name) for every layer scale whose input is the output tensor of
    a Conv2d, Linear or affine BatchNorm2d (exact types: an activation in between would make the
    move wrong)."""
    def scalable(m: nn.Module) -> bool:
        return type(m) in _SCALABLE and not (isinstance(m, nn.BatchNorm2d) and (m.weight is None or m.bias is None))

    return _direct_pairs(model, example, scalable, _is_layer_scale)


def fold_layer_scale(model: nn.Module, example: torch.Tensor, atol: float = 1e-5) -> list[tuple[str, str]]:
    """Move each layer scale's gamma into the per-output-channel parameters of the layer feeding it
    (weight rows and bias of a Conv2d / Linear, or a BatchNorm's affine, which BatchNorm folding
    then carries into its conv), in place; returns the pairs folded. Exact in float; the exported
    graph loses one Mul per residual branch. A pair whose move changes the model's output on
    ``example`` (the producer's output is used elsewhere too) is undone and left unfolded."""
    model.eval()
    pairs = find_layer_scale_pairs(model, example)
    modules = dict(model.named_modules())
    folded = []
    with torch.no_grad():
        before = model(example)
        tol = atol * max(1.0, before.abs().max().item())
        for producer_name, ls_name in pairs:
            producer, ls = modules[producer_name], modules[ls_name]
            params = [t for t in (producer.weight, producer.bias) if t is not None]
            saved = [t.detach().clone() for t in params]
            gamma = ls.gamma.detach().clone()
            for t in params:
                t.mul_(gamma.view(-1, *([1] * (t.dim() - 1))))
            _mark_scale_folded(ls)
            if (model(example) - before).abs().max().item() > tol:
                for t, old in zip(params, saved):
                    t.copy_(old)
                ls.__class__ = type(ls).__mro__[1]  # back to the unfolded class
                continue
            ls.gamma.fill_(1.0)  # so even an unmarked copy of this module computes the identity
            folded.append((producer_name, ls_name))
    return folded


def prepare_folded_scales(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Give a fresh model the layer scales a checkpoint folded (its gammas are saved as ones)."""
    modules = dict(model.named_modules())
    for _, ls_name in pairs:
        ls = modules.get(ls_name)
        if ls is None or not _is_layer_scale(ls):
            raise VitcompressError(f"checkpoint folds layer scale {ls_name}, which this model does not have")
        _mark_scale_folded(ls)
