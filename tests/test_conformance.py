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
    "MobileViT v1": ("mobilevit_xxs", {}, 64),
    "LeViT": ("levit_128s", dict(img_size=64), 64),
}


@pytest.mark.parametrize("family", TINY)
def test_family_quantizes_exports_and_runs_integer_kernels(family, tmp_path):
    import timm

    arch, kwargs, side = TINY[family]
    assert family_of(arch) == family
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs).eval()
    prep = Preprocessing(input_size=(3, side, side), mean=(0.5,) * 3, std=(0.25,) * 3, resize_mode="exact")
    calib = load_tensor(sample(scan_images(CALIB), 16, 0), prep)
    quantized = copy.deepcopy(model)
    result = quantize_(quantized, QuantConfig(placement="speed"), calib.split(16), None, family)
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
