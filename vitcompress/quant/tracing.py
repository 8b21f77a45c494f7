"""Dataflow probes: one forward pass with temporary hooks (how fold, bridge and SmoothQuant
pairing find which module feeds which, without relying on module names)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def forward_with_hooks(model: nn.Module, example: torch.Tensor, hooks: Iterable[RemovableHandle]) -> None:
    """Run ``model(example)`` without gradients, then remove ``hooks`` whatever happens."""
    hooks = list(hooks)
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()


def consumers_of(model: nn.Module, producers: Iterable[str], consumer_type: type, example: torch.Tensor) -> list[str]:
    """Names of the ``consumer_type`` modules whose input is the very output tensor of one of the
    ``producers`` (modules in between that pass their input through unchanged do not count as
    breaking the link: the tensor object is the same)."""
    produced: dict[int, torch.Tensor] = {}  # holding the tensors keeps their ids from being reused
    found: list[str] = []
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda mod, inp, out: produced.__setitem__(id(out), out)) for n in producers]
    for name, m in modules.items():
        if isinstance(m, consumer_type):
            def pre(mod, inp, n=name):
                if produced.get(id(inp[0])) is inp[0] and n not in found:
                    found.append(n)
            hooks.append(m.register_forward_pre_hook(pre))
    forward_with_hooks(model, example, hooks)
    return found


def layer_macs(model: nn.Module, names: Iterable[str], example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of each named Linear/Conv2d, from one forward pass over
    ``example`` (every call counts: a layer run twice costs twice). Per image of ``example``, not per
    row of a layer's output: MobileViT runs its transformer on (images × patches, tokens, channels)."""
    macs: dict[str, int] = {}

    def count(mod: nn.Module, inp, out: torch.Tensor, n: str) -> None:
        per_output = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features
        macs[n] = macs.get(n, 0) + out.numel() * per_output // len(example)

    forward_with_hooks(model, example, [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: count(m, i, o, n)) for n in names])
    return macs


class StopForward(Exception):
    """Raised from a hook once a pass has what it ran for: the rest of the model is skipped."""


class StopAfter:
    """Run forwards that end once ``module`` has run as often as it does in a whole forward.

    A pass that only needs one layer's inputs or outputs does not need the layers after it: the
    first forward runs whole and counts the module's calls (a module may run more than once per
    forward, e.g. a shared position-encoding conv), later ones stop after that many. Hooks that
    collect from the module must be registered before this object is made (hooks run in order)."""

    def __init__(self, module: nn.Module):
        self.calls_per_forward: int | None = None
        self._seen = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, module: nn.Module, inputs, output) -> None:
        self._seen += 1
        if self.calls_per_forward is not None and self._seen >= self.calls_per_forward:
            raise StopForward

    def __call__(self, model: nn.Module, x: torch.Tensor) -> None:
        """``model(x)`` without gradients, up to the module's last call."""
        self._seen = 0
        try:
            with torch.no_grad():
                model(x)
        except StopForward:
            return
        self.calls_per_forward = self._seen

    def remove(self) -> None:
        self._handle.remove()
