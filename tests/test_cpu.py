"""--target-cpu: VNNI keeps full-range int8 weights (and int8 attention operands); AVX2 without VNNI gets 7-bit weights."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from vitcompress.cpu import resolve_target
from vitcompress.errors import VitcompressError
from vitcompress.export import export_qdq
from vitcompress.quant import QuantConfig, quantize_


def test_target_resolution():
    assert resolve_target("auto", {"avx2", "avx512_vnni"})["reduce_range"] is False
    assert resolve_target("auto", {"avx2", "fma"})["reduce_range"] is True
    assert resolve_target("avx2")["reduce_range"] is True and resolve_target("vnni")["reduce_range"] is False
    # int8 second operands of attention products only where int32 accumulation cannot saturate
    assert resolve_target("vnni")["signed_matmul_operands"] is True and resolve_target("avx2")["signed_matmul_operands"] is False
    with pytest.raises(VitcompressError, match="unknown --target-cpu"):
        resolve_target("arm")


@pytest.mark.parametrize("reduce_range, limit", [(False, 127), (True, 63)])
def test_reduce_range_weights_use_seven_bits(tmp_path, reduce_range, limit):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    quantize_(model, QuantConfig(reduce_range=reduce_range), [torch.randn(4, 3, 8, 8)])
    export_qdq(model, (3, 8, 8), tmp_path / "m.onnx", {})
    codes = [numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and t.dims and int(np.prod(t.dims)) > 8]
    assert codes, "no int8 weight codes found"
    peak = max(int(np.abs(c.astype(np.int32)).max()) for c in codes)
    assert peak <= limit + 1 and (reduce_range or peak >= 100)  # min-max weights reach the end of their grid
