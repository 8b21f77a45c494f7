"""Per-layer passes over the calibration images, block by block.

GPTQ needs each layer's input statistics and bias correction each layer's output mean, both on the
model as it is after the layers before it were changed. Asking the whole model for every layer
costs about half a forward per layer (quadratic in depth: CaiT-XXS, 158 layers at 224 px, spent
minutes there). Here the layers go block by block (the units reconstruction uses: a transformer
block, a stage's child): each block's input is captured once, and a layer's pass runs only its
block. Where one block's output is the next block's input tensor itself (seen in one forward),
that input is the previous block run again after its layers changed, so the whole walk costs a
few forwards however deep the model. The same tensors go through the same modules, batch by
batch: the numbers are those of the whole model's passes.

Blocks (``reconstruction_blocks``) come from the module tree and the dataflow, not from names:
the bridge blocks of a hybrid (``bridge.py``, found by Q-HyViT) are one block each; every other
quantized layer belongs to the deepest module above it that is a child of an ``nn.Sequential``
(a transformer block, an inverted-residual block; for ViT/DeiT: ``blocks.i``), or else to the
model's top-level child holding it (the stem, the patch embedding, the head). A block that is not
called exactly once per forward with one tensor is split into its layers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import nn

from .bridge import Bridge, follows_previous, well_formed
from .calibration import quantizers_off
from .tracing import StopForward


@dataclass
class LayerPass:
    """What one layer's pass runs: ``model`` (the whole model, or its block as a model of its own)
    on ``batches``, the layer named ``layer`` in it; the float model's counterparts where given."""

    name: str  # the layer's name in the whole model
    model: nn.Module
    layer: str
    batches: list[torch.Tensor]
    float_model: nn.Module | None = None
    float_batches: list[torch.Tensor] | None = None


def _sequential_children(model: nn.Module) -> set[str]:
    return {f"{parent}.{child}" if parent else child
            for parent, m in model.named_modules() if isinstance(m, nn.Sequential) for child, _ in m.named_children()}


def _unit_of(layer: str, sequential_children: set[str]) -> str:
    parts = layer.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the deepest ancestor (not the layer itself) inside a Sequential
        if ".".join(parts[:i]) in sequential_children:
            return ".".join(parts[:i])
    return parts[0]


def reconstruction_blocks(model: nn.Module, layers: Sequence[str], example: torch.Tensor,
                          bridges: Sequence[Bridge] = ()) -> list[Bridge]:
    """The blocks to reconstruct, in execution order (``layers`` in execution order), each with the
    quantized layers it holds. Run it with the quantizers off."""
    bridge_of = {n: b for b in bridges for n in b.layers}
    sequential = _sequential_children(model)
    blocks: dict[str, Bridge] = {}
    for name in layers:
        if name in bridge_of:
            b = bridge_of[name]
            blocks.setdefault(b.name, replace(b, layers=[]))
            blocks[b.name].layers.append(name)
        else:
            unit = _unit_of(name, sequential)
            blocks.setdefault(unit, Bridge(unit)).layers.append(name)
    # a unit inside another unit (a transformer block inside a MobileViT block) is part of the outer one
    outer = {k: next((o for o in blocks if k.startswith(o + ".")), k) for k in blocks
             if blocks[k].start is None and not blocks[k].members}
    for inner, o in outer.items():
        if o != inner:
            blocks[o].layers += blocks.pop(inner).layers
    order = {n: i for i, n in enumerate(layers)}
    for b in blocks.values():
        b.layers.sort(key=order.__getitem__)
    candidates = sorted(blocks.values(), key=lambda b: order[b.layers[0]])
    result = []
    for b, ok in zip(candidates, well_formed(model, candidates, example)):
        if ok:
            result.append(b)
            continue
        singles = [Bridge(n, layers=[n]) for n in b.layers]  # the layers alone; one called twice is left out
        result += [s for s, fine in zip(singles, well_formed(model, singles, example)) if fine]
    return result


def capture(model: nn.Module, images: torch.Tensor, blocks: Sequence[Bridge], batch_size: int,
            outputs: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs (and outputs) of ``blocks`` over ``images``; without outputs, the pass stops at the
    last block's input."""
    ins: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
    outs: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
    stop_at = None if outputs else blocks[-1].name
    hooks = []
    for b in blocks:
        first, last = b.modules(model)[0], b.modules(model)[-1]

        def pre(m, inp, k=b.name):
            ins[k].append(inp[0].detach().clone())
            if k == stop_at:
                raise StopForward

        hooks.append(first.register_forward_pre_hook(pre))
        if outputs:
            hooks.append(last.register_forward_hook(lambda m, inp, out, k=b.name: outs[k].append(out.detach().clone())))
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                try:
                    model(images[i:i + batch_size])
                except StopForward:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return ({k: torch.cat(v) for k, v in ins.items()}, {k: torch.cat(v) for k, v in outs.items() if v})


def capture_inputs(model: nn.Module, images: torch.Tensor, block: Bridge) -> torch.Tensor:
    """The input of ``block`` for one batch of ``images``; the forward stops there."""
    return capture(model, images, [block], len(images), outputs=False)[0][block.name]


class BlockInputs:
    """Each block's input over the calibration batches (batch by batch), blocks taken in order:
    the previous block run again where it hands its output straight on, else a forward of the
    whole model that stops at the block. ``forget`` drops what is held (the model changed before it)."""

    def __init__(self, model: nn.Module, blocks: Sequence[Bridge], batches: Sequence[torch.Tensor], follows: list[bool]):
        self.model, self.blocks, self.batches, self.follows = model, blocks, batches, follows
        self._held: tuple[int, list[torch.Tensor]] | None = None

    def of(self, i: int) -> list[torch.Tensor]:
        if self._held is not None and self._held[0] == i:
            return self._held[1]
        if self.follows[i] and self._held is not None and self._held[0] == i - 1:
            with torch.no_grad():
                xs = [self.blocks[i - 1].forward(self.model, x) for x in self._held[1]]
        else:
            xs = [capture_inputs(self.model, x, self.blocks[i]) for x in self.batches]
        self._held = (i, xs)
        return xs

    def forget(self) -> None:
        self._held = None


def _as_module(model: nn.Module, block: Bridge) -> nn.Sequential:
    """The block as a model of its own (the same module objects, not copies)."""
    return nn.Sequential(*block.modules(model))


def layer_passes(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor],
                 float_model: nn.Module | None = None) -> Iterator[LayerPass]:
    """One ``LayerPass`` per named layer, in the given (execution) order. The caller may change the
    layer (its weights, its bias) before asking for the next pass: later passes see the change. A
    layer outside every block (run twice per forward) gets the whole model."""
    names = list(names)
    if not names:
        return
    with torch.no_grad(), quantizers_off(model):
        blocks = reconstruction_blocks(model, names, batches[0][:1])
    follows = follows_previous(model, blocks, batches[0][:1])
    block_of = {n: i for i, b in enumerate(blocks) for n in b.layers}
    inputs = BlockInputs(model, blocks, batches, follows)
    float_inputs = BlockInputs(float_model, blocks, batches, follows) if float_model is not None else None
    for name in names:
        i = block_of.get(name)
        if i is None:
            yield LayerPass(name, model, name, list(batches), float_model, list(batches) if float_model is not None else None)
            inputs.forget()  # block inputs held from before this layer changed are stale
            continue
        block = _as_module(model, blocks[i])
        local = {id(m): n for n, m in block.named_modules()}[id(model.get_submodule(name))]
        yield LayerPass(name, block, local, inputs.of(i), _as_module(float_model, blocks[i]) if float_model is not None else None,
                        float_inputs.of(i) if float_inputs is not None else None)
