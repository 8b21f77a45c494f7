import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from vitcompress.cpu import compatibility, resolve_target, this_cpu
from vitcompress.data import load_tensor, sample, scan_images
from vitcompress.errors import VitcompressError
from vitcompress.export import export_qdq, int8_coverage, make_session, read_metadata, session_config
from vitcompress.export.onnx_export import INT8_QDQ_ALLOWED
from vitcompress.export.runtime import CpuMismatchWarning, run_session
from vitcompress.quant import QuantConfig, quantize_
from tests.conftest import VAL


def _export(loaded, calib_batches, cfg, path):
    m = copy.deepcopy(loaded.model)
    quantize_(m, cfg, calib_batches)
    info = export_qdq(m, loaded.preprocessing.input_size, path, {"k": "v"})
    return m, info


@pytest.mark.parametrize("target", ["auto", "portable"])
@pytest.mark.parametrize("bits", [8, 6])
def test_exported_qdq_agrees_with_torch_simulation(loaded, calib_batches, tmp_path, bits, target, record_property):
    """The artifact built for this CPU (auto), and the portable one, compute what the torch simulation does."""
    resolved = resolve_target(target)
    record_property("target", f"{target} -> {resolved['resolved']} on {resolved['built_on']['isa']}")  # which branch ran
    m, info = _export(loaded, calib_batches, QuantConfig(wbits=bits, abits=bits, reduce_range=resolved["reduce_range"]),
                      tmp_path / "q.onnx")
    assert info["folded_weight_quantizers"] == 26  # every Linear/Conv weight stored as integer codes
    assert compatibility(info["numerics"])["exact"] is True
    x = load_tensor(sample(scan_images(VAL), 500, 0), loaded.preprocessing)
    with torch.no_grad():
        ref = m(x).numpy()
    got = np.concatenate([run_session(make_session(tmp_path / "q.onnx"), b.numpy()) for b in x.split(100)])
    agreement = (ref.argmax(1) == got.argmax(1)).mean()
    assert agreement >= 0.99


def test_subbyte_weights_use_the_clipped_grid(loaded, calib_batches, tmp_path):
    _export(loaded, calib_batches, QuantConfig(wbits=4, abits=8, narrow_layer_bits=4), tmp_path / "q.onnx")
    model = onnx.load(str(tmp_path / "q.onnx"))
    int_inits = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int_inits
    for codes in int_inits:
        assert codes.min() >= -8 and codes.max() <= 7


def test_metadata_roundtrip(loaded, calib_batches, tmp_path):
    _export(loaded, calib_batches, QuantConfig(), tmp_path / "q.onnx")
    meta = read_metadata(tmp_path / "q.onnx")
    assert meta["k"] == "v"
    # what the integer kernels need of the CPU, read from the codes the file holds (full-range weights)
    assert meta["numerics"]["max_weight_code"] == 127 and meta["numerics"]["target"] == "vnni"


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


class _LayerScaleNet(torch.nn.Module):
    """Four layer scales: after a conv + BatchNorm, after a Linear, after a GELU (not foldable), and
    one whose producer's output also feeds the residual (folding would change it)."""

    def __init__(self):
        from timm.layers import LayerScale, LayerScale2d

        super().__init__()
        self.conv, self.bn, self.ls_bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), LayerScale2d(8, 0.1)
        self.conv2, self.act, self.ls_act = torch.nn.Conv2d(8, 8, 1), torch.nn.GELU(), LayerScale2d(8, 0.1)
        self.conv3, self.ls_shared = torch.nn.Conv2d(8, 8, 1), LayerScale2d(8, 0.1)
        self.fc, self.ls_fc = torch.nn.Linear(8, 4), LayerScale(4, 0.1)
        for ls in (self.ls_bn, self.ls_act, self.ls_shared, self.ls_fc):
            torch.nn.init.uniform_(ls.gamma, 0.05, 2.0)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.ls_bn(self.bn(self.conv(x)))
        x = self.ls_act(self.act(self.conv2(x)))
        y = self.conv3(x)
        x = y + self.ls_shared(y)
        return self.ls_fc(self.fc(x.mean((2, 3))))


def test_layer_scale_folding_is_exact_skips_unsafe_pairs_and_reloads(tmp_path):
    from vitcompress.quant.fold import fold_batchnorm, fold_layer_scale, prepare_folded_scales

    torch.manual_seed(0)
    m, x = _LayerScaleNet().eval(), torch.randn(2, 3, 8, 8)
    ref = m(x)
    scales = fold_layer_scale(m, x)
    assert scales == [("bn", "ls_bn"), ("fc", "ls_fc")]  # not after the GELU, not the shared output
    fold_batchnorm(m, x)  # carries ls_bn's gamma from the BatchNorm's affine into the conv
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    muls = [n for n in _onnx_nodes(m, x, tmp_path) if n.op_type == "Mul"]
    assert len(muls) == 2  # the two unfolded layer scales remain
    fresh = _LayerScaleNet().eval()
    prepare_folded_scales(fresh, scales)
    fresh.load_state_dict(m.state_dict())
    assert type(fresh.ls_fc).__name__ == "FoldedLayerScale" and torch.all(fresh.ls_fc.gamma == 1)
    torch.testing.assert_close(fresh(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(VitcompressError, match="layer scale"):
        prepare_folded_scales(fresh, [("fc", "missing")])


def _onnx_nodes(model, x, tmp_path):
    from vitcompress.export import export_float

    export_float(model, tuple(x.shape[1:]), tmp_path / "f.onnx", {}, simplify=False)
    return onnx.load(str(tmp_path / "f.onnx")).graph.node


def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.SiLU(),  # depthwise
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("bits", [8, 6])
def test_per_channel_activations_export_exactly(tmp_path, bits):
    """A depthwise conv's input quantized per channel (Q-HyViT's activation granularity) exports as
    per-axis Q/DQ, clipped to the b-bit grid, and onnxruntime computes what the simulation does."""
    from vitcompress.quant.spec import QuantSpec, qparams_from_range

    m = _conv_net()
    x = torch.randn(16, 3, 12, 12) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1)
    quantize_(m, QuantConfig(wbits=bits, abits=bits, fold_batchnorm=False), [x])
    aq = m[2].input_quantizer
    feats = m[1](m[0](x)).detach()
    aq.spec = QuantSpec(bits, False, True, 1)
    lo, hi = feats.amin(dim=(0, 2, 3)), feats.amax(dim=(0, 2, 3))
    aq.set_qparams(*qparams_from_range(lo * 0.7, hi * 0.7, aq.spec))  # clipped: values beyond the grid
    export_qdq(m, (3, 12, 12), tmp_path / "q.onnx", {})
    model = onnx.load(str(tmp_path / "q.onnx"))
    axes = [a.i for n in model.graph.node if n.op_type == "QuantizeLinear" for a in n.attribute if a.name == "axis"]
    assert 1 in axes
    with torch.no_grad():
        ref = m(x).numpy()
    got = run_session(make_session(tmp_path / "q.onnx"), x.numpy())
    assert np.abs(ref - got).max() <= 1e-4 * max(1.0, np.abs(ref).max())


class _OwnLinear(torch.nn.Linear):
    """A Linear subclass with its own forward: not safe to swap for the quantized Linear."""

    def forward(self, x):
        return super().forward(x) * 1.0


def test_a_skipped_linear_and_a_broken_integer_promise_are_reported(tmp_path, monkeypatch):
    from vitcompress.api import integer_promises_broken
    from vitcompress.export import int8_coverage
    from vitcompress.quant import placement

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 36, 16), torch.nn.ReLU(), _OwnLinear(16, 4)).eval()
    x = torch.randn(8, 3, 6, 6)
    result = quantize_(m, QuantConfig(fold_batchnorm=False), [x])
    assert result.summary()["kept_float_weighted_layers"] == ["5"]  # the subclass is named, not silently dropped
    export_qdq(m, (3, 6, 6), tmp_path / "q.onnx", {})
    cov = int8_coverage(tmp_path / "q.onnx")
    assert "3" not in cov["simulated_layers"]  # the plain Linear runs as an integer kernel
    assert "0" in cov["simulated_layers"]  # the conv has a float output: onnxruntime keeps it float
    assert any(i["quantized_inputs"] == 0 for i in cov["float_islands"])  # the skipped Linear is a float island
    assert integer_promises_broken(m, QuantConfig(), result.plan.weighted, cov) == []
    # a placement promising integer convs is caught: the runtime did not keep that promise
    monkeypatch.setitem(placement.PLACEMENTS, "convs-too", placement.Placement("convs-too", integer_kinds=("linear", "conv")))
    assert integer_promises_broken(m, QuantConfig(placement="convs-too"), result.plan.weighted, cov) == ["0"]


def test_int4_packing_halves_weight_storage_and_keeps_the_function(loaded, calib_batches, tmp_path):
    m = copy.deepcopy(loaded.model)
    quantize_(m, QuantConfig(wbits=4, abits=8, narrow_layer_bits=4), calib_batches)
    plain = export_qdq(m, loaded.preprocessing.input_size, tmp_path / "w4.onnx", {})
    packed = export_qdq(m, loaded.preprocessing.input_size, tmp_path / "w4p.onnx", {}, pack_int4=True)
    assert plain["int4_packed_weights"] == 0 and packed["int4_packed_weights"] == 26
    int4 = [i for i in onnx.load(str(tmp_path / "w4p.onnx")).graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) >= 26
    assert (tmp_path / "w4p.onnx").stat().st_size < 0.8 * (tmp_path / "w4.onnx").stat().st_size
    x = torch.cat(calib_batches).numpy()
    a = run_session(make_session(tmp_path / "w4.onnx"), x)
    b = run_session(make_session(tmp_path / "w4p.onnx"), x)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98 and np.abs(a - b).max() < 0.1


def test_speed_placement_integer_chains_and_family_table(tmp_path):
    """`speed` on a hybrid: SiLU gates quantized, the RGB stem float, convs fused as QLinearConv;
    EfficientFormer v2 keeps its talking-head convs float under `speed` only (the family table)."""
    import timm
    from torch import nn

    from vitcompress.export import int8_coverage
    from vitcompress.models import family_of
    from vitcompress.quant.placement import get_placement, plan

    torch.manual_seed(0)
    model = timm.create_model("mobilevitv2_050", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    result = quantize_(model, QuantConfig(placement="speed"), [x])
    assert result.plan.gated_silu and all(type(model.get_submodule(n)).__name__ == "QuantSiLU" for n in result.plan.gated_silu)
    assert "stem.conv" not in result.plan.weighted
    export_qdq(model, (3, 64, 64), tmp_path / "m.onnx", {})
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Sigmoid" in ops
    cov = int8_coverage(tmp_path / "m.onnx")
    assert cov["simulated_layers"] == [] and cov["integer_mac_share"] > 0.9

    ef = timm.create_model("efficientformerv2_s0", pretrained=False)
    family = family_of("efficientformerv2_s0")
    heads = {n for n, m in ef.named_modules() if "talking_head" in n and isinstance(m, nn.Conv2d)}
    assert heads
    speed = plan(ef, get_placement("speed"), family=family)
    partial = plan(ef, get_placement("partial"), family=family)
    assert heads <= set(speed.skipped) and not heads & set(speed.weighted)
    assert heads <= set(partial.weighted)


def test_weight_only_int4_linears_run_packed_and_are_labelled_weight_only(loaded, calib_batches, tmp_path):
    """--weight-format int4: 4-bit Linear weights become MatMulNBits (packed two per byte, float GEMM);
    same function as the int8-coded artifact, smaller file, and coverage calls them weight-only,
    neither integer nor simulated."""
    m = copy.deepcopy(loaded.model)
    quantize_(m, QuantConfig(wbits=4, abits=8), calib_batches)
    plain = export_qdq(m, loaded.preprocessing.input_size, tmp_path / "w4.onnx", {})
    nbits = export_qdq(m, loaded.preprocessing.input_size, tmp_path / "w4n.onnx", {}, weight_format="int4")
    linears = sum(isinstance(x, torch.nn.Linear) for x in m.modules())
    assert plain["weight_only_int4_matmuls"] == 0 and nbits["weight_only_int4_matmuls"] == linears
    ops = [n.op_type for n in onnx.load(str(tmp_path / "w4n.onnx")).graph.node]
    assert ops.count("MatMulNBits") == linears
    assert (tmp_path / "w4n.onnx").stat().st_size < 0.75 * (tmp_path / "w4.onnx").stat().st_size
    x = torch.cat(calib_batches).numpy()
    a = run_session(make_session(tmp_path / "w4.onnx"), x)
    b = run_session(make_session(tmp_path / "w4n.onnx"), x)
    # the same values through a float GEMM instead of an integer one: equal up to float summation
    # order, which can flip a rounding at a later quantizer for a few images
    assert np.median(np.abs(a - b)) < 1e-4 and (a.argmax(1) == b.argmax(1)).mean() >= 0.98
    cov, cov_plain = int8_coverage(tmp_path / "w4n.onnx"), int8_coverage(tmp_path / "w4.onnx")
    assert len(cov["weight_only_layers"]) == linears and cov_plain["weight_only_layers"] == []
    assert cov["simulated_layers"] == cov_plain["simulated_layers"]  # the Linears are not called simulated
    assert cov["integer_mac_share"] < 0.1 < cov_plain["integer_mac_share"]
    with pytest.raises(VitcompressError, match="unknown weight format"):
        export_qdq(m, loaded.preprocessing.input_size, tmp_path / "bad.onnx", {}, weight_format="int3")


def _optimized_zero_point_types(path, tmp_path, op_type: str) -> list[int]:
    """Element types of the B-operand zero points of ``op_type`` nodes in onnxruntime's optimized graph."""
    opt = tmp_path / f"{path.stem}.opt.onnx"
    make_session(path, 1, str(opt))
    g = onnx.load(str(opt)).graph
    inits = {i.name: i.data_type for i in g.initializer}
    b_zp = {"QLinearMatMul": 5, "MatMulIntegerToFloat": 5}[op_type]
    return [inits.get(n.input[b_zp]) for n in g.node if n.op_type == op_type and "attn" in n.name]


def test_signed_attention_operands_keep_every_value_and_reach_the_u8s8_kernels(loaded, calib_batches, tmp_path):
    m = copy.deepcopy(loaded.model)
    quantize_(m, QuantConfig(placement="speed"), calib_batches)
    size = loaded.preprocessing.input_size
    plain = export_qdq(m, size, tmp_path / "u8.onnx", {"k": "v"})
    signed = export_qdq(m, size, tmp_path / "s8.onnx", {"k": "v"}, signed_matmul_operands=True)
    attention_blocks = sum(1 for mod in m.modules() if hasattr(mod, "qk_matmul"))
    assert attention_blocks and signed["signed_matmul_operands"] == 2 * attention_blocks  # kᵀ and v of each block
    assert plain["signed_matmul_operands"] == 0
    assert session_config(tmp_path / "u8.onnx") == {} and session_config(tmp_path / "s8.onnx") == INT8_QDQ_ALLOWED
    # The session config travels with the artifact: onnxruntime keeps the int8 operands (without
    # it, its x86 default turns them back into uint8).
    s8, u8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8
    assert _optimized_zero_point_types(tmp_path / "s8.onnx", tmp_path, "QLinearMatMul") == [s8] * attention_blocks
    assert _optimized_zero_point_types(tmp_path / "u8.onnx", tmp_path, "QLinearMatMul") == [u8] * attention_blocks
    # Same grid values. Where int8 products accumulate in int32 (VNNI), the integer products are
    # exact, so the logits match; elsewhere the s8 artifact is flagged as inexact when opened.
    x = load_tensor(sample(scan_images(VAL), 64, 0), loaded.preprocessing).numpy()
    got_u8 = run_session(make_session(tmp_path / "u8.onnx"), x)
    if this_cpu()["int32_dot"]:
        got_s8 = run_session(make_session(tmp_path / "s8.onnx"), x)
        np.testing.assert_allclose(got_s8, got_u8, rtol=0, atol=1e-5)
    else:
        with pytest.warns(CpuMismatchWarning, match="rebuild it with --target-cpu portable"):
            make_session(tmp_path / "s8.onnx")


def test_speed_keeps_small_image_convs_float_and_quantizes_patch_embeddings():
    from torch import nn

    from vitcompress.quant.placement import IMAGE_CONV_MIN_REDUCTION, get_placement, plan, reduction_size

    model = nn.ModuleDict({"stem": nn.Conv2d(3, 8, 3), "patch_embed": nn.Conv2d(3, 8, 16, stride=16), "fc": nn.Linear(8, 4)})
    assert reduction_size(model["stem"]) < IMAGE_CONV_MIN_REDUCTION <= reduction_size(model["patch_embed"])
    assert plan(model, get_placement("speed")).weighted == ["patch_embed", "fc"]
    assert plan(model, get_placement("partial")).weighted == ["stem", "patch_embed", "fc"]


def test_speed_wide_keeps_every_small_reduction_conv_float_and_promises_integer_for_the_rest(tmp_path):
    from torch import nn

    from vitcompress.quant.placement import get_placement, plan, reduction_size

    block = nn.Sequential(nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 7, padding=3, groups=64), nn.Conv2d(64, 32, 1),
                          nn.Conv2d(32, 32, 1), nn.Conv2d(32, 64, 3, padding=1, groups=16), nn.Conv2d(64, 64, 3, padding=1)).eval()
    # products per output: 64, 49 (7x7 depthwise), 64, 32 (1x1 over 32 channels), 18 (grouped), 576
    assert [reduction_size(m) for m in block] == [64, 49, 64, 32, 18, 576]
    wide = plan(block, get_placement("speed-wide"))
    assert wide.weighted == ["0", "2", "5"] and wide.float_modules == {"Conv2d": 3}
    assert plan(block, get_placement("speed")).weighted == ["0", "1", "2", "3", "4", "5"]

    torch.manual_seed(0)
    quantized = copy.deepcopy(block)
    x = torch.randn(8, 64, 12, 12)
    quantize_(quantized, QuantConfig(placement="speed-wide"), [x], None)
    path = tmp_path / "wide.onnx"
    export_qdq(quantized, (64, 12, 12), path, {})
    coverage = int8_coverage(path)
    assert not coverage["simulated_layers"]  # the wide-reduction convs run as QLinearConv
    assert 0 < coverage["integer_mac_share"] < 1  # the three small-reduction convs are float islands
    assert list(coverage["float_mac_share_by_op"]) == ["Conv"]
    assert coverage["float_mac_share_by_op"]["Conv"] == pytest.approx(1 - coverage["integer_mac_share"])


class _TwoReadersNet(torch.nn.Module):
    """One LayerNorm output read by two Linears (ConViT's qk and v, PVT v2's q and kv)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 32, 8, 8)
        self.norm = torch.nn.LayerNorm(32)
        self.q, self.kv = torch.nn.Linear(32, 32), torch.nn.Linear(32, 64)
        self.head = torch.nn.Linear(96, 10)

    def forward(self, x):
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(torch.cat([self.q(t), self.kv(t)], -1).mean(1))


def test_a_signed_activation_read_by_two_layers_runs_in_integer_kernels(tmp_path, cpu_target):
    torch.manual_seed(0)
    m = _TwoReadersNet().eval()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    quantize_(m, QuantConfig(act_symmetric=True, reduce_range=cpu_target["reduce_range"]), calib)
    info = export_qdq(m, (3, 32, 32), tmp_path / "q.onnx", {"k": "v"})
    assert info["unsigned_shared_activations"] >= 1
    cov = int8_coverage(tmp_path / "q.onnx")
    assert not [n for n in cov["simulated_layers"] if n in ("q", "kv")], cov["simulated_layers"]
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(run_session(make_session(tmp_path / "q.onnx"), x.numpy()), ref, rtol=0, atol=1e-3 * np.abs(ref).max())
