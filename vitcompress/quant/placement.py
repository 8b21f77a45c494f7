"""Which layers are quantized: a placement policy, per model family, kept as data.

"partial" (the default; also called "accuracy"): Linear and Conv2d weights and their input
activations; LayerNorm, GroupNorm, Softmax, GELU and residual adds stay float. "partial+matmul"
also quantizes the attention products of timm's Attention blocks. "linear": only Linear layers,
which onnxruntime's CPU provider fuses from our Q/DQ pattern (DQ -> MatMul becomes
MatMulIntegerToFloat); convs stay float, because a conv with quantized inputs but a float output
is not fused (it runs as DequantizeLinear + float Conv: slower than float, and only simulated).
"speed": Linear and Conv2d and the attention products of timm's Attention blocks (q·kᵀ runs as
MatMulIntegerToFloat, attn·v as QLinearMatMul; the Softmax between them stays float), with a Q on
each conv's output so onnxruntime fuses QLinearConv, and each SiLU fed by a quantized conv
computed as x·Q(sigmoid(x)) so it runs as QLinearSigmoid + QLinearMul instead of Q/DQ conversions
around float ops; convs reading the RGB image stay float when each output reads few inputs (a 3×3
stem, 27 products per output, measured slower in int8) and are quantized when they are
patchifying GEMMs (a 16×16 patch embedding, 768 products per output, measured faster). On plain
ViTs "speed" differs from "linear" by the attention products (and the patch embedding); on hybrids
"speed" is the only placement faster than float (benchmarks/RESULTS.md).

``integer_kinds`` is the promise a placement makes: every quantized layer of those kinds must run
as an integer kernel in the exported model, or the quantize command fails (see ``api.quantize``).
Layers of the other kinds are simulated (Q/DQ around a float kernel) and reported as such.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from ..errors import VitcompressError
from ..registry import lookup
from .eltwise import eltwise_modules
from .modules import is_wrappable_attention, is_wrappable_weighted


KINDS = {nn.Linear: "linear", nn.Conv2d: "conv"}


IMAGE_CHANNELS = 3


def reads_image(module: nn.Module) -> bool:
    """A conv with at most 3 input channels: the stem, reading the (normalised 8-bit) image."""
    return isinstance(module, nn.Conv2d) and module.in_channels <= IMAGE_CHANNELS


def reduction_size(module: nn.Module) -> int:
    """Products summed per output value of a conv: input channels per group times kernel area."""
    return (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]


# A layer summing fewer products than this per output is "narrow" (``QuantConfig.narrow_layer_bits``):
# its rounding noise is not averaged over many products. On mobilevit_xxs (W4A4, min-max, half A of
# val) 4-bit narrow layers alone took agreement from 86.5 % to 39 %; figures in docs/quantization.md.
NARROW_PRODUCTS = 64


def products_per_output(module: nn.Module) -> int:
    """Products summed per output value: a conv's ``reduction_size``, a Linear's input features."""
    return reduction_size(module) if isinstance(module, nn.Conv2d) else module.in_features


def is_narrow(module: nn.Module) -> bool:
    """A Linear/Conv2d summing fewer than ``NARROW_PRODUCTS`` products per output (depthwise convs,
    1x1 convs over few channels, small stems)."""
    return kind_of(module) is not None and products_per_output(module) < NARROW_PRODUCTS


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every output channel reads exactly one input channel."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def kind_of(module: nn.Module) -> str | None:
    """'linear' / 'conv' for Linear / Conv2d (and their subclasses), else None."""
    return next((k for cls, k in KINDS.items() if isinstance(module, cls)), None)


@dataclass(frozen=True)
class Placement:
    name: str
    kinds: tuple[str, ...] = ("linear", "conv")  # weighted layer kinds quantized (weights and inputs)
    attention_matmuls: bool = False
    integer_kinds: tuple[str, ...] = ("linear",)  # kinds that must run as integer kernels once exported
    skip: tuple[str, ...] = ()  # module-name patterns kept float
    conv_outputs: bool = False  # Q after each quantized conv's output (what onnxruntime needs to fuse QLinearConv)
    gated_silu: bool = False  # SiLU fed by a quantized conv: its sigmoid is quantized too (QLinearSigmoid + QLinearMul)
    # A conv summing fewer products per output than this (``reduction_size``) stays float: small
    # stems, depthwise and small grouped convs, 1x1 convs over few channels; 0 quantizes them all.
    conv_min_reduction: int = 0
    # which convs that bound applies to: "all", or "image" (only those reading the image, ``reads_image``)
    conv_min_reduction_scope: str = "all"
    # the operands of elementwise ops quantized too: residual adds and the products inside the blocks
    # of ``eltwise.ELTWISE_BLOCKS``, normalisation inputs outside them (what OpenVINO runs in int8)
    eltwise: bool = False
    methods: tuple[str, ...] = ()  # the methods that may calibrate it (empty: every method)

    def __post_init__(self):
        if self.conv_min_reduction_scope not in ("all", "image"):
            raise ValueError(f"conv_min_reduction_scope must be 'all' or 'image', got {self.conv_min_reduction_scope!r}")


# Measured with onnxruntime 1.31, 1 thread (docs/quantization.md): int8 lost on a 3×3 RGB stem (27
# products per output) and won on deit's 16×16 patch embedding (768). "speed-wide" applies the same
# bound to every conv: depthwise convs (9-49 products) and 1x1 convs over fewer than 64 channels stay
# float. Which of the two is faster depends on the model (FastViT 0.5x -> 1.25x, MobileViT v2
# 1.00x -> 0.96x), so the default measures.
IMAGE_CONV_MIN_REDUCTION = NARROW_PRODUCTS  # the same bound: a narrow conv (``is_narrow``)


PLACEMENTS: dict[str, Placement] = {
    "partial": Placement("partial"),
    "partial+matmul": Placement("partial+matmul", attention_matmuls=True),
    "linear": Placement("linear", kinds=("linear",)),
    "speed": Placement("speed", integer_kinds=("linear", "conv"), conv_outputs=True, gated_silu=True,
                       conv_min_reduction=IMAGE_CONV_MIN_REDUCTION, conv_min_reduction_scope="image", attention_matmuls=True),
    "speed-wide": Placement("speed-wide", integer_kinds=("linear", "conv"), conv_outputs=True, gated_silu=True,
                                attention_matmuls=True, conv_min_reduction=IMAGE_CONV_MIN_REDUCTION),
    # partial with narrow convs float: what a method (qhyvit, mptq) runs on at W8A8 by default, where
    # 8-bit narrow convs cost accuracy and their int8 kernels do not pay (docs/quantization.md)
    "partial-wide": Placement("partial-wide", conv_min_reduction=NARROW_PRODUCTS),
    # partial+matmul with the tensors between layers quantized as well, so that they stay int8 in
    # OpenVINO (its reorders between blocked conv outputs and elementwise ops then move int8)
    # (min-max only: qhyvit's and mptq's searches are defined on weighted layers and attention products)
    "eltwise": Placement("eltwise", attention_matmuls=True, eltwise=True, methods=("minmax",)),
}
ALIASES = {"accuracy": "partial"}

# Per family and placement ("*": every placement): module-name patterns kept float, each decision
# measured (the figures: docs/quantization.md, "Per-family decisions"). EfficientFormer v2's
# talking-head convs mix attention maps right after a Softmax: quantizing their input turns that
# Softmax into QLinearSoftmax, slower than the float one, for convs too small to gain. Swin v2's
# continuous position-bias MLP reads a constant coordinate table: float, the exporter folds it into
# a constant; quantized, it would run as Q/DQ around float kernels at every inference.
FAMILY_SKIP: dict[str, dict[str, tuple[str, ...]]] = {
    "EfficientFormer v2": {"speed": ("*.talking_head1", "*.talking_head2")},
    "Swin Transformer v2": {"*": ("*.cpb_mlp.*",)},
}


@dataclass(frozen=True)
class Candidate:
    """One thing the measured default can try: a placement, and the activation scheme with it."""

    name: str
    placement: str
    act_symmetric: bool = False


# What `--placement default/auto` may try. "matmul-int8": Linear/Conv and the attention products,
# with signed symmetric activations: the form OpenVINO's CPU plugin runs fastest (its attention
# fusion takes signed inputs); onnxruntime runs int8 activations slower than uint8 ones.
CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("speed", "speed"), Candidate("speed-wide", "speed-wide"), Candidate("linear", "linear"), Candidate("partial", "partial"),
    Candidate("matmul-int8", "partial+matmul", act_symmetric=True),
    Candidate("eltwise", "eltwise"),
)}


@dataclass(frozen=True)
class DefaultRule:
    """Which candidates (``CANDIDATES``) the default (``--placement default``) tries, in order, for a
    runtime, a model family and a CPU's int8 ISA (fnmatch patterns): the first one measured faster
    than float within the accuracy budget is kept, so the choice is the same from run to run."""

    runtime: str
    family: str
    isa: str
    order: tuple[str, ...]
    reason: str


# First match wins. Figures in docs/quantization.md ("The default placement").
DEFAULT_RULES: tuple[DefaultRule, ...] = (
    DefaultRule("openvino", "MobileViT v2", "*", ("eltwise", "matmul-int8", "partial", "speed"),
                "MobileViT v2's transformer blocks read their 1x1 convs' outputs through residual adds, GroupNorms "
                "and the separable attention's products; with those operands float, OpenVINO reorders each conv "
                "output in float (about a third of the int8 model's time at 256 px); quantized, the reorders move int8"),
    DefaultRule("onnxruntime", "*", "*", ("speed", "speed-wide", "linear", "partial"),
                "onnxruntime fuses the speed placement's chains (QLinearConv, QLinearSigmoid, integer attention "
                "products) and leaves partial's quantized convs as Q/DQ around float convs; speed was the fastest "
                "placement on most families measured, with VNNI and with AVX2 only; where its int8 depthwise convs "
                "cost more than they save (FastViT, EfficientViT), speed-wide keeps them float"),
    DefaultRule("openvino", "*", "*", ("matmul-int8", "partial", "speed"),
                "OpenVINO's CPU plugin runs the quantized convs of partial artifacts as u8 kernels itself, and the "
                "attention products fastest with signed activations; partial beat speed on every family measured there "
                "(speed's extra Q/DQ around activations cost time in OpenVINO)"),
)


def default_placement_order(runtime: str, family: str, isa: str) -> DefaultRule:
    """The rule for this runtime, family and ISA (the last rule's order when none matches)."""
    return next((r for r in DEFAULT_RULES if fnmatch.fnmatch(runtime, r.runtime) and fnmatch.fnmatch(family, r.family)
                 and fnmatch.fnmatch(isa, r.isa)), DEFAULT_RULES[-1])


def get_placement(name: str) -> Placement:
    return lookup(PLACEMENTS, name, "placement", ALIASES)


def check_placement_method(placement: str, method: str) -> None:
    """A placement that only some methods can calibrate refuses the others in one line."""
    p = PLACEMENTS.get(ALIASES.get(placement, placement))  # default/auto choose among candidates: nothing to check
    if p is not None and p.methods and method not in p.methods:
        raise VitcompressError(f"placement '{p.name}' is calibrated with {', '.join(p.methods)} only, not {method}")


@dataclass
class PlacementPlan:
    weighted: list[str]
    attention: list[str]
    float_modules: dict[str, int]  # op type -> count of modules left float
    skipped: list[str]  # weighted modules kept float by a skip pattern or unsupported subclass
    gated_silu: list[str] = field(default_factory=list)  # SiLU modules whose sigmoid is quantized
    image_readers: list[str] = field(default_factory=list)  # quantized layers reading the image (QuantConfig.image_input_bits)
    narrow: list[str] = field(default_factory=list)  # quantized narrow layers (``is_narrow``, QuantConfig.narrow_layer_bits)
    eltwise: list[str] = field(default_factory=list)  # modules whose elementwise operands are quantized (``Placement.eltwise``)


# Module types whose computation stays float under a partial policy, reported by type name.
_FLOAT_KINDS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.GELU, nn.SiLU, nn.Softmax, nn.Hardswish)


def plan(model: nn.Module, placement: Placement, extra_skip: tuple[str, ...] = (), family: str = "") -> PlacementPlan:
    family_skip = FAMILY_SKIP.get(family, {})
    skip = placement.skip + family_skip.get("*", ()) + family_skip.get(placement.name, ()) + tuple(extra_skip)
    weighted, attention, skipped = [], [], []
    float_counts: Counter[str] = Counter()
    for name, m in model.named_modules():
        skipped_by_pattern = any(fnmatch.fnmatch(name, p) for p in skip)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            kind = kind_of(m)
            if (isinstance(m, nn.Conv2d) and reduction_size(m) < placement.conv_min_reduction
                    and (placement.conv_min_reduction_scope == "all" or reads_image(m))):
                float_counts[type(m).__name__] += 1  # by design (the placement's data), not a skip
            elif kind in placement.kinds and is_wrappable_weighted(m) and not skipped_by_pattern:
                weighted.append(name)
            elif kind in placement.kinds:  # wanted but kept float: a skip pattern or an unsupported subclass
                skipped.append(name)
                float_counts[type(m).__name__] += 1
            else:
                float_counts[type(m).__name__] += 1
        elif placement.attention_matmuls and is_wrappable_attention(m) and not skipped_by_pattern:
            attention.append(name)
        elif isinstance(m, _FLOAT_KINDS):
            float_counts[type(m).__name__] += 1
    if not weighted and not attention:
        raise VitcompressError("the placement selects no layer to quantize in this model")
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        float_counts["MultiheadAttention"] += 1
    modules = dict(model.named_modules())
    eltwise = eltwise_modules(model, lambda n: any(fnmatch.fnmatch(n, p) for p in skip)) if placement.eltwise else []
    return PlacementPlan(weighted, attention, dict(float_counts), skipped,
                         image_readers=[n for n in weighted if reads_image(modules[n])],
                         narrow=[n for n in weighted if is_narrow(modules[n])], eltwise=eltwise)
