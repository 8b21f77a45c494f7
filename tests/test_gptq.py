"""GPTQ rounding: on the weight grid, and a lower output error than nearest rounding."""
import torch

from vitcompress.quant.gptq import gptq_round
from vitcompress.quant.modules import TensorQuantizer
from vitcompress.quant.spec import QuantSpec, fake_quantize, qparams_from_range


def _quantizer(w: torch.Tensor, bits: int) -> TensorQuantizer:
    spec = QuantSpec(bits, symmetric=True, per_channel=True, axis=0)
    q = TensorQuantizer(spec)
    q.set_qparams(*qparams_from_range(w.amin(1), w.amax(1), spec))
    return q


def test_gptq_is_on_grid_and_beats_nearest_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    # correlated inputs (as activations are): the case where compensation pays
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 64, generator=g) + 0.1 * torch.randn(2048, 64, generator=g)
    q = _quantizer(w, 4)
    nearest = fake_quantize(w, q.scale, q.zero_point, q.spec)
    rounded = gptq_round(w, x.t() @ x, q, block=16)  # several blocks: the lazy updates are exercised
    assert torch.equal(fake_quantize(rounded, q.scale, q.zero_point, q.spec), rounded)  # exactly on the grid
    err_nearest = (x @ (w - nearest).t()).pow(2).mean()
    err_gptq = (x @ (w - rounded).t()).pow(2).mean()
    assert err_gptq < 0.5 * err_nearest, (float(err_gptq), float(err_nearest))


def test_gptq_ignores_dead_inputs():
    w = torch.randn(8, 6)
    x = torch.randn(256, 6)
    x[:, 2] = 0  # an input that never fires
    q = _quantizer(w, 6)
    rounded = gptq_round(w, x.t() @ x, q)
    assert torch.isfinite(rounded).all() and torch.all(rounded[:, 2] == 0)
