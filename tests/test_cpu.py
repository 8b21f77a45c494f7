"""CPU profiles: ISA detection, --target-cpu, and whether an artifact is exact on a CPU — both branches, on any machine."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from vitcompress.cpu import compatibility, detect_isa, flags_executable, resolve_target, target_of_numerics
from vitcompress.errors import VitcompressError
from vitcompress.export import artifact_numerics, export_qdq
from vitcompress.quant import QuantConfig, quantize_


VNNI_FLAGS = {"avx2", "avx512bw", "avx512_vnni"}
AVX2_FLAGS = {"avx2", "fma"}


def test_isa_detection_reads_the_flags_best_first():
    assert detect_isa(VNNI_FLAGS).name == "avx512_vnni" and detect_isa({"avx2", "avx_vnni"}).name == "avx_vnni"
    assert detect_isa({"avx2", "avx512bw", "amx_int8"}).name == "amx"
    assert detect_isa({"avx2", "avx512bw"}).name == "avx512" and not detect_isa({"avx512bw"}).int32_dot
    assert detect_isa(AVX2_FLAGS).name == "avx2" and not detect_isa(AVX2_FLAGS).int32_dot
    assert detect_isa({"asimd", "asimddp"}).name == "arm_dotprod" and detect_isa({"asimddp"}).int32_dot
    assert detect_isa(set()).name == "unknown" and not detect_isa(set()).int32_dot


def test_flags_the_process_cannot_execute_are_dropped():
    host = frozenset({"sse2", "fma", "avx", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni"})
    agreeing = {"AVX": True, "AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": True}
    assert flags_executable(host, agreeing) == host and flags_executable(host, {}) == host
    # an AVX2-only view of that host (an emulator, a masking hypervisor): CPUID denies AVX-512, so
    # the AVX/AMX flags it does not confirm go too (avx_vnni included), and the ISA is AVX2
    haswell = {"AVX": True, "AVX2": True, "AVX512F": False, "AVX512BW": False, "AVX512VNNI": False}
    seen = flags_executable(host, haswell)
    assert seen == {"sse2", "fma", "avx", "avx2"} and detect_isa(seen).name == "avx2"
    # AVX-VNNI without AVX-512 (Alder Lake): nothing /proc/cpuinfo lists is denied, all kept
    alder = frozenset({"avx", "avx2", "avx_vnni"})
    assert detect_isa(flags_executable(alder, haswell)).name == "avx_vnni"


def test_target_resolution_both_branches():
    vnni, avx2 = resolve_target("auto", VNNI_FLAGS), resolve_target("auto", AVX2_FLAGS)
    assert vnni["resolved"] == "vnni" and vnni["reduce_range"] is False and vnni["signed_matmul_operands"] is True
    assert avx2["resolved"] == "portable" and avx2["reduce_range"] is True and avx2["signed_matmul_operands"] is False
    assert vnni["built_on"]["isa"] == "avx512_vnni" and avx2["built_on"]["isa"] == "avx2"
    for name in ("portable", "avx2"):  # avx2 is the older name of portable
        assert resolve_target(name)["resolved"] == "portable" and resolve_target(name)["reduce_range"] is True
    assert resolve_target("vnni")["reduce_range"] is False
    with pytest.raises(VitcompressError, match="unknown --target-cpu"):
        resolve_target("arm")


def test_compatibility_flags_full_range_artifacts_on_cpus_without_int32_dot_products():
    full = {"max_weight_code": 127, "signed_matmul_operands": 0, "target": target_of_numerics(127, 0)}
    signed = {"max_weight_code": 60, "signed_matmul_operands": 12, "target": target_of_numerics(60, 12)}
    portable = {"max_weight_code": 64, "signed_matmul_operands": 0, "target": target_of_numerics(64, 0)}
    assert (full["target"], signed["target"], portable["target"]) == ("vnni", "vnni", "portable")
    for numerics in (full, signed):
        on_avx2 = compatibility(numerics, AVX2_FLAGS)
        assert on_avx2["exact"] is False and "--target-cpu portable" in on_avx2["note"] and "avx2" in on_avx2["note"]
        assert compatibility(numerics, VNNI_FLAGS) == {**compatibility(numerics, VNNI_FLAGS), "exact": True, "note": ""}
    for flags in (AVX2_FLAGS, VNNI_FLAGS, {"asimddp"}):
        assert compatibility(portable, flags)["exact"] is True
    assert compatibility(None, AVX2_FLAGS)["exact"] is None  # a float artifact needs nothing


@pytest.mark.parametrize("target", ["vnni", "portable"])
def test_exported_numerics_follow_the_target(tmp_path, target):
    """What the file holds decides its target: full-range codes need int32 dot products, 7-bit ones do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    quantize_(model, QuantConfig(reduce_range=resolve_target(target)["reduce_range"]), [torch.randn(4, 3, 8, 8)])
    info = export_qdq(model, (3, 8, 8), tmp_path / "m.onnx", {})
    assert info["numerics"]["target"] == target == artifact_numerics(tmp_path / "m.onnx")["target"]
    assert compatibility(info["numerics"], AVX2_FLAGS)["exact"] is (target == "portable")


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
