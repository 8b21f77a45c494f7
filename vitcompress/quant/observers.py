"""Observers: turn calibration statistics into a quantization range.

Every observer sees the same calls (``update`` per batch, ``compute`` once) and returns the
scale and zero point for its ``QuantSpec``. Registered by name so configs stay plain strings.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import VitcompressError
from ..registry import lookup
from .spec import QuantSpec, fake_quantize, qparams_from_range

OBSERVERS: dict[str, Callable[..., "Observer"]] = {}


def register_observer(name: str):
    def deco(cls):
        OBSERVERS[name] = cls
        return cls

    return deco


def make_observer(name: str, spec: QuantSpec) -> "Observer":
    return lookup(OBSERVERS, name, "observer")(spec)


def _reduce_dims(x: torch.Tensor, spec: QuantSpec) -> list[int]:
    return [d for d in range(x.dim()) if not (spec.per_channel and d == spec.axis % x.dim())]


class Observer:
    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running min and max over all calibration batches."""

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        dims = _reduce_dims(x, self.spec)
        lo, hi = torch.amin(x, dim=dims), torch.amax(x, dim=dims)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def compute(self):
        if self.lo is None:
            raise VitcompressError("an observer saw no data: the calibration pass did not reach this layer")
        return qparams_from_range(self.lo, self.hi, self.spec)

    def merge(self, other: "MinMaxObserver") -> None:
        """Fold in another observer's statistics (from other images): min of mins, max of maxes, exactly."""
        for name in ("lo", "hi"):
            theirs, mine = getattr(other, name), getattr(self, name)
            if theirs is not None:
                setattr(self, name, theirs if mine is None else (torch.minimum if name == "lo" else torch.maximum)(mine, theirs))


class _SampleObserver(Observer):
    """Keeps a bounded, deterministic subsample of values (per channel when per_channel)."""

    per_batch = 1 << 15  # values kept per row and batch

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.chunks: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.spec.per_channel:
            x = x.movedim(self.spec.axis, 0).reshape(x.shape[self.spec.axis], -1)
        else:
            x = x.reshape(1, -1)
        # A fixed per-batch budget keeps memory bounded whatever the calibration size.
        stride = max(1, -(-x.shape[1] // self.per_batch))
        self.chunks.append(x[:, ::stride])

    def merge(self, other: "_SampleObserver") -> None:
        """Take in another copy's samples (exact: merged in batch order, the samples are one pass's)."""
        self.chunks.extend(other.chunks)

    def samples(self) -> torch.Tensor:
        if not self.chunks:
            raise VitcompressError("an observer saw no data: the calibration pass did not reach this layer")
        return torch.cat(self.chunks, dim=1)


@register_observer("percentile")
class PercentileObserver(_SampleObserver):
    """Range from the 0.01% / 99.99% percentiles: ignores rare outliers."""

    percentile = 99.99

    def compute(self):
        s = self.samples()
        q = self.percentile / 100.0
        hi = torch.quantile(s, q, dim=1)
        lo = torch.quantile(s, 1.0 - q, dim=1)
        if not self.spec.per_channel:
            lo, hi = lo[0], hi[0]
        return qparams_from_range(lo, hi, self.spec)


@register_observer("mse")
class MSEObserver(_SampleObserver):
    """Shrinks the min-max range by a searched factor that minimises the quantization MSE."""

    grid = torch.linspace(0.3, 1.0, 36)

    def compute(self):
        s = self.samples()
        lo0, hi0 = s.amin(dim=1), s.amax(dim=1)
        best_err = torch.full_like(lo0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        row_spec = QuantSpec(self.spec.bits, self.spec.symmetric, self.spec.per_channel, axis=0)
        for r in self.grid:
            scale, zp = qparams_from_range(lo0 * r, hi0 * r, row_spec)
            if not self.spec.per_channel:
                scale, zp = scale.view(-1, 1), zp.view(-1, 1)
            err = (fake_quantize(s, scale, zp, row_spec) - s).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo0 * r, best_lo)
            best_hi = torch.where(better, hi0 * r, best_hi)
        if not self.spec.per_channel:
            best_lo, best_hi = best_lo[0], best_hi[0]
        return qparams_from_range(best_lo, best_hi, self.spec)
