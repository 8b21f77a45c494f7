"""The ``minmax`` method: the baseline every other method starts from."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .calibration import ShardMap, batch_shards, freeze_all, run_batches, set_mode
from .config import QuantConfig
from .modules import quantizers
from .registry import Progress, register_method




@register_method("minmax")
def calibrate_observers(model: nn.Module, config: QuantConfig, batches: Sequence[torch.Tensor], progress: Progress | None,
                        map_shards: ShardMap | None = None) -> dict:
    """Baseline PTQ: one calibration pass with the configured observers, then freeze.

    ``map_shards`` (a pool's map) runs the pass on copies of the model, one per shard of batches,
    and merges their statistics in shard order: exact (min-max: min of mins, max of maxes;
    percentile and MSE: their per-batch samples joined in batch order), so the scales are those of
    one pass. Observers that cannot merge run here."""
    set_mode(model, "observe")
    observers = dict((n, q._observer) for n, q in quantizers(model))
    sharded = map_shards is not None and len(batches) > 1 and all(hasattr(o, "merge") for o in observers.values())
    if sharded:
        shards = batch_shards(batches)
        for seen in map_shards(observe_shard, [(model, shard) for shard in shards]):
            for name, observer in seen.items():
                observers[name].merge(observer)
        if progress:
            progress(len(batches), len(batches))
    else:
        run_batches(model, batches, progress)
    freeze_all(model)
    return {"observers": {"weights": config.weight_observer, "activations": config.act_observer},
            "calibration_shards": len(shards) if sharded else 1}


def observe_shard(model: nn.Module, batches: Sequence[torch.Tensor]) -> dict:
    """In a worker, on its own copy of the model: the observers' statistics over ``batches``."""
    run_batches(model, batches)
    return {n: q._observer for n, q in quantizers(model)}
