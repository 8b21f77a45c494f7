import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from vitcompress.data import load_tensor, sample, scan_images
from vitcompress.export import export_qdq, make_session, read_metadata
from vitcompress.export.runtime import run_session
from vitcompress.quant import QuantConfig, quantize_
from tests.conftest import VAL


def _export(loaded, calib_batches, cfg, path):
    m = copy.deepcopy(loaded.model)
    quantize_(m, cfg, calib_batches)
    info = export_qdq(m, loaded.preprocessing.input_size, path, {"k": "v"})
    return m, info


@pytest.mark.parametrize("bits", [8, 6])
def test_exported_qdq_agrees_with_torch_simulation(loaded, calib_batches, tmp_path, bits):
    m, info = _export(loaded, calib_batches, QuantConfig(wbits=bits, abits=bits), tmp_path / "q.onnx")
    assert info["folded_weight_quantizers"] == 26  # every Linear/Conv weight stored as integer codes
    x = load_tensor(sample(scan_images(VAL), 500, 0), loaded.preprocessing)
    with torch.no_grad():
        ref = m(x).numpy()
    got = np.concatenate([run_session(make_session(tmp_path / "q.onnx"), b.numpy()) for b in x.split(100)])
    agreement = (ref.argmax(1) == got.argmax(1)).mean()
    assert agreement >= 0.99


def test_subbyte_weights_use_the_clipped_grid(loaded, calib_batches, tmp_path):
    _export(loaded, calib_batches, QuantConfig(wbits=4, abits=8), tmp_path / "q.onnx")
    model = onnx.load(str(tmp_path / "q.onnx"))
    int_inits = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int_inits
    for codes in int_inits:
        assert codes.min() >= -8 and codes.max() <= 7


def test_metadata_roundtrip(loaded, calib_batches, tmp_path):
    _export(loaded, calib_batches, QuantConfig(), tmp_path / "q.onnx")
    assert read_metadata(tmp_path / "q.onnx") == {"k": "v"}


def test_coverage_reports_skipped_layers_as_float_islands(loaded, calib_batches, tmp_path):
    from vitcompress.export import int8_coverage

    _export(loaded, calib_batches, QuantConfig(skip=("head", "blocks.5.mlp.fc2")), tmp_path / "q.onnx")
    cov = int8_coverage(tmp_path / "q.onnx")
    islands = {i["node"] for i in cov["float_islands"]}
    assert any("head" in n for n in islands) and any("blocks.5/mlp/fc2" in n for n in islands)
    assert not any("blocks.0/mlp/fc1" in n for n in islands)  # quantized Linear runs in an integer kernel
    assert 0.5 < cov["integer_mac_share"] < 1.0


def test_batchnorm_folding_keeps_function_and_reloads(tmp_path):
    """Hybrid model (convs + BatchNorm): folding is exact, and a quantized checkpoint reloads."""
    import timm

    from vitcompress.quant.fold import fold_batchnorm

    m = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    ref = m(x)
    pairs = fold_batchnorm(m, x)
    assert len(pairs) == sum(isinstance(b, torch.nn.BatchNorm2d) for b in m.modules())
    assert torch.allclose(m(x), ref, atol=1e-4)
    assert all("BatchNormalization" != n.op_type for n in _onnx_nodes(m, x, tmp_path))


def _onnx_nodes(model, x, tmp_path):
    from vitcompress.export import export_float

    export_float(model, tuple(x.shape[1:]), tmp_path / "f.onnx", {}, simplify=False)
    return onnx.load(str(tmp_path / "f.onnx")).graph.node
