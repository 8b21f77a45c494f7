import copy

import torch
from torch import nn

from vitcompress.quant import QuantConfig, quantize_
from vitcompress.quant.bias_correction import correct_bias, float_output_means


def _means(model, x):
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o.detach().mean(dim=(0, 2, 3))))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def test_bias_correction_restores_every_layers_float_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.GELU(),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(32, 3, 8, 8)
    float_means = _means(model, x)
    quantize_(model, QuantConfig(wbits=4, abits=4, narrow_layer_bits=4, fold_batchnorm=False), [x])
    before = _means(model, x)
    shift = max(float((before[n] - float_means[n]).abs().max()) for n in float_means)
    assert shift > 1e-3  # 4-bit quantization does move the means
    corrected = correct_bias(model, ["0", "2", "4"], [x[:16], x[16:]])
    assert corrected == ["0", "2", "4"]
    after = _means(model, x)
    for n in float_means:  # exact in expectation over the calibration images, downstream included
        assert torch.allclose(after[n], float_means[n], atol=1e-5)


def test_bias_correction_after_rewritten_weights_targets_the_float_model():
    # GPTQ stores rounded weights, so "quantizers off" is no longer the float model afterwards:
    # the float means must be taken before, or the rounding's mean shift stays uncorrected.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.rand(32, 3, 8, 8)  # positive mean, like images: a weight shift moves the output mean
    float_means = _means(model, x)
    quantize_(model, QuantConfig(wbits=4, abits=8, narrow_layer_bits=4, fold_batchnorm=False), [x])
    taken_before = float_output_means(model, ["0", "2"], [x])
    with torch.no_grad():
        model[0].weight.add_(0.05)  # a weight rewrite with a mean shift, as rounding can leave
    stale = copy.deepcopy(model)
    correct_bias(model, ["0", "2"], [x], taken_before)
    correct_bias(stale, ["0", "2"], [x])  # "float" taken now: includes the rewrite
    after, after_stale = _means(model, x), _means(stale, x)
    for n in float_means:
        assert torch.allclose(after[n], float_means[n], atol=1e-5)
    assert max(float((after_stale[n] - float_means[n]).abs().max()) for n in float_means) > 0.1


def test_block_by_block_passes_correct_exactly_as_the_whole_model_does(loaded, calib_batches):
    """Each layer's output mean comes from running only its block on the block's captured input:
    the same biases as a whole-model pass per layer."""
    from vitcompress.quant.bias_correction import _output_means

    quantized = copy.deepcopy(loaded.model)
    quantize_(quantized, QuantConfig(wbits=4, abits=6), calib_batches)
    names = [n for n, m in quantized.named_modules() if hasattr(m, "weight_quantizer")][:12]
    float_means = float_output_means(quantized, names, calib_batches)
    whole, blockwise = copy.deepcopy(quantized), copy.deepcopy(quantized)
    for name in names:
        layer = whole.get_submodule(name)
        with torch.no_grad():
            layer.bias -= (_output_means(whole, {name: layer}, calib_batches)[name] - float_means[name]).to(layer.bias.dtype)
    assert correct_bias(blockwise, names, calib_batches, float_means) == names
    for name in names:
        assert torch.equal(whole.get_submodule(name).bias, blockwise.get_submodule(name).bias), name
        assert not torch.equal(whole.get_submodule(name).bias, quantized.get_submodule(name).bias), name
