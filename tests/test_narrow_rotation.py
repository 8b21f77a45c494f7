"""Narrow layers keep 8 bits below W8 (QuantConfig.narrow_layer_bits); residual-stream rotation is exact."""
import copy

import pytest
import timm
import torch
from torch import nn

from vitcompress import QuantConfig
from vitcompress.quant.api import quantize_
from vitcompress.quant.rotation import find_streams, mean_keeping_rotation, rotate_residual_streams


def _small_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),                # stem: reads the image, 27 products per output
        nn.Conv2d(16, 16, 3, padding=1, groups=16),    # depthwise: 9
        nn.Conv2d(16, 64, 1),                          # 1x1 over 16 channels: 16
        nn.Conv2d(64, 64, 1),                          # 1x1 over 64 channels: 64, not narrow
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10))


def _widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.weight_quantizer.spec.bits, m.input_quantizer.spec.bits)
            for n, m in model.named_modules() if hasattr(m, "weight_quantizer")}


@pytest.mark.parametrize("narrow_bits, expected", [
    (8, {"0": (8, 8), "1": (8, 8), "2": (8, 8), "3": (4, 4), "5": (4, 4)}),
    (4, {"0": (4, 8), "1": (4, 4), "2": (4, 4), "3": (4, 4), "5": (4, 4)}),  # the stem's input: image_input_bits
])
def test_narrow_layers_keep_their_width_below_it_and_the_report_names_them(narrow_bits, expected):
    model = _small_convnet().eval()
    config = QuantConfig(wbits=4, abits=4, narrow_layer_bits=narrow_bits, fold_batchnorm=False)
    result = quantize_(model, config, [torch.randn(8, 3, 4, 4)])
    assert _widths(model) == expected
    reported = result.summary().get("narrow_layer_bits")
    if narrow_bits == 4:
        assert reported is None
    else:  # MACs per image: 16·16·27, 16·16·9, 64·16·16, 64·16·64, 10·1024
        assert reported["bits"] == 8 and reported["layers"] == ["0", "1", "2"]
        narrow, total = 16 * 16 * (27 + 9) + 64 * 16 * 16, 16 * 16 * (27 + 9) + 64 * 16 * 16 + 64 * 16 * 64 + 10 * 1024
        assert reported["mac_share"] == round(narrow / total, 4)


def test_at_w8a8_the_narrow_rule_changes_nothing():
    model = _small_convnet().eval()
    result = quantize_(model, QuantConfig(fold_batchnorm=False), [torch.randn(8, 3, 4, 4)])
    assert set(_widths(model).values()) == {(8, 8)}
    assert "narrow_layer_bits" not in result.summary()


def test_mptq_uniform_widths_keep_the_narrow_patch_embedding_at_8_bits(loaded, calib_batches):
    model = copy.deepcopy(loaded.model).eval()
    quantize_(model, QuantConfig(method="mptq", wbits=4, abits=4, method_options={"parts": []}), calib_batches)
    widths = _widths(model)
    assert widths["patch_embed.proj"] == (8, 8)  # 3 x 4 x 4 = 48 products per output
    assert widths["blocks.0.mlp.fc1"] == (4, 4)


def test_mean_keeping_rotation_is_orthogonal_and_keeps_the_mean_direction():
    for n in (64, 80):  # a Hadamard width and another
        q = mean_keeping_rotation(n, 3)
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-10)
        assert torch.allclose(q @ torch.ones(n, dtype=q.dtype), torch.ones(n, dtype=q.dtype), atol=1e-10)
        assert (q.abs() > 1e-6).float().mean() > 0.9  # dense: every channel mixed
        assert torch.equal(q, mean_keeping_rotation(n, 3))


@pytest.mark.parametrize("arch, kwargs", [
    ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}),
    ("mobilevit_xxs", {}),
])
def test_rotating_the_residual_streams_leaves_the_model_function_unchanged(arch, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs).eval()
    for m in model.modules():  # non-trivial LayerNorm affines, so folding them is exercised
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    x = torch.randn(2, 3, 32, 32) if arch.startswith("deit") else torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        qkv_before = next(m for m in model.modules() if hasattr(m, "qkv")).qkv.weight.clone()
    report = rotate_residual_streams(model, x)
    assert len(report["rotated"]) == len(find_streams(model)) >= 1 and not report["not_exact"]
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4 * before.abs().max().item())
        assert not torch.allclose(next(m for m in model.modules() if hasattr(m, "qkv")).qkv.weight, qkv_before)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.LayerNorm))


def test_a_model_without_a_prenorm_residual_stream_is_left_as_it_is():
    model = _small_convnet().eval()
    state = copy.deepcopy(model.state_dict())
    assert rotate_residual_streams(model, torch.randn(2, 3, 4, 4)) == {"rotated": [], "not_exact": []}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_mptq_with_the_rotate_part_reports_it(loaded, calib_batches):
    model = copy.deepcopy(loaded.model).eval()
    result = quantize_(model, QuantConfig(method="mptq", method_options={"parts": ["rotate", "sqb"]}), calib_batches)
    assert result.method_info["mptq"]["rotation"]["rotated"] == [{"stream": "model", "width": 128}]


@pytest.mark.parametrize("config, expected", [
    (QuantConfig(method="qhyvit"), "partial-wide"),  # W8A8: narrow convs float
    (QuantConfig(method="qhyvit", wbits=6, abits=6), "partial"),  # below: they keep 8 bits instead
    (QuantConfig(method="mptq", method_options={"target_bits": 6}), "partial"),  # mixed precision decides widths itself
])
def test_the_placement_a_method_runs_on_by_default(config, expected):
    from vitcompress.api import method_placement

    assert method_placement(config) == expected


def test_partial_wide_keeps_narrow_convs_float_and_quantizes_the_rest():
    model = _small_convnet().eval()
    result = quantize_(model, QuantConfig(placement="partial-wide", fold_batchnorm=False), [torch.randn(8, 3, 4, 4)])
    assert set(_widths(model)) == {"3", "5"}
    assert result.plan.float_modules["Conv2d"] == 3


def test_layer_macs_count_per_image_when_a_layer_sees_images_times_patches():
    from vitcompress.quant.tracing import layer_macs

    class Patches(nn.Module):  # MobileViT's unfold: (B, 4, 8) -> (B·2, 2, 8) before the Linear
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(x.reshape(-1, 2, 8))

    assert layer_macs(Patches(), ["fc"], torch.randn(3, 4, 8)) == {"fc": 4 * 8 * 5}
