"""Reading and writing checkpoints, below every pipeline: a float model, a pruned one (its smaller
layout re-created first) or a quantized one (its folded layout and quantizers re-applied)."""
from __future__ import annotations

from pathlib import Path

import torch

from .models import LoadedModel, family_of, load_model
from .quant import QuantConfig, restore_quantized
from .quant.fold import prepare_folded_layout, prepare_folded_scales


def load(model: str | None = None, checkpoint: str | Path | None = None, pretrained: bool = True) -> LoadedModel:
    """load_model, plus re-applying the quantizers of a checkpoint written by `quantize`."""
    loaded = load_model(model, checkpoint, pretrained, before_load=_layout_for_checkpoint)
    if loaded.quant_state is not None:
        state = loaded.quant_state
        cfg = QuantConfig(**{**state["config"], "skip": tuple(state["config"].get("skip", ()))})
        restore_quantized(loaded.model, cfg, state["quantizers"], family_of(loaded.arch))
    return loaded


def _layout_for_checkpoint(model: torch.nn.Module, checkpoint: dict) -> None:
    """Shape a fresh model like the checkpoint's: pruned structure (heads / MLP widths) first,
    then BatchNorm-folded weights of a quantized checkpoint."""
    if checkpoint.get("prune_state") is not None:
        from .prune.structure import apply_prune_state

        apply_prune_state(model, checkpoint["prune_state"])
    quant_state = checkpoint.get("quant_state") or {}
    prepare_folded_scales(model, [tuple(p) for p in quant_state.get("folded_scales") or []])
    prepare_folded_layout(model, [tuple(p) for p in quant_state.get("folded_pairs") or []])
    if checkpoint.get("quant_state") is not None:
        _add_biases(model, checkpoint.get("state_dict") or {})


def _add_biases(model: torch.nn.Module, state: dict) -> None:
    """Zero biases where a quantized checkpoint has one and the fresh layer has none: BatchNorm
    folding gives a bias to convs built without one, and smoothing (MPTQ's SQ-b) moves a channel
    shift into the bias of a Linear built without one (Swin's patch merging, a qkv without bias)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        layer = modules.get(name)
        if leaf == "bias" and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and layer.bias is None:
            layer.bias = torch.nn.Parameter(torch.zeros(value.shape, dtype=layer.weight.dtype))


def prune_extra(model: torch.nn.Module) -> dict:
    """The pruned structure a model was loaded with, so its compressed checkpoint reloads too."""
    from .prune.structure import PRUNE_STATE_ATTR

    state = getattr(model, PRUNE_STATE_ATTR, None)
    return {"prune_state": state} if state is not None else {}
