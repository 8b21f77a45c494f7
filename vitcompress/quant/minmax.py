"""The ``minmax`` method: the baseline every other method starts from."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .calibration import run_batches, set_mode
from .config import QuantConfig
from .modules import quantizers
from .registry import Progress, register_method


@register_method("minmax")
def calibrate_observers(model: nn.Module, config: QuantConfig, batches: Sequence[torch.Tensor], progress: Progress | None) -> dict:
    """Baseline PTQ: one calibration pass with the configured observers, then freeze."""
    set_mode(model, "observe")
    run_batches(model, batches, progress)
    for _, q in quantizers(model):
        q.freeze()
    return {"observers": {"weights": config.weight_observer, "activations": config.act_observer}}
