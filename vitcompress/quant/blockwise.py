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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .bridge import Bridge, follows_previous
from .calibration import quantizers_off
from .reconstruction import capture_inputs, reconstruction_blocks


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


class _BlockInputs:
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
    inputs = _BlockInputs(model, blocks, batches, follows)
    float_inputs = _BlockInputs(float_model, blocks, batches, follows) if float_model is not None else None
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
