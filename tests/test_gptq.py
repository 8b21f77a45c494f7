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


def _conv_output_error(conv: torch.nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> float:
    ref = conv(x)
    with torch.no_grad():
        saved = conv.weight.clone()
        conv.weight.copy_(weight)
        out = conv(x)
        conv.weight.copy_(saved)
    return float((out - ref).detach().pow(2).mean())


def test_gptq_conv_dense_and_depthwise_beat_nearest_rounding():
    """Convs are rounded against their unfolded patches (dense) or per channel (depthwise)."""
    from vitcompress.quant import QuantConfig, quantize_
    from vitcompress.quant.gptq import gptq_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1, groups=16))
    # correlated channels and smooth maps (as real feature maps are): the case where compensation pays
    base = torch.nn.functional.interpolate(torch.randn(64, 2, 4, 4), size=12, mode="bilinear")
    x = torch.cat([base, base, base, base], 1) + 0.05 * torch.randn(64, 8, 12, 12)
    quantize_(model, QuantConfig(wbits=3, abits=8, narrow_layer_bits=3), [x])
    originals = {n: m.weight.detach().clone() for n, m in model.named_children()}
    nearest = {n: m.weight_quantizer(m.weight).detach() for n, m in model.named_children()}
    inputs = {"0": x, "1": model[0](x).detach()}
    done = gptq_layers(model, ["0", "1"], [x])
    assert done == ["0", "1"]
    for name, layer in model.named_children():
        rounded = layer.weight.detach().clone()
        assert torch.equal(layer.weight_quantizer(rounded), rounded)  # exactly on the grid
        with torch.no_grad():
            layer.weight.copy_(originals[name])
        layer.weight_quantizer.mode, layer.input_quantizer.mode = "off", "off"
        err_gptq = _conv_output_error(layer, rounded, inputs[name])
        err_nearest = _conv_output_error(layer, nearest[name], inputs[name])
        assert err_gptq < 0.8 * err_nearest, (name, err_gptq, err_nearest)


def test_float_target_compensates_upstream_error():
    """With the float model given, a layer is rounded towards the float model's output: when its
    input arrives distorted (here by a quantized, rounded layer before it), the output error against
    the float model is lower than plain GPTQ's, which only matches the layer's own float output."""
    import copy

    from vitcompress.quant import QuantConfig, quantize_
    from vitcompress.quant.gptq import gptq_layers
    from vitcompress.quant.calibration import float_copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    x = torch.randn(512, 4) @ torch.randn(4, 16) + 0.1 * torch.randn(512, 16)
    quantize_(model, QuantConfig(wbits=3, abits=8, narrow_layer_bits=3), [x])
    reference = float_copy(model)
    with torch.no_grad():
        want = reference(x)
    errors = {}
    for target in ("own output", "float model"):
        m = copy.deepcopy(model)
        gptq_layers(m, ["0", "1"], [x], reference if target == "float model" else None)
        with torch.no_grad():
            errors[target] = float((m(x) - want).pow(2).mean())
        assert torch.equal(m[1].weight_quantizer(m[1].weight), m[1].weight)  # still exactly on the grid
    assert errors["float model"] < 0.8 * errors["own output"], errors


def test_float_target_of_a_depthwise_conv_is_each_channels_ridge_fit():
    from vitcompress.quant.gptq import DAMPENING, _input_rows, float_output_target

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    x = torch.randn(6, 4, 8, 8)
    x_q = 0.9 * x + 0.01 * torch.randn_like(x)  # the quantized input: shrunk upstream, plus noise
    rows, rows_q = (_input_rows(conv, t).double() for t in (x, x_q))  # (channels, rows, 9)
    h = rows_q.transpose(1, 2) @ rows_q
    cross = (rows - rows_q).transpose(1, 2) @ rows_q
    w = conv.weight.detach().reshape(4, 9).double()
    target = float_output_target(w, h, cross)
    for c in range(4):  # per channel: argmin ||X w - X̃ w*||² + λ ||w* - w||², λ the GPTQ dampening
        lam = DAMPENING * torch.diagonal(h[c]).mean()
        a = torch.cat([rows_q[c], lam.sqrt() * torch.eye(9, dtype=torch.float64)])
        b = torch.cat([rows[c] @ w[c], lam.sqrt() * w[c]])
        assert torch.allclose(target[c], torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1), atol=1e-8)
    float_out = rows @ w.unsqueeze(-1)
    err_plain = (rows_q @ w.unsqueeze(-1) - float_out).pow(2).sum()
    err_target = (rows_q @ target.unsqueeze(-1) - float_out).pow(2).sum()
    assert err_target < 0.1 * err_plain  # the shrinkage is undone; only the noise is left


def test_act_order_rounds_high_energy_inputs_first_and_lowers_the_error():
    """When the strongest inputs come last, natural order leaves nothing to absorb their error;
    act-order rounds them first. Both stay exactly on the grid."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    mix = torch.randn(12, 48, generator=g)
    x = (torch.randn(4096, 12, generator=g) @ mix + 0.1 * torch.randn(4096, 48, generator=g)) * torch.linspace(0.1, 3.0, 48)
    q = _quantizer(w, 4)
    h = x.t() @ x
    natural = gptq_round(w, h, q)
    ordered = gptq_round(w, h, q, act_order=True)
    assert torch.equal(fake_quantize(ordered, q.scale, q.zero_point, q.spec), ordered)
    err = {k: float((x @ (w - r).t()).pow(2).mean()) for k, r in (("natural", natural), ("ordered", ordered))}
    assert err["ordered"] < 0.8 * err["natural"], err


def test_statistics_passes_stop_after_the_layer_s_last_call_in_a_forward():
    """GPTQ's and bias correction's per-layer passes skip the layers after the one they need; a layer
    run twice per forward (a shared module) still sees both calls."""
    from torch import nn

    from vitcompress.quant.tracing import StopAfter

    class SharedTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.after = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.after(self.shared(self.shared(x)))

    model, calls = SharedTwice(), []
    model.shared.register_forward_hook(lambda *_: calls.append("shared"))
    model.after.register_forward_hook(lambda *_: calls.append("after"))
    run = StopAfter(model.shared)
    x = torch.randn(2, 4)
    run(model, x)  # the first forward runs whole and counts
    run(model, x)
    run.remove()
    assert calls == ["shared", "shared", "after", "shared", "shared"] and run.calls_per_forward == 2


def test_block_by_block_statistics_round_exactly_as_the_whole_model_does_in_fewer_forwards(loaded, calib_batches):
    """Each block's input is captured once (or is the previous block's output, run again) and only
    the block runs per layer: the rounding is bit-identical to asking the whole model for every
    layer's input, with far fewer passes through the model's stem."""
    import copy

    from vitcompress.quant import QuantConfig, quantize_
    from vitcompress.quant.calibration import float_copy
    from vitcompress.quant.bridge import follows_previous
    from vitcompress.quant.gptq import _round_layer, gptq_layers
    from vitcompress.quant.blockwise import reconstruction_blocks
    from vitcompress.quant.calibration import quantizers_off

    quantized = copy.deepcopy(loaded.model)
    quantize_(quantized, QuantConfig(wbits=4, abits=8), calib_batches)
    # the stem and the first four blocks: enough for chains and for the count of passes
    names = [n for n, m in quantized.named_modules() if hasattr(m, "weight_quantizer")
             and not (n.startswith("blocks.") and int(n.split(".")[1]) >= 4) and not n.startswith("head")]
    float_model = float_copy(quantized)
    with torch.no_grad(), quantizers_off(quantized):
        blocks = reconstruction_blocks(quantized, names, calib_batches[0][:1])
    follows = follows_previous(quantized, blocks, calib_batches[0][:1])
    # the position embedding is added between the stem and the first block; the blocks then chain
    assert [b.name for b in blocks][:2] == ["patch_embed", "blocks.0"] and follows[:3] == [False, False, True]
    assert len(blocks) == 5 and all(follows[2:])

    def stem_calls(run) -> int:
        calls = []
        handle = model.patch_embed.register_forward_hook(lambda *_: calls.append(1))
        try:
            run()
        finally:
            handle.remove()
        return len(calls)

    model = whole = copy.deepcopy(quantized)
    whole_calls = stem_calls(lambda: [_round_layer(whole, n, calib_batches, float_model, True, None) for n in names])
    model = blockwise = copy.deepcopy(quantized)
    block_calls = stem_calls(lambda: gptq_layers(blockwise, names, calib_batches, float_model, act_order=True))
    for name in names:
        assert torch.equal(whole.get_submodule(name).weight, blockwise.get_submodule(name).weight), name
        assert not torch.equal(whole.get_submodule(name).weight, quantized.get_submodule(name).weight), name
    assert block_calls * 5 < whole_calls, (block_calls, whole_calls)
