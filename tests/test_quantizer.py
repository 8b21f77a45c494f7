import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.quant.observers import make_observer
from vitcompress.quant.spec import QuantSpec, fake_quantize, qparams_from_range, quantize_to_int


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_stay_in_range_and_error_is_bounded(bits, symmetric):
    x = torch.randn(64, 32) * 3 + 1
    spec = QuantSpec(bits, symmetric)
    scale, zp = qparams_from_range(x.min(), x.max(), spec)
    q = quantize_to_int(x, scale, zp, spec)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    err = (fake_quantize(x, scale, zp, spec) - x).abs().max()
    assert err <= scale / 2 + 1e-5  # inside the range the error is at most half a step


def test_zero_point_always_fits_and_zero_is_exact():
    spec = QuantSpec(8, symmetric=False)
    lo, hi = torch.tensor(2.0), torch.tensor(5.0)  # range entirely above 0: zero point would overflow
    scale, zp = qparams_from_range(lo, hi, spec)
    assert spec.qmin <= int(zp) <= spec.qmax
    assert fake_quantize(torch.zeros(1), scale, zp, spec).item() == 0.0


def test_per_channel_scales_follow_each_channel():
    w = torch.randn(4, 16) * torch.tensor([[0.1], [1.0], [10.0], [100.0]])
    spec = QuantSpec(8, True, per_channel=True, axis=0)
    obs = make_observer("minmax", spec)
    obs.update(w)
    scale, _ = obs.compute()
    assert scale.shape == (4,)
    assert torch.allclose(scale, w.abs().amax(1) / 127)


def test_bits_outside_range_are_rejected():
    with pytest.raises(VitcompressError):
        QuantSpec(bits=9)
    with pytest.raises(VitcompressError):
        QuantSpec(bits=1)


def test_mse_observer_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((20000,))
    spec = QuantSpec(4, symmetric=True)
    errs = {}
    for name in ("minmax", "mse", "percentile"):
        obs = make_observer(name, spec)
        obs.update(x)
        s, z = obs.compute()
        errs[name] = (fake_quantize(x, s, z, spec) - x).pow(2).mean().item()
    assert errs["mse"] < errs["minmax"]


def test_unknown_observer_is_a_clear_error():
    with pytest.raises(VitcompressError, match="unknown observer"):
        make_observer("nope", QuantSpec())
