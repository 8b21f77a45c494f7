"""A fast subset of the conformance benchmark (benchmarks/bench_conformance.py): four families in tiny
configurations, quantized with the speed placement, exported, and compared with their torch
simulation on bundled images, so support for them cannot break silently."""
import copy

import numpy as np
import pytest
import torch

from vitcompress.data import Preprocessing, load_tensor, sample, scan_images
from vitcompress.export import export_qdq, int8_coverage, make_session
from vitcompress.export.runtime import run_session
from vitcompress.models import family_of
from vitcompress.quant import QuantConfig, quantize_
from tests.conftest import CALIB, VAL

# family -> (timm architecture, tiny configuration, input side)
TINY = {
    "DeiT": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    "Swin Transformer": ("swin_tiny_patch4_window7_224",
                         dict(img_size=64, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=32), 64),
    # its qkv is computed from the layer's weight unless routed through the module (quant/routing.py)
    "Swin Transformer v2": ("swinv2_tiny_window8_256",
                            dict(img_size=64, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=32), 64),
    "MobileViT v1": ("mobilevit_xxs", {}, 64),
    "LeViT": ("levit_128s", dict(img_size=64), 64),
}


@pytest.mark.parametrize("family", TINY)
def test_family_quantizes_exports_and_runs_integer_kernels(family, tmp_path, cpu_target):
    import timm

    arch, kwargs, side = TINY[family]
    assert family_of(arch) == family
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs).eval()
    prep = Preprocessing(input_size=(3, side, side), mean=(0.5,) * 3, std=(0.25,) * 3, resize_mode="exact")
    calib = load_tensor(sample(scan_images(CALIB), 16, 0), prep)
    quantized = copy.deepcopy(model)
    result = quantize_(quantized, QuantConfig(placement="speed", reduce_range=cpu_target["reduce_range"]), calib.split(16), None, family)
    assert result.plan.weighted
    path = tmp_path / "q.onnx"
    export_qdq(quantized, prep.input_size, path, {})

    coverage = int8_coverage(path)
    assert coverage["integer_mac_share"] > 0.5, coverage["float_islands"][:3]
    assert not coverage["simulated_layers"]  # the speed placement's promise: no quantized layer on a float kernel

    x = load_tensor(sample(scan_images(VAL), 100, 0), prep)
    with torch.no_grad():
        simulated, reference = quantized(x).numpy(), model(x).numpy()
    exported = run_session(make_session(path), x.numpy())
    # Float rounding differs between the two (a value at a rounding boundary lands on the neighbouring
    # grid point), so a few logits move; a missing or misplaced quantizer moves them as far as
    # quantization itself does.
    export_error = np.abs(exported - simulated).mean()
    quantization_error = np.abs(simulated - reference).mean()
    agreement = (exported.argmax(1) == simulated.argmax(1)).mean()
    assert export_error < 0.35 * quantization_error and agreement >= 0.97


def test_a_layer_the_model_bypasses_is_routed_through_its_module_or_named():
    """Swin v2 computes qkv with F.linear on the layer's weight: routed, it is calibrated and stays
    exact in float; a bypass no rule covers names the layer in a one-line error."""
    import timm

    from vitcompress.errors import VitcompressError
    from vitcompress.quant.routing import route_module_calls

    model = timm.create_model(TINY["Swin Transformer v2"][0], num_classes=10, **TINY["Swin Transformer v2"][1]).eval()
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    assert len(route_module_calls(model)) == 2 and torch.allclose(model(x), reference, atol=1e-6)

    class Bypass(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.fc = torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Linear(8, 10)

        def forward(self, x):
            return torch.nn.functional.linear(self.stem(x).mean((2, 3)), self.fc.weight, self.fc.bias)

    with pytest.raises(VitcompressError, match=r"^fc: an observer saw no data.*--skip 'fc'"):
        quantize_(Bypass().eval(), QuantConfig(), [x])


def test_volo_fold_exports(tmp_path):
    """VOLO's outlooker attention folds with an output size computed from the input (Col2Im)."""
    from timm.models.volo import VOLO

    from vitcompress.export import export_float

    model = VOLO(layers=(1, 1, 1, 1), img_size=64, embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2), num_classes=10).eval()
    path = tmp_path / "volo.onnx"
    export_float(model, (3, 64, 64), path, {})
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference = model(x).numpy()
    assert np.abs(run_session(make_session(path), x.numpy()) - reference).max() < 1e-4


def test_a_layer_shared_between_blocks_reloads_from_a_quantized_checkpoint(tmp_path):
    """CoaT registers one conv position encoding under several names; its checkpoint must reload."""
    import timm

    from vitcompress import QuantizeJob, load, quantize
    from vitcompress.models import FAMILIES

    assert FAMILIES["coat_"] == "CoaT"
    model = timm.create_model("coat_lite_tiny", num_classes=10, img_size=64)
    names = {n for n, m in model.named_modules(remove_duplicate=False)} - {n for n, _ in model.named_modules()}
    assert any(n.endswith("cpe.proj") for n in names)  # the premise: a module under two names
    ckpt = tmp_path / "coat.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "q"
    quantize(QuantizeJob(out=out, model="coat_lite_tiny", checkpoint=ckpt, config=QuantConfig(placement="speed"),
                         calib_dir=CALIB, calib_size=8, latency_rounds=1))
    reloaded = load(checkpoint=out / "model.int8.pth")
    x = load_tensor(sample(scan_images(VAL), 4, 0), reloaded.preprocessing)
    with torch.no_grad():
        assert reloaded.model(x).shape == (4, 10)
