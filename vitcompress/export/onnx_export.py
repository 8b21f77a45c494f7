"""Float and QDQ ONNX export with preprocessing and provenance in the metadata.

The quantized export runs the fake-quant model under ``onnx_export_mode`` so every quantizer
becomes QuantizeLinear/DequantizeLinear with the calibrated scale and zero point. Weight
quantizers are then folded: their QuantizeLinear on a constant is replaced by the int8 codes as an
initializer feeding DequantizeLinear (the layout onnxruntime fuses into integer kernels, and 4x
smaller on disk).
"""
from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..cpu import target_of_numerics
from ..errors import VitcompressError
from ..registry import lookup
from ..fileio import atomic_path
from ..quant.modules import onnx_export_mode, snapped_weights

OPSET = 20  # >= 18 for MobileViTv2's Col2Im; 20 writes GELU as one Gelu node (the Erf pattern breaks under Q/DQ)
METADATA_KEY = "vitcompress"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Metadata entry: onnxruntime session config entries the artifact needs to run as exported.
SESSION_CONFIG_KEY = "onnxruntime_session_config"
# onnxruntime's x86 default rewrites every int8 Q/DQ pair of an activation to uint8
# (QDQS8ToU8Transformer); this entry keeps the int8 operands ``sign_activation_matmul_operands`` made.
INT8_QDQ_ALLOWED = {"session.qdqisint8allowed": "1"}
NUMERICS_KEY = "numerics"  # what the integer kernels need of the CPU (see integer_numerics)


@torch.onnx.symbolic_helper.parse_args("v", "v", "v", "is", "is", "is")
def _col2im(g, x, output_size, kernel_size, dilation: list[int], padding: list[int], stride: list[int]):
    """aten::col2im (``F.fold``) as ONNX Col2Im over two spatial axes. torch's own symbolic reads the
    number of axes off ``output_size``'s static shape, which an (H, W) computed from the input's
    shape does not have (VOLO's outlooker attention), and fails; fold is always 2-D."""
    return g.op("Col2Im", x, output_size, kernel_size, dilations_i=dilation or [1, 1],
                pads_i=[p for p in padding for _ in range(2)] or [0, 0, 0, 0], strides_i=stride or [1, 1])


torch.onnx.register_custom_op_symbolic("aten::col2im", _col2im, 18)


def _torch_to_onnx(model: nn.Module, input_size: tuple[int, int, int]) -> onnx.ModelProto:
    buf = io.BytesIO()
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (x,), buf, dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VitcompressError(f"ONNX export failed: {msg[:300]}") from None
    return onnx.load_from_string(buf.getvalue())


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        return (simplified, True) if ok else (model, False)
    except Exception:
        return model, False


def _const_value(name: str, inits: dict, consts: dict) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in consts:
        return consts[name]
    return None


def _attr(node: onnx.NodeProto, name: str, default):
    """A node's attribute value, or ``default`` where it has none."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def fold_weight_quantizers(model: onnx.ModelProto) -> int:
    """Replace QuantizeLinear(constant float) with constant integer codes; returns how many."""
    g = model.graph
    inits, consts = _graph_constants(g)
    folded, keep = 0, []
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            x = _const_value(n.input[0], inits, consts)
            scale = _const_value(n.input[1], inits, consts)
            zp = _const_value(n.input[2], inits, consts) if len(n.input) > 2 else np.zeros((), np.uint8)
            if x is not None and scale is not None and zp is not None:
                axis = _attr(n, "axis", 1)
                shape = [1] * x.ndim
                if scale.ndim == 1 and scale.size > 1:
                    shape[axis % x.ndim] = -1
                s = scale.reshape(shape) if scale.ndim else scale
                z = zp.reshape(shape).astype(np.int32) if zp.ndim else zp.astype(np.int32)
                info = np.iinfo(zp.dtype)
                q = np.clip(np.rint(x.astype(np.float32) / s) + z, info.min, info.max).astype(zp.dtype)
                g.initializer.append(numpy_helper.from_array(q, n.output[0]))
                folded += 1
                continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    _fold_weight_transposes(model)
    _remove_unused(model)
    return folded


# the MAC-carrying ops of an exported graph (integer coverage counts their MACs)
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulNBits"})
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Each tensor's producing node."""
    return {o: n for n in g.node for o in n.output}


def readers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each tensor's reading nodes, in graph order."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            found.setdefault(i, []).append(n)
    return found


def _dataflow(g: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], Counter]:
    """Each tensor's producing node, and how many node inputs read each tensor."""
    return producers(g), Counter(i for n in g.node for i in n.input)


def _fold_weight_transposes(model: onnx.ModelProto) -> None:
    """DQ(int const) -> Transpose becomes DQ(transposed int const): the exporter writes Linear
    weights as a Transpose before MatMul, which would hide the weight from onnxruntime's fusions."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers = _dataflow(g)
    drop = []
    for t in g.node:
        if t.op_type != "Transpose":
            continue
        dq = producer.get(t.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or consumers.get(dq.output[0]) != 1:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        perm = list(_attr(t, "perm", list(range(q.ndim))[::-1]))
        name = dq.input[0] + "_t"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q.transpose(perm)), name))
        dq.input[0] = name
        axis_attr = next((a for a in dq.attribute if a.name == "axis"), None)
        if axis_attr is not None:
            axis_attr.i = perm.index(axis_attr.i % q.ndim)
        dq.output[0] = t.output[0]
        drop.append(t)
    for t in drop:
        g.node.remove(t)


def _graph_constants(g: onnx.GraphProto) -> tuple[dict, dict]:
    """Initializers by name, and the values of Constant nodes (and of Identity nodes over either)."""
    inits = {i.name: i for i in g.initializer}
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    for n in g.node:  # the exporter shares equal buffers (e.g. zero points) through Identity
        if n.op_type == "Identity":
            v = _const_value(n.input[0], inits, consts)
            if v is not None:
                consts[n.output[0]] = v
    return inits, consts


def split_projections(model: onnx.ModelProto) -> int:
    """A Conv whose output feeds nothing but a Split along channels becomes one Conv per part (its
    weight, per-channel weight scales and bias sliced), and the Split goes; returns how many.

    Why: OpenVINO's CPU plugin splits the channels of a conv output held in its blocked layout with
    its reference kernel (MobileViT v2's query/key/value split: 2.5 ms of its 12-ms fp32 run, and
    of int8 runs where the conv reads a blocked tensor; docs/quantization.md). Exact: each part's
    outputs are computed from the same input, weights and grid."""
    g = model.graph
    inits, consts = _graph_constants(g)
    producer, uses = _dataflow(g)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id of the Split -> the Convs that replace it
    dropped: set[int] = set()
    for split in (n for n in g.node if n.op_type == "Split"):
        conv = producer.get(split.input[0])
        if conv is None or conv.op_type != "Conv" or uses[conv.output[0]] != 1 or _attr(conv, "group", 1) != 1:
            continue
        if _attr(split, "axis", 0) not in (1, -3):
            continue
        sizes = _const_value(split.input[1], inits, consts) if len(split.input) > 1 and split.input[1] else _attr(split, "split", None)
        if sizes is None or len(sizes) != len(split.output):
            continue
        weight = producer.get(conv.input[1])  # DequantizeLinear(int codes, scale, zero point), or none: a float weight
        if weight is not None and weight.op_type == "DequantizeLinear":
            arrays = [_const_value(i, inits, consts) for i in weight.input]
            per_channel = any(a is not None and a.size > 1 for a in arrays[1:])
            if any(a is None for a in arrays) or (per_channel and _attr(weight, "axis", 1) != 0):
                continue
        elif conv.input[1] in inits:
            arrays = [numpy_helper.to_array(inits[conv.input[1]])]
        else:
            continue
        bias = _const_value(conv.input[2], inits, consts) if len(conv.input) > 2 and conv.input[2] else None
        if bias is None and len(conv.input) > 2 and conv.input[2]:
            continue
        parts, start = [], 0
        for i, (size, out) in enumerate(zip((int(v) for v in sizes), split.output)):
            part = slice(start, start + size)
            start += size
            names = []
            for k, a in enumerate(arrays):  # codes and, per channel, scales and zero points
                name = f"{conv.name}_part{i}_{k}"
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(a[part] if a.size > 1 else a), name))
                names.append(name)
            inputs = [conv.input[0], names[0]]
            if weight is not None and weight.op_type == "DequantizeLinear":
                dq_out = f"{conv.name}_part{i}_weight"
                parts.append(helper.make_node("DequantizeLinear", names, [dq_out], name=f"{weight.name}_part{i}",
                                              **({"axis": 0} if per_channel else {})))
                inputs[1] = dq_out
            if bias is not None:
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias[part]), f"{conv.name}_part{i}_bias"))
                inputs.append(f"{conv.name}_part{i}_bias")
            parts.append(helper.make_node("Conv", inputs, [out], name=f"{conv.name}_part{i}",
                                          **{a.name: helper.get_attribute_value(a) for a in conv.attribute}))
        replaced[id(split)] = parts
        dropped.add(id(conv))
    if not replaced:
        return 0
    nodes = []
    for n in g.node:
        if id(n) in dropped:
            continue
        nodes += replaced.get(id(n), [n])
    del g.node[:]
    g.node.extend(nodes)
    _remove_unused(model)
    return len(replaced)


def sign_activation_matmul_operands(model: onnx.ModelProto) -> int:
    """Move the second operand of activation-by-activation MatMuls (q·kᵀ's kᵀ, attn·v's v) from the
    uint8 grid to the int8 grid: codes and zero point shifted by -128, so every dequantized value is
    unchanged. onnxruntime's x86 integer GEMMs multiply uint8 by int8 natively (VNNI); uint8 by
    uint8 takes a slower path (measured 2x slower on attention-sized products). Only for VNNI
    targets: without VNNI, full-range int8 operands can saturate AVX2's int16 pair sums (see
    ``vitcompress.cpu``). The artifact then needs ``INT8_QDQ_ALLOWED`` in its session config.
    Returns how many operands were moved."""
    g = model.graph
    inits, consts = _graph_constants(g)
    producer, uses = _dataflow(g)
    moved = 0
    for mm in g.node:
        if mm.op_type != "MatMul":
            continue
        dq = producer.get(mm.input[1])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or uses[dq.output[0]] != 1 or uses[q.output[0]] != 1:
            continue  # a weight (folded codes, no QuantizeLinear) or a shared activation
        zq = _const_value(q.input[2], inits, consts) if len(q.input) > 2 else None
        zdq = _const_value(dq.input[2], inits, consts) if len(dq.input) > 2 else None
        if zq is None or zdq is None or zq.dtype != np.uint8 or zdq.dtype != np.uint8 or zq.size != 1 or not np.array_equal(zq, zdq):
            continue
        name = q.output[0] + "_zero_point_int8"
        g.initializer.append(numpy_helper.from_array((zq.astype(np.int16) - 128).astype(np.int8), name))
        q.input[2] = dq.input[2] = name
        moved += 1
    _remove_unused(model)
    return moved


def unsign_shared_activations(model: onnx.ModelProto) -> int:
    """Move an activation quantized on the int8 grid and read by several layers (ConViT's qk and v,
    PVT v2's q and kv on one LayerNorm output) to the uint8 grid: codes and zero point shifted by
    +128, so every dequantized value is unchanged. onnxruntime's x86 kernels take int8 weights with
    uint8 activations only; it makes this move itself for an activation read once, but not for a
    shared one, which then stays a float MatMul on dequantized values. Only activations whose every
    reader is a layer with a constant weight are moved (activation-by-activation products keep
    their grid, see ``sign_activation_matmul_operands``). Returns how many were moved."""
    g = model.graph
    inits, consts = _graph_constants(g)
    producer, uses = _dataflow(g)
    reading = readers(g)

    def weight_layer_input(dq: onnx.NodeProto) -> bool:
        def constant_weight(name: str) -> bool:
            w = producer.get(name)
            return w is not None and w.op_type == "DequantizeLinear" and (w.input[0] in inits or w.input[0] in consts)
        return all(r.op_type in ("MatMul", "Gemm", "Conv") and len(r.input) > 1 and r.input[0] == dq.output[0]
                   and constant_weight(r.input[1]) for r in reading.get(dq.output[0], []))

    moved = 0
    for q in g.node:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        dqs = reading.get(q.output[0], [])
        zq = _const_value(q.input[2], inits, consts)
        if zq is None or zq.dtype != np.int8 or zq.size != 1 or not dqs:
            continue
        if not all(d.op_type == "DequantizeLinear" and len(d.input) > 2 and np.array_equal(_const_value(d.input[2], inits, consts), zq)
                   for d in dqs):
            continue
        if len(dqs) + sum(uses[d.output[0]] for d in dqs) <= 2 or not all(weight_layer_input(d) for d in dqs):
            continue  # read once (onnxruntime moves it itself) or read by an activation product
        name = q.output[0] + "_zero_point_uint8"
        g.initializer.append(numpy_helper.from_array((zq.astype(np.int16) + 128).astype(np.uint8), name))
        q.input[2] = name
        for d in dqs:
            d.input[2] = name
        moved += 1
    _remove_unused(model)
    return moved


def _remove_unused(model: onnx.ModelProto) -> None:
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    changed = True
    while changed:
        changed = False
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
            used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
            changed = True
    keep_init = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_init)


def _set_metadata(model: onnx.ModelProto, metadata: dict) -> None:
    del model.metadata_props[:]
    helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    model.producer_name = "vitcompress"


def stored_metadata(path: str | Path) -> dict | None:
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise VitcompressError(f"cannot read ONNX file {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    return next((json.loads(p.value) for p in m.metadata_props if p.key == METADATA_KEY), None)


def read_metadata(path: str | Path) -> dict:
    """The preprocessing/provenance dict stored in an artifact by ``export``."""
    metadata = stored_metadata(path)
    if metadata is None:
        raise VitcompressError(f"{path} carries no vitcompress metadata (preprocessing unknown); it was not exported by vitcompress")
    return metadata


def integer_numerics(model: onnx.ModelProto, signed_operands: int) -> dict:
    """What the artifact's integer kernels need of the CPU, read from what it holds: its largest
    int8 weight code and its int8 activation operands (see ``vitcompress.cpu``)."""
    inits = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    peak = 0
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            codes = numpy_helper.to_array(inits[n.input[0]])
            if codes.size:
                peak = max(peak, int(np.abs(codes.astype(np.int32)).max()))
    # activations quantized on the signed grid (symmetric activations, or the operands moved by
    # sign_activation_matmul_operands) that a product reads: int8·int8 products, exact only with
    # int32 accumulation (int8 operands of adds and elementwise products need nothing of the CPU)
    all_inits, consts = _graph_constants(model.graph)
    reading = readers(model.graph)
    signed_activations = 0
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2:
            zp = _const_value(n.input[2], all_inits, consts)
            reached = [r.output[0] for r in reading.get(n.output[0], []) if r.op_type == "DequantizeLinear"]
            feeds_product = False
            while reached and not feeds_product:  # through layout ops, which change no value
                t = reached.pop()
                feeds_product = any(r.op_type in COMPUTE_OPS for r in reading.get(t, []))
                reached += [r.output[0] for r in reading.get(t, []) if r.op_type in LAYOUT_OPS]
            signed_activations += int(zp is not None and zp.dtype == np.int8 and feeds_product)
    return {"max_weight_code": peak, "signed_matmul_operands": signed_operands, "signed_activations": signed_activations,
            "target": target_of_numerics(peak, max(signed_operands, signed_activations))}


def artifact_numerics(path: str | Path) -> dict | None:
    """The numerics an artifact recorded at export (None: a float model or an older export)."""
    return (stored_metadata(path) or {}).get(NUMERICS_KEY)


def session_config(path: str | Path) -> dict[str, str]:
    """The onnxruntime session config entries an artifact was exported for ({} for other files)."""
    return dict((stored_metadata(path) or {}).get(SESSION_CONFIG_KEY, {}))


def update_metadata(path: str | Path, updates: dict) -> None:
    """Merge ``updates`` into an artifact's metadata (rewritten atomically), e.g. a label that
    depends on what onnxruntime measured after export."""
    model = onnx.load(str(path))
    _set_metadata(model, {**read_metadata(path), **updates})
    _save(model, Path(path))


def _save(model: onnx.ModelProto, path: Path) -> None:
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def export_float(model: nn.Module, input_size: tuple[int, int, int], path: str | Path, metadata: dict, simplify: bool = False) -> dict:
    """Export a float model; returns facts about the export (simplified or not).

    Not simplified by default: the fp32 baseline goes through the same exporter as the QDQ
    artifacts, and onnxsim measurably slowed some float graphs in onnxruntime (efficientformerv2_s0:
    14.9 vs 12.5 ms), which would flatter every speed ratio taken against it.
    """
    proto = _torch_to_onnx(model, input_size)
    simplified = False
    if simplify:
        proto, simplified = _simplify(proto)
    _set_metadata(proto, metadata)
    _save(proto, Path(path))
    return {"simplified": simplified, "nodes": len(proto.graph.node)}


INT4_OPSET = 21  # DequantizeLinear takes INT4 from opset 21


def _int4_codes(dq: onnx.NodeProto, inits: dict) -> np.ndarray | None:
    """The int8 weight codes of a DequantizeLinear when they fit 4 bits with zero points of 0."""
    x = inits.get(dq.input[0])
    if x is None or x.data_type != onnx.TensorProto.INT8:
        return None
    codes = numpy_helper.to_array(x)
    zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
    if codes.min() < -8 or codes.max() > 7 or (zp is not None and zp.any()):
        return None
    return codes


def pack_int4_weights(model: onnx.ModelProto) -> int:
    """Store weight codes that fit 4 bits (and have zero points of 0) as ONNX INT4, two per byte,
    and move the graph to opset 21; returns how many weights were packed. The arithmetic is
    unchanged; onnxruntime unpacks them when it loads the model."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    for n in g.node:  # zero points shared through Identity become direct initializer inputs
        for k, i in enumerate(n.input):
            if i in alias:
                n.input[k] = alias[i]
    packed = 0
    for n in g.node:
        codes = _int4_codes(n, inits) if n.op_type == "DequantizeLinear" else None
        if codes is None:
            continue
        x = inits[n.input[0]]
        x.CopyFrom(helper.make_tensor(x.name, onnx.TensorProto.INT4, codes.shape, codes.flatten().tolist()))
        if len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])  # all zero (checked by _int4_codes)
            name = n.input[2] + "_int4"
            if name not in inits:
                inits[name] = helper.make_tensor(name, onnx.TensorProto.INT4, zp.shape, zp.flatten().tolist())
                g.initializer.append(inits[name])
            n.input[2] = name
        packed += 1
    if packed:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, INT4_OPSET)
    _remove_unused(model)
    return packed


NBITS_BLOCK = 32  # rows of K per MatMulNBits block; each block repeats its column's scale


def _pack_nbits(codes: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) signed 4-bit codes and their per-column (or single) scale in onnxruntime's MatMulNBits
    layout: uint4 = code + 8 (its default zero point), blocks of ``NBITS_BLOCK`` rows (K padded with
    zero-valued codes), two codes per byte, low nibble first; scales (N * blocks,), column-major."""
    k, n = codes.shape
    blocks = -(-k // NBITS_BLOCK)
    u = np.full((blocks * NBITS_BLOCK, n), 8, np.uint8)
    u[:k] = (codes.astype(np.int16) + 8).astype(np.uint8)
    u = u.T.reshape(n, blocks, NBITS_BLOCK)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(np.broadcast_to(scale.astype(np.float32).reshape(-1), (n,))[:, None], blocks, 1).reshape(-1)
    return packed, scales


def weight_only_int4_matmuls(model: onnx.ModelProto) -> int:
    """Replace DQ(int8 weight codes that fit 4 bits, zero points 0) -> MatMul by onnxruntime's
    MatMulNBits (com.microsoft): the weights are stored packed, two per byte, and the product runs
    as a float GEMM on them (weight-only: not an integer kernel). Same values, so the same function.
    Returns how many MatMuls were replaced."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer, uses = _dataflow(g)
    replaced, dropped, nodes = 0, set(), []
    for mm in g.node:
        dq = producer.get(mm.input[1]) if mm.op_type == "MatMul" else None
        codes = _int4_codes(dq, inits) if dq is not None and dq.op_type == "DequantizeLinear" else None
        scale = numpy_helper.to_array(inits[dq.input[1]]) if codes is not None and dq.input[1] in inits else None
        axis = _attr(dq, "axis", 1) if dq is not None else 1
        if (scale is None or codes.ndim != 2 or uses[dq.output[0]] != 1
                or (scale.size > 1 and (axis % 2 != 1 or scale.size != codes.shape[1]))):
            nodes.append(mm)
            continue
        packed, scales = _pack_nbits(codes, scale)
        base = dq.input[0]
        g.initializer.extend([numpy_helper.from_array(packed, base + "_nbits"), numpy_helper.from_array(scales, base + "_nbits_scales")])
        nodes.append(helper.make_node("MatMulNBits", [mm.input[0], base + "_nbits", base + "_nbits_scales"], list(mm.output),
                                      name=mm.name, domain="com.microsoft", K=codes.shape[0], N=codes.shape[1], bits=4,
                                      block_size=NBITS_BLOCK))
        dropped.add(id(dq))
        replaced += 1
    kept = [n for n in nodes if id(n) not in dropped]  # a weight's DQ precedes its MatMul: drop it now
    del g.node[:]
    g.node.extend(kept)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _remove_unused(model)
    return replaced


WEIGHT_FORMATS = ("int8", "int4")


def check_weight_format(weight_format: str) -> None:
    lookup(dict.fromkeys(WEIGHT_FORMATS), weight_format, "weight format")


def export_qdq(model: nn.Module, input_size: tuple[int, int, int], path: str | Path, metadata: dict,
               pack_int4: bool = False, weight_format: str = "int8", signed_matmul_operands: bool = False) -> dict:
    """Export a fake-quantized model as QDQ ONNX with its own calibrated parameters.

    ``weight_format="int4"``: Linear weights of at most 4 bits become MatMulNBits (packed, float
    GEMM, see ``weight_only_int4_matmuls``); ``pack_int4``: the other weights of at most 4 bits are
    stored as ONNX INT4 (see ``pack_int4_weights``); ``signed_matmul_operands`` (VNNI targets): see
    ``sign_activation_matmul_operands``."""
    check_weight_format(weight_format)
    with snapped_weights(model), onnx_export_mode():
        proto = _torch_to_onnx(model, input_size)
    folded = fold_weight_quantizers(proto)
    split = split_projections(proto)
    unsigned = unsign_shared_activations(proto)
    signed = sign_activation_matmul_operands(proto) if signed_matmul_operands else 0
    nbits = weight_only_int4_matmuls(proto) if weight_format == "int4" else 0
    packed = pack_int4_weights(proto) if pack_int4 else 0
    if signed:
        metadata = {**metadata, SESSION_CONFIG_KEY: {**metadata.get(SESSION_CONFIG_KEY, {}), **INT8_QDQ_ALLOWED}}
    numerics = integer_numerics(proto, signed)
    metadata = {**metadata, NUMERICS_KEY: numerics}
    _set_metadata(proto, metadata)
    _save(proto, Path(path))
    counts = {}
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"folded_weight_quantizers": folded, "split_projections": split, "unsigned_shared_activations": unsigned, "signed_matmul_operands": signed,
            "weight_only_int4_matmuls": nbits,
            "int4_packed_weights": packed, SESSION_CONFIG_KEY: metadata.get(SESSION_CONFIG_KEY, {}), NUMERICS_KEY: numerics,
            **counts, "nodes": len(proto.graph.node)}
