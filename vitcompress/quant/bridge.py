"""Bridge blocks of hybrid ViTs, found from the model's dataflow.

A bridge is where feature maps change between the conv layout (N, C, H, W) and a token layout
— (N, L, D) tokens, or MobileViTv2's (N, C, P, N) patches — and back. We record the input shape
of every quantized layer in execution order; a layout switch between consecutive layers is a
change of rank, or a 4-D reshape that keeps the spatial size (H·W) but not the spatial shape
(a stride-2 conv changes the size, an unfold does not), with a conv on at least one side (between
two Linear layers a change of rank only regroups tokens). The bridge block is the narrowest chain
of modules, each handing its output tensor itself to the next (seen in one forward), that runs
from a module holding one side of the switch to one holding the other: the tail of one stage and
the head of the next, not both stages whole. Where no such chain exists (a reshape between the
two sides), it is the smallest module containing both sides, narrowed inside an ``nn.Sequential``
to the run of children between them. No module names or indices are hard-coded.
"""
from __future__ import annotations

import heapq
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
    members: tuple[str, ...] = ()  # a chain of modules across parents, run one after another

    @property
    def name(self) -> str:
        if self.members:
            return self.members[0] if len(self.members) == 1 else f"{self.members[0]}..{self.members[-1]}"
        return self.parent if self.start is None else f"{self.parent}[{self.start}:{self.end + 1}]"

    def modules(self, model: nn.Module) -> list[nn.Module]:
        if self.members:
            return [model.get_submodule(m) for m in self.members]
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


@dataclass
class _Call:
    name: str
    begin: int  # event counter at the call's start and end: a module called inside another lies between
    end: int = -1
    input: torch.Tensor | None = None  # the one tensor argument (None: several, or keywords)
    output: torch.Tensor | None = None


def _calls(model: nn.Module, example: torch.Tensor) -> list[_Call]:
    """Every call of a module called once in one forward, with its input and output tensors."""
    calls: list[_Call] = []
    open_: dict[str, _Call] = {}
    counts: dict[str, int] = {}
    clock = [0]

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    def pre(name: str):
        def hook(m, args, kwargs):
            counts[name] = counts.get(name, 0) + 1
            single = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            open_[name] = _Call(name, tick(), input=args[0] if single else None)
        return hook

    def post(name: str):
        def hook(m, args, output):
            call = open_.pop(name, None)
            if call is not None:
                call.end, call.output = tick(), output if isinstance(output, torch.Tensor) else None
                calls.append(call)
        return hook

    hooks = []
    for name, m in model.named_modules():
        if name:
            hooks += [m.register_forward_pre_hook(pre(name), with_kwargs=True), m.register_forward_hook(post(name))]
    forward_with_hooks(model, example, hooks)
    return sorted((c for c in calls if counts[c.name] == 1 and c.input is not None and c.output is not None),
                  key=lambda c: c.begin)


def follows_previous(model: nn.Module, blocks: list[Bridge], example: torch.Tensor) -> list[bool]:
    """For each block: is its input the very tensor the block before it returned (nothing between)?"""
    by_name = {c.name: c for c in _calls(model, example)}
    ends = []
    for b in blocks:
        members = _member_prefixes(model, b)
        ends.append((by_name.get(members[0]), by_name.get(members[-1])))
    return [i > 0 and None not in (ends[i][0], ends[i - 1][1]) and ends[i][0].input is ends[i - 1][1].output
            for i in range(len(blocks))]


def _inside(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def _narrowest_chain(calls: list[_Call], a: str, b: str, parent: str, weight: dict[str, int]) -> tuple[str, ...] | None:
    """The chain of modules inside ``parent``, each one's input the previous one's output tensor,
    from a module holding ``a`` to one holding ``b``, with the fewest quantized layers (``weight``:
    how many each module holds; then the fewest modules); None where there is none."""
    inside = [c for c in calls if c.name != parent and _inside(c.name, parent)]
    if not inside:
        return None
    by_input: dict[int, list[_Call]] = {}
    for c in inside:
        by_input.setdefault(id(c.input), []).append(c)
    ends = {c.name for c in inside if _inside(b, c.name)}
    frontier = [((weight[c.name], 1), i, c, (c.name,)) for i, c in enumerate(inside) if _inside(a, c.name)]
    heapq.heapify(frontier)
    settled: set[str] = set()
    tie = len(inside)
    while frontier:
        cost, _, call, chain = heapq.heappop(frontier)
        if call.name in settled:
            continue
        settled.add(call.name)
        if call.name in ends:
            return chain
        for nxt in by_input.get(id(call.output), []):
            if nxt.begin > call.end and nxt.name not in settled:
                tie += 1
                heapq.heappush(frontier, ((cost[0] + weight[nxt.name], cost[1] + 1), tie, nxt, chain + (nxt.name,)))
    return None


def find_bridges(model: nn.Module, layers: list[str], example: torch.Tensor) -> list[Bridge]:
    """Bridge blocks covering every layout switch between consecutive quantized layers; each
    layer belongs to the bridge with the fewest layers among those holding it."""
    order = _probe(model, layers, example)
    calls = _calls(model, example)
    names = [n for n, _ in order]
    weight = {c.name: sum(_inside(n, c.name) for n in names) for c in calls}  # quantized layers each module holds
    spans: dict[tuple, Bridge] = {}
    chains: dict[tuple[str, ...], Bridge] = {}
    for (a, sa), (b, sb) in zip(order, order[1:]):
        if not _layout_switch(sa, sb) or _tokens_regrouped(model, a, b):
            continue
        parent = _common_ancestor(a, b)
        # (sides that share only the model itself: the whole model is no bridge, it is the end-to-end objective)
        chain = _narrowest_chain(calls, a, b, parent, weight) if parent else None
        if chain is not None:
            chains.setdefault(chain, Bridge(parent, members=chain))
            continue
        block = model.get_submodule(parent) if parent else model
        key: tuple
        if isinstance(block, nn.Sequential):
            children = [n for n, _ in block.named_children()]
            prefix = parent + "." if parent else ""
            ia = children.index(a[len(prefix):].split(".")[0])
            ib = children.index(b[len(prefix):].split(".")[0])
            key = (parent, min(ia, ib), max(ia, ib))
        else:
            key = (parent, None, None)
        if key not in spans:
            spans[key] = Bridge(*key)
    # a block called with more than one tensor, or not once per forward (CaiT's class-attention
    # blocks take the tokens and the class token), cannot be a reconstruction target: its layers go alone
    merged = _merge_nested(list(spans.values())) + list(chains.values())
    bridges = [br for br, ok in zip(merged, well_formed(model, merged, example)) if ok]
    for br in bridges:
        prefixes = _member_prefixes(model, br)
        br.layers = [n for n in names if any(_inside(n, p) for p in prefixes)]
    # nested or overlapping bridges: a layer's error is measured on the narrowest one holding it
    owner = {}
    for br in bridges:
        for n in br.layers:
            if n not in owner or len(br.layers) <= len(owner[n].layers):
                owner[n] = br
    for br in bridges:
        br.layers = [n for n in br.layers if owner[n] is br]
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
    if br.members:
        return list(br.members)
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
