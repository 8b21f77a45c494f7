"""Running a model over calibration images, and switching its quantizers: what every method shares."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitcompressError
from .modules import quantizers
from .registry import Progress
from .tracing import forward_with_hooks

ShardMap = Callable[[Callable, list], list]  # a pool's map: (function, argument tuples) -> results in order
SHARD_BATCHES = 2  # calibration batches per shard sent to a worker (fixed: never from the worker count)
# Module outputs a backward pass may keep, counted as the bytes every leaf module outputs for its
# images: autograd holds about four times that (inputs saved by each op, hook clones), so 1 GiB
# keeps a backward through CaiT-XXS at 224 px (137 MiB a image) near 4 GiB instead of the 18 GiB a
# 32-image batch took. Small inputs (32-px CIFAR-10 models: under 2 MiB a image) are not cut.
BACKWARD_BYTES = 1 << 30


def batch_shards(batches: Sequence) -> list:
    """``batches`` cut into consecutive shards of SHARD_BATCHES, the same for any number of workers."""
    return [batches[i:i + SHARD_BATCHES] for i in range(0, len(batches), SHARD_BATCHES)]


def map_or_here(fn: Callable, args: list[tuple], map_shards: ShardMap | None) -> list:
    """``fn(*a)`` for every argument tuple, on the workers when ``map_shards`` is given, else here; in order."""
    return map_shards(fn, args) if map_shards is not None else [fn(*a) for a in args]

def run_batches(model: nn.Module, batches: Sequence[torch.Tensor], progress: Progress | None = None) -> None:
    with torch.no_grad():
        for i, x in enumerate(batches):
            model(x)
            if progress:
                progress(i + 1, len(batches))


def batched_logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's outputs for ``images``, computed ``batch_size`` at a time without gradients."""
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def output_bytes_per_image(model: nn.Module, image: torch.Tensor) -> int:
    """Bytes of every leaf module's tensor output in one forward of ``image`` (one image)."""
    total = [0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    forward_with_hooks(model, image, [m.register_forward_hook(count) for m in model.modules() if next(m.children(), None) is None])
    return total[0]


def images_per_backward(model: nn.Module, image: torch.Tensor, wanted: int, budget: int | None = None) -> int:
    """How many images one backward pass may take: ``wanted``, fewer where their module outputs
    would exceed ``budget`` (default ``BACKWARD_BYTES``), at least one."""
    budget = BACKWARD_BYTES if budget is None else budget
    return max(1, min(wanted, budget // max(1, output_bytes_per_image(model, image[:1]))))


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Run the float model inside the block; every quantizer gets its mode back afterwards."""
    modes = {q: q.mode for _, q in quantizers(model)}
    for q in modes:
        q.mode = "off"
    try:
        yield
    finally:
        for q, mode in modes.items():
            q.mode = mode


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every quantizer off: the float network, same module names."""
    copy_ = copy.deepcopy(model)
    for _, q in quantizers(copy_):
        q.mode = "off"
    return copy_


def logits_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference ‖ candidate) of two batches of logits (or log-probabilities), mean per image."""
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean"))


def kl_and_agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """``logits_kl`` and the top-1 agreement (%) of two batches of logits."""
    return logits_kl(reference, logits), (logits.argmax(-1) == reference.argmax(-1)).float().mean().item() * 100


def freeze_named(name: str, quantizer: nn.Module) -> None:
    """Freeze one quantizer; a layer the calibration pass never reached is named in the error."""
    try:
        quantizer.freeze()
    except VitcompressError as e:
        layer = name.rsplit(".", 1)[0]
        raise VitcompressError(f"{layer}: {e} (the model may use its weight without calling the layer; "
                               f"keep it float with --skip '{layer}')") from None


def freeze_all(model: nn.Module) -> None:
    for name, q in quantizers(model):
        freeze_named(name, q)


def set_mode(model: nn.Module, mode: str) -> None:
    for _, q in quantizers(model):
        if mode == "observe":
            q.observe()
        else:
            q.mode = mode
