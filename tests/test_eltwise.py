"""The eltwise placement: MobileViT v2's residual adds, separable-attention products and norm inputs
quantized (what OpenVINO runs in int8), mirrored from timm's forwards and exported as Q/DQ."""
import copy

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.export import export_qdq
from vitcompress.quant import QuantConfig, quantize_
from vitcompress.quant.api import prepare
from vitcompress.quant.eltwise import ELTWISE_BLOCKS, eltwise_block
from vitcompress.quant.placement import CANDIDATES, default_placement_order, get_placement


@pytest.fixture(scope="module")
def mobilevitv2():
    torch.manual_seed(0)
    return timm.create_model("mobilevitv2_050", pretrained=False, num_classes=10).eval()


def _classes(model: nn.Module, short: str) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == short]


def test_quantized_forwards_compute_timm_s_own_while_their_quantizers_are_off(mobilevitv2):
    """Each forward in ELTWISE_BLOCKS mirrors timm's: with every quantizer off, the same numbers."""
    x = torch.randn(2, 3, 64, 64)
    model = copy.deepcopy(mobilevitv2)
    p = prepare(model, QuantConfig(placement="eltwise"))
    assert {type(model.get_submodule(n)).__name__ for n in p.eltwise} >= {
        "QuantLinearTransformerBlock", "QuantLinearSelfAttention", "MobileVitV2Block"}
    with torch.no_grad():
        assert torch.equal(model(x), mobilevitv2(x))


def test_operands_are_quantized_where_the_table_says_and_the_export_computes_the_simulation(mobilevitv2, tmp_path):
    model = copy.deepcopy(mobilevitv2)
    x = torch.randn(4, 3, 64, 64)
    result = quantize_(model, QuantConfig(placement="eltwise", act_symmetric=True), [x])
    blocks = _classes(mobilevitv2, "LinearTransformerBlock")
    stage_blocks = _classes(mobilevitv2, "MobileVitV2Block")
    assert blocks and set(blocks) | set(_classes(mobilevitv2, "LinearSelfAttention")) | set(stage_blocks) <= set(result.plan.eltwise)
    # the blocks' stream quantizers cover their own norms; the norm after each stack gets an input quantizer
    assert not any(n.endswith((".norm1", ".norm2")) for n in result.plan.eltwise)
    assert {f"{b}.norm" for b in stage_blocks} <= set(result.plan.eltwise)
    attn = model.get_submodule(f"{blocks[0]}.attn")
    for name in ("scores_quantizer", "value_quantizer"):  # non-negative by construction: unsigned, zero point 0
        q = getattr(attn, name)
        assert not q.spec.symmetric and int(q.zero_point) == 0 and q.mode == "quantize"
    assert attn.key_quantizer.spec.symmetric and model.get_submodule(f"{blocks[0]}").stream_quantizer1.mode == "quantize"
    assert all(model.get_submodule(f"{b}.conv_1x1").output_quantizer.mode == "quantize" for b in stage_blocks)

    path = tmp_path / "m.onnx"
    export_qdq(model, (3, 64, 64), path, {})
    quantize_nodes = [n for n in __import__("onnx").load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert any("stream_quantizer1" in n.name for n in quantize_nodes) and any("scores_quantizer" in n.name for n in quantize_nodes)
    # unoptimised, the exported graph computes exactly what the simulation does, up to float rounding
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        simulated = model(x).numpy()
    np.testing.assert_allclose(exported, simulated, atol=1e-3 * float(np.abs(simulated).max()))
    assert (exported.argmax(1) == simulated.argmax(1)).all()


def test_int8_operands_of_adds_and_products_ask_nothing_of_the_cpu(mobilevitv2, tmp_path):
    """With unsigned layer inputs (the candidate's scheme) no int8 activation reaches a dot product:
    the artifact's target follows its weights only; signed layer inputs are counted."""
    import onnx

    from vitcompress.export.onnx_export import NUMERICS_KEY

    x = torch.randn(2, 3, 64, 64)
    counts = {}
    for symmetric in (False, True):
        model = copy.deepcopy(mobilevitv2)
        quantize_(model, QuantConfig(placement="eltwise", act_symmetric=symmetric, reduce_range=True), [x])
        path = tmp_path / f"{symmetric}.onnx"
        numerics = export_qdq(model, (3, 64, 64), path, {})[NUMERICS_KEY]
        int8_quantizers = sum(n.op_type == "QuantizeLinear" and "stream_quantizer" in n.name for n in onnx.load(str(path)).graph.node)
        counts[symmetric] = (numerics["signed_activations"], numerics["target"], int8_quantizers)
    assert counts[False][0] == 0 and counts[False][1] == "portable" and counts[False][2] > 0
    assert counts[True][0] > 0 and counts[True][1] == "vnni"


def test_a_checkpoint_round_trip_recreates_every_operand_quantizer(mobilevitv2):
    from vitcompress.quant.api import quant_state, restore_quantized

    model = copy.deepcopy(mobilevitv2)
    x = torch.randn(2, 3, 64, 64)
    config = QuantConfig(placement="eltwise", act_symmetric=True, fold_batchnorm=False, fold_layer_scale=False)
    quantize_(model, config, [x])
    fresh = copy.deepcopy(mobilevitv2)
    restore_quantized(fresh, config, quant_state(model))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_the_placement_is_data_and_refuses_methods_it_cannot_serve(mobilevitv2):
    for qualname, entry in ELTWISE_BLOCKS.items():
        assert entry.reason and qualname.startswith("timm.")
    assert eltwise_block(nn.Linear(2, 2)) is None
    assert default_placement_order("openvino", "MobileViT v2", "avx512_vnni").order[0] == "eltwise"
    assert default_placement_order("onnxruntime", "MobileViT v2", "avx512_vnni").order[0] != "eltwise"
    assert get_placement(CANDIDATES["eltwise"].placement).eltwise and not CANDIDATES["eltwise"].act_symmetric
    with pytest.raises(VitcompressError, match="placement 'eltwise' is calibrated with minmax only, not mptq"):
        quantize_(copy.deepcopy(mobilevitv2), QuantConfig(placement="eltwise", method="mptq"), [torch.randn(1, 3, 64, 64)])


def test_a_conv_split_along_channels_exports_as_one_conv_per_part(mobilevitv2, tmp_path, monkeypatch):
    """OpenVINO splits the channels of a blocked conv output by a slow reference kernel (MobileViT v2's
    query/key/value): the artifact has no Split, and computes what the artifact with it computes."""
    import onnx

    from vitcompress.export import onnx_export

    torch.manual_seed(0)
    model = copy.deepcopy(mobilevitv2)
    x = torch.randn(4, 3, 64, 64)
    quantize_(model, QuantConfig(placement="eltwise"), [x])
    info = export_qdq(model, (3, 64, 64), tmp_path / "split.onnx", {})
    assert info["split_projections"] == len(_classes(mobilevitv2, "LinearSelfAttention"))
    assert not [n for n in onnx.load(str(tmp_path / "split.onnx")).graph.node if n.op_type == "Split"]
    monkeypatch.setattr(onnx_export, "split_projections", lambda proto: 0)
    export_qdq(model, (3, 64, 64), tmp_path / "whole.onnx", {})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs = []
    for name in ("split.onnx", "whole.onnx"):
        session = ort.InferenceSession(str(tmp_path / name), so, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5 * float(np.abs(outputs[1]).max()))
