"""Bridge blocks of hybrid ViTs, found from the model's dataflow.

A bridge is where feature maps change between the conv layout (N, C, H, W) and a token layout
— (N, L, D) tokens, or MobileViTv2's (N, C, P, N) patches — and back. We record the input shape
of every quantized layer in execution order; a layout switch between consecutive layers is a
change of rank, or a 4-D reshape that keeps the spatial size (H·W) but not the spatial shape
(a stride-2 conv changes the size, an unfold does not), with a conv on at least one side (between
two Linear layers a change of rank only regroups tokens). The bridge block is the smallest module
containing both sides of the switch; inside an ``nn.Sequential`` it is narrowed to the run of
children between them. No module names or indices are hard-coded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .tracing import forward_with_hooks


@dataclass
class Bridge:
    """A block whose output is the reconstruction target of the quantized layers inside it."""

    parent: str  # module name of the block, or of the Sequential holding the span
    start: int | None = None  # child span [start, end] when parent is an nn.Sequential
    end: int | None = None
    layers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.parent if self.start is None else f"{self.parent}[{self.start}:{self.end + 1}]"

    def modules(self, model: nn.Module) -> list[nn.Module]:
        block = model.get_submodule(self.parent) if self.parent else model
        if self.start is None:
            return [block]
        return list(block.children())[self.start:self.end + 1]

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules(model):
            x = m(x)
        return x


def _layout_switch(a: torch.Size, b: torch.Size) -> bool:
    if len(a) != len(b):
        return True
    if len(a) == 4:
        sa, sb = tuple(a[2:]), tuple(b[2:])
        return sa != sb and math.prod(sa) == math.prod(sb)
    return False


def _tokens_regrouped(model: nn.Module, a: str, b: str) -> bool:
    """Two Linear layers: a change of rank between them only regroups tokens (Swin's and TinyViT's
    windows, a pooled head). A Linear acts on the last dimension, so each token stays a token of
    the same channels: no conv/token switch, no bridge. (Taken for one, it made every stage of
    Swin a single bridge block, searched whole for each candidate of each of its layers.)"""
    return isinstance(model.get_submodule(a), nn.Linear) and isinstance(model.get_submodule(b), nn.Linear)


def _common_ancestor(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    common = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def layer_order(model: nn.Module, layers: list[str], example: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """(layer name, input shape) in execution order, from one forward pass."""
    seen: list[tuple[str, torch.Size]] = []
    forward_with_hooks(model, example, [
        model.get_submodule(n).register_forward_pre_hook(lambda m, inp, n=n: seen.append((n, inp[0].shape)))
        for n in layers])
    first = {}
    for n, s in seen:
        first.setdefault(n, s)
    return list(first.items())


def _probe(model: nn.Module, layers: list[str], example: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """Layer order from a probe at >= 256 px when the model accepts it: at small sizes an unfolded
    map can have the same shape as the map itself (a 4x4 map is 4 patches of 4 pixels), which
    would hide the switch. Structure does not depend on the input size; fall back to ``example``."""
    h, w = example.shape[-2:]
    if example.dim() == 4 and min(h, w) < 256:
        f = 256 / min(h, w)
        big = torch.nn.functional.interpolate(example, size=(round(h * f), round(w * f)), mode="bilinear")
        try:
            return layer_order(model, layers, big)
        except Exception:  # fixed-size models (position embeddings) run only at their own size
            pass
    return layer_order(model, layers, example)


def find_bridges(model: nn.Module, layers: list[str], example: torch.Tensor) -> list[Bridge]:
    """Bridge blocks covering every layout switch between consecutive quantized layers."""
    order = _probe(model, layers, example)
    spans: dict[tuple, Bridge] = {}
    for (a, sa), (b, sb) in zip(order, order[1:]):
        if not _layout_switch(sa, sb) or _tokens_regrouped(model, a, b):
            continue
        parent = _common_ancestor(a, b)
        block = model.get_submodule(parent) if parent else model
        key: tuple
        if isinstance(block, nn.Sequential):
            names = [n for n, _ in block.named_children()]
            prefix = parent + "." if parent else ""
            ia = names.index(a[len(prefix):].split(".")[0])
            ib = names.index(b[len(prefix):].split(".")[0])
            key = (parent, min(ia, ib), max(ia, ib))
        else:
            key = (parent, None, None)
        if key not in spans:
            spans[key] = Bridge(*key)
    # a block called with more than one tensor, or not once per forward (CaiT's class-attention
    # blocks take the tokens and the class token), cannot be a reconstruction target: its layers go alone
    merged = _merge_nested(list(spans.values()))
    bridges = [br for br, ok in zip(merged, well_formed(model, merged, example)) if ok]
    for br in bridges:
        prefixes = _member_prefixes(model, br)
        br.layers = [n for n, _ in order if any(n == p or n.startswith(p + ".") for p in prefixes)]
    return [br for br in bridges if br.layers]


def well_formed(model: nn.Module, blocks: list[Bridge], example: torch.Tensor) -> list[bool]:
    """Is each block called exactly once per forward, with one tensor in and one tensor out?"""
    calls = [[0, True] for _ in blocks]
    hooks = []
    for i, b in enumerate(blocks):
        first, last = b.modules(model)[0], b.modules(model)[-1]

        def pre(m, args, kwargs, i=i):
            calls[i][0] += 1
            calls[i][1] &= len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)

        def post(m, inp, out, i=i):
            calls[i][1] &= isinstance(out, torch.Tensor)

        hooks += [first.register_forward_pre_hook(pre, with_kwargs=True), last.register_forward_hook(post)]
    forward_with_hooks(model, example, hooks)
    return [n == 1 and ok for n, ok in calls]


def _member_prefixes(model: nn.Module, br: Bridge) -> list[str]:
    if br.start is None:
        return [br.parent] if br.parent else [""]
    block = model.get_submodule(br.parent) if br.parent else model
    names = [n for n, _ in block.named_children()][br.start:br.end + 1]
    return [f"{br.parent}.{n}" if br.parent else n for n in names]


def _merge_nested(bridges: list[Bridge]) -> list[Bridge]:
    """Overlapping spans of one Sequential merge; a block inside another keeps the outer one
    only when the two switches share it (MobileViT: in and out of the same block)."""
    out: list[Bridge] = []
    for br in sorted(bridges, key=lambda b: (b.parent, b.start if b.start is not None else -1)):
        prev = out[-1] if out else None
        if prev and prev.parent == br.parent and prev.start is not None and br.start is not None and br.start <= prev.end:
            prev.end = max(prev.end, br.end)
            continue
        if prev and prev.parent == br.parent and prev.start is None and br.start is None:
            continue
        out.append(br)
    return out
