"""MPTQ-ViT (arXiv 2401.14895) as the ``mptq`` method: SQ-b, OPT-m and greedy mixed precision.

Order of work on a prepared model (quantizers inserted, "off"):
1. ``--full``: LayerNorm and GELU inputs get quantizers too (attention products are already
   wrapped by the partial+matmul placement that ``full`` implies).
2. OPT-m quantizers replace the input quantizer of every Linear fed by a GELU (found by dataflow)
   and, with ``--full``, the Softmax operand of attn @ v.
3. SQ-b folds centre/smoothing into LayerNorm -> Linear pairs (alpha searched per pair).
4. One calibration pass per bit-width needed fills a bank of quantizer parameters (observers see
   float activations, so a quantizer's parameters at b bits do not depend on the other layers);
   OPT-m's (m, delta) are searched per layer and width.
5. The bit assignment is uniform (--bits/--wbits/--abits), read from --bits-from, or found by the
   greedy walk (--target-bits) with KL(float || quantized logits) on calibration images as the
   sensitivity; the chosen parameters are applied and every quantizer frozen.
Quantizers without MACs of their own (LayerNorm/GELU inputs under --full) take the activation
width of the next MAC layer executed after them (norm1 -> qkv, GELU -> fc2, final norm -> head).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from ..errors import VitcompressError
from .calibration import freeze_named, kl_and_agreement, run_batches
from .options import register_options
from .registry import Progress, register_method, register_restorer
from .gptq import gptq_layers
from .config import QuantConfig
from .mixed_precision import average_bits, greedy_mixed_precision
from .reconstruction import ReconstructionOptions, reconstruction_kept, reconstruction_refinement
from .refine import Refinement, apply_refinements
from .modules import QuantConv2d, QuantLinear, QuantMatMul, TensorQuantizer, quantizers, wrap_input
from .placement import is_narrow, reads_image
from .optm import TwoRegionLinear, TwoRegionMatMul, TwoRegionQuantizer, search_two_region
from .rotation import rotate_residual_streams
from .smoothquant import apply_sqb
from .spec import QuantSpec, fake_quantize, qparams_from_range
from .tracing import consumers_of, forward_with_hooks

OPTM_SAMPLE_ROWS = 512  # activation rows kept per OPT-m layer for its search
OPTM_SAMPLE_IMAGES = 8  # images kept per post-Softmax OPT-m layer
SENSITIVITY_IMAGES = 64  # calibration images scoring each mixed-precision step

EXPORT_NOTE_OPTM = ("OPT-m activations are exported as two QDQ regions of (b-1)-bit codes on the int8 grid; the "
                    "product they feed runs as two integer MatMuls on the same integer weights, summed in float "
                    "(twice the MACs of that product)")

PARTS = ("sqb", "optm", "sqb-v", "range", "reconstruction", "gptq")  # the default: every part but "rotate"
KNOWN_PARTS = ("rotate",) + PARTS


@register_options("mptq")
@dataclass(frozen=True)
class MptqOptions(ReconstructionOptions):
    """The ``mptq`` method's knobs, read from ``QuantConfig.method_options``.

    full: also quantize attention products, Softmax/GELU outputs and LayerNorm/GELU inputs
        (needs ``placement="partial+matmul"``, which the CLI's --full sets).
    target_bits: greedy mixed precision down to this MAC-weighted average, over ``bit_choices``.
    layer_bits: a fixed assignment {layer name: bits} (what --bits-from reads).
    parts: parts applied: "sqb", "optm" (the paper's); "sqb-v" (ours: SQ-b on each attention block's
        value -> output projection, exact because Softmax rows sum to 1); "range" (ours: the other
        Linear/Conv inputs get their min-max range shrunk by the fraction minimising the output error);
        "reconstruction" (ours: block reconstruction with learned rounding, ``reconstruction_steps``);
        "gptq" (ours: Linear weights rounded by GPTQ's error compensation once every grid is chosen,
        see ``gptq.py``; kept only if it lowers the calibration KL, ``refine.py``); "rotate" (ours, off by
        default: residual-stream rotation after QuaRot, ``rotation.py``; it did not win on the ViT
        reference model, docs/mptq.md); () is plain min-max calibration in the same placement.
    reconstruction_steps: ours (BRECQ/AdaRound/QDrop, ``reconstruction.py``): weight rounding and
        input step sizes learned per transformer block once every grid is chosen, steps per block;
        0 = off; None = ``auto_steps`` (400) below 8 bits (it lowered the held-out KL at W4A4 and W6A6), else off.
        GPTQ then runs only if reconstruction was not kept. ``qdrop``, ``reconstruction_augment``, ``reconstruction_fisher``,
        ``reconstruction_float_lr``: ``ReconstructionOptions`` (MPTQ's reconstruction weighs the block error
        evenly and learns the blocks' norm affines and biases by default).
    """

    full: bool = False
    target_bits: float | None = None
    bit_choices: tuple[int, ...] = (4, 5, 6, 8)
    layer_bits: dict = field(default_factory=dict)
    parts: tuple[str, ...] = PARTS
    # plain squared block-output error, not Fisher-weighted: on the ViT reference model it gave higher
    # agreement and lower KL on both halves of val at W6A6 and W4A4, without the Fisher pass (docs/reconstruction.md)
    reconstruction_fisher: bool = False
    # 400 steps per block, not 200: with the norm affines and biases learned, lower KL on both halves
    # of val at W4A4 and W6A6 on the ViT reference model, about 2.5 minutes more (docs/reconstruction.md)
    auto_steps: ClassVar[int] = 400
    # the blocks' norm affines and biases learned with the rounding: lower KL on half A of val at W6A6
    # and W4A4 on the ViT reference model (docs/reconstruction.md)
    reconstruction_float_lr: float = 1e-3

    @staticmethod
    def precision(raw: dict) -> tuple[str, bool] | None:
        """Mixed precision names the artifact by its target (mp5) or 'mixed' for a given assignment."""
        if raw.get("target_bits") is not None:
            return f"mp{float(raw['target_bits']):g}", True
        if raw.get("layer_bits"):
            return "mixed", any(int(b) < 8 for b in dict(raw["layer_bits"]).values())
        return None

    @classmethod
    def from_config(cls, config: QuantConfig) -> "MptqOptions":
        raw = dict(config.method_options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise VitcompressError(f"unknown mptq option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            opts = cls(full=bool(raw.get("full", False)),
                       target_bits=None if raw.get("target_bits") is None else float(raw["target_bits"]),
                       bit_choices=tuple(sorted({int(b) for b in raw.get("bit_choices", cls.bit_choices)})),
                       layer_bits={str(k): int(v) for k, v in dict(raw.get("layer_bits") or {}).items()},
                       parts=tuple(raw.get("parts", cls.parts)), **cls.given(raw))
        except (TypeError, ValueError) as e:
            raise VitcompressError(f"bad mptq option: {e}") from None
        widths = opts.bit_choices + tuple(opts.layer_bits.values())
        if not opts.bit_choices or any(not 2 <= b <= 8 for b in widths):
            raise VitcompressError(f"bit choices and per-layer bits must be between 2 and 8, got {sorted(set(widths))}")
        if opts.target_bits is not None and opts.layer_bits:
            raise VitcompressError("give either --target-bits or --bits-from, not both")
        if opts.target_bits is not None and not opts.bit_choices[0] <= opts.target_bits <= opts.bit_choices[-1]:
            raise VitcompressError(f"--target-bits {opts.target_bits:g} is outside the bit choices {list(opts.bit_choices)}")
        if set(opts.parts) - set(KNOWN_PARTS):
            raise VitcompressError(f"unknown MPTQ part(s) {sorted(set(opts.parts) - set(KNOWN_PARTS))} (known: {', '.join(KNOWN_PARTS)})")
        if opts.full and config.placement != "partial+matmul":
            raise VitcompressError("mptq full quantization needs placement partial+matmul (the --full flag sets it)")
        return opts


# ---------------------------------------------------------------------------------------- wrapping


@register_restorer("mptq")
def restore_mptq_quantizers(model: nn.Module, config: QuantConfig, state: dict) -> None:
    """Re-create OPT-m two-region quantizers and --full LayerNorm/GELU input quantizers from a
    checkpoint's quantizer state; their values are loaded afterwards by ``restore_quantized``."""
    present = {n for n, _ in quantizers(model)}
    for key, st in state.items():
        owner_name, attr = key.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        if st.get("kind") == "opt-m":
            owner.__class__ = TwoRegionLinear if isinstance(owner, nn.Linear) else TwoRegionMatMul
            setattr(owner, attr, TwoRegionQuantizer(int(st["total_bits"]), st.get("observer", "minmax")))
            getattr(owner, attr).ratio = torch.tensor(float(st["ratio"]))
        elif key not in present and attr == "input_quantizer" and isinstance(owner, (nn.LayerNorm, nn.GELU)):
            wrap_input(owner, config.act_spec, config.act_observer)


def _post_gelu_linears(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Quantized Linears whose input is exactly a GELU's output tensor (found by dataflow)."""
    gelus = [n for n, m in model.named_modules() if isinstance(m, nn.GELU)]
    return consumers_of(model, gelus, QuantLinear, example)


def _mac_units(model: nn.Module) -> dict[str, dict[str, str]]:
    """MAC-carrying quantized products: name -> {"w"/"a" or "a"/"b": quantizer name}."""
    units = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            units[name] = {"weight": f"{name}.weight_quantizer", "input": f"{name}.input_quantizer"}
        elif isinstance(m, QuantMatMul):
            units[name] = {"a": f"{name}.a_quantizer", "b": f"{name}.b_quantizer"}
    return units


def _trace(model: nn.Module, units: dict, extra: list[str], example: torch.Tensor) -> tuple[dict[str, int], dict[str, str]]:
    """MACs per image of each unit, and for each extra (MAC-less) module the next unit executed."""
    modules = dict(model.named_modules())
    macs: dict[str, int] = {}
    order: list[str] = []
    hooks = []

    def on_unit(mod, inp, out, n):
        per_image = out.numel() // out.shape[0]
        if isinstance(mod, QuantConv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            k = inp[0].shape[-1]
        macs[n] = macs.get(n, 0) + per_image * k
        order.append(n)

    for n in units:
        hooks.append(modules[n].register_forward_hook(lambda mod, i, o, n=n: on_unit(mod, i, o, n)))
    for n in extra:
        hooks.append(modules[n].register_forward_pre_hook(lambda mod, i, n=n: order.append(n)))
    forward_with_hooks(model, example[:1], hooks)
    follows: dict[str, str] = {}
    for i, n in enumerate(order):
        if n in extra and n not in follows:
            nxt = next((u for u in order[i + 1:] if u in units), None)
            if nxt is None:
                raise VitcompressError(f"{n} feeds no quantized layer; cannot give it a bit-width")
            follows[n] = nxt
    return macs, follows


# ------------------------------------------------------------------------------------ the method

class _Setup:
    """Who owns which quantizer, the bank of calibrated parameters, and assignment application."""

    def __init__(self, model: nn.Module, config: QuantConfig):
        self.model = model
        self.config = config
        self.qs: dict[str, TensorQuantizer] = {n: q for n, q in quantizers(model) if not n.endswith(".coarse")}
        self.bank: dict[tuple[str, int], tuple] = {}
        self.owner: dict[str, tuple[str, str]] = {}  # quantizer -> (unit, "w" or "a")
        # units reading the image keep config.image_input_bits on their input (derived once: bits_of is hot)
        self.image_units = {n for n, m in model.named_modules() if reads_image(m)}

    def bits_of(self, qname: str, assignment: dict[str, tuple[int, int]]) -> int:
        unit, role = self.owner[qname]
        w, a = assignment[unit]
        if role == "w":
            return self.config.weight_bits(w)  # reduce_range: 7 at most (see vitcompress.cpu)
        return self.config.image_input_bits if unit in self.image_units else a

    def set_bits(self, q: TensorQuantizer, bits: int) -> None:
        if isinstance(q, TwoRegionQuantizer):
            q.set_total_bits(bits)
        else:
            q.spec = replace(q.spec, bits=bits)

    def apply(self, assignment: dict[str, tuple[int, int]]) -> None:
        for n, q in self.qs.items():
            b = self.bits_of(n, assignment)
            self.set_bits(q, b)
            params = self.bank[(n, b)]
            if isinstance(q, TwoRegionQuantizer):
                q.set_regions(*params)
            else:
                q.set_qparams(*params)


def _quantized_at(setup: _Setup, qname: str, x: torch.Tensor, assignment: dict[str, tuple[int, int]]) -> torch.Tensor:
    """x fake-quantized with the bank's parameters of quantizer ``qname`` at its width in ``assignment``."""
    b = setup.bits_of(qname, assignment)
    return fake_quantize(x, *setup.bank[(qname, b)], replace(setup.qs[qname].spec, bits=b))


def _layer_product(setup: _Setup, layer: str, m: nn.Module, captured: list, assignment: dict):
    """(calibration input, function giving the layer's output for an input) with the other operand
    quantized as ``assignment`` says; the bias is left out (it cancels in the output error)."""
    if isinstance(m, QuantMatMul):
        v = torch.cat([v for _, v in captured])
        vq = _quantized_at(setup, f"{layer}.b_quantizer", v, assignment)
        return torch.cat([a for a, _ in captured]), lambda a: a @ vq
    w = _quantized_at(setup, f"{layer}.weight_quantizer", m.weight.detach(), assignment)
    if isinstance(m, QuantConv2d):
        return torch.cat(captured), lambda a: m._conv_forward(a, w, None)
    return torch.cat(captured), lambda a: a @ w.t()


RANGE_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)


def _search_range(x: torch.Tensor, product, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor):
    """Shrink the observer's range [lo, hi] by the fraction minimising the layer's output error."""
    lo = scale * (spec.qmin - zero_point.float())
    hi = scale * (spec.qmax - zero_point.float())
    ref = product(x)
    best = None
    for frac in RANGE_FRACTIONS:
        s, z = qparams_from_range(lo * frac, hi * frac, spec)
        err = (product(fake_quantize(x, s, z, spec)) - ref).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, s, z, frac)
    return best[1], best[2], best[3]


def _capture_inputs(model: nn.Module, names: list[str], batches: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Float inputs of the given modules (Linear: a row subsample; MatMul: both operands, a few images)."""
    modules = dict(model.named_modules())
    got: dict[str, list] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(0)
    per_batch = max(1, OPTM_SAMPLE_ROWS // len(batches))

    def hook(mod, inp, n):
        if isinstance(mod, QuantConv2d):
            kept = sum(a.shape[0] for a in got[n])
            if kept < OPTM_SAMPLE_IMAGES:
                got[n].append(inp[0][: OPTM_SAMPLE_IMAGES - kept].detach())
        elif isinstance(mod, QuantMatMul):
            kept = sum(a.shape[0] for a, _ in got[n])
            if kept < OPTM_SAMPLE_IMAGES:
                got[n].append((inp[0][: OPTM_SAMPLE_IMAGES - kept].detach(), inp[1][: OPTM_SAMPLE_IMAGES - kept].detach()))
        else:
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            got[n].append(x[torch.randperm(x.shape[0], generator=gen)[:per_batch]])

    hooks = [modules[n].register_forward_pre_hook(lambda mod, i, n=n: hook(mod, i, n)) for n in names]
    try:
        run_batches(model, batches)
    finally:
        for h in hooks:
            h.remove()
    return got


PROBES_PER_TASK = 6  # isolated mixed-precision probes per worker task


def _probe_kls(job: tuple) -> list[float]:
    """On a worker, on its own copy of the model: the KL of each assignment in the chunk."""
    setup, images, ref, assigns = job
    kls = []
    for assign in assigns:
        setup.apply({u: (b, b) for u, b in assign.items()})
        with torch.no_grad():
            kls.append(kl_and_agreement(ref, setup.model(images))[0])
    return kls


@register_method("mptq")
def mptq(model: nn.Module, config: QuantConfig, batches: Sequence[torch.Tensor], progress: Progress | None,
         map_shards: Callable | None = None) -> dict:
    """SQ-b + OPT-m (+ greedy mixed precision); see the module docstring and docs/mptq.md.
    ``map_shards`` (a worker pool's map) runs greedy mixed precision's isolated probes, the Fisher
    diagonals of reconstruction and GPTQ's input statistics on workers: the same KLs, so the same
    assignment, and the same tensors."""
    opts = MptqOptions.from_config(config)
    parts = set(opts.parts)
    example = batches[0]
    modules = dict(model.named_modules())
    skip = config.skip

    # 0. ours (QuaRot-style): rotate the residual stream, exact in float, before anything is measured
    rotation_info = rotate_residual_streams(model, example[:2]) if "rotate" in parts else None

    # 1. --full: LayerNorm and GELU inputs
    extra: list[str] = []
    if opts.full:
        for name, m in list(modules.items()):
            if isinstance(m, (nn.LayerNorm, nn.GELU)) and not any(fnmatch.fnmatch(name, p) for p in skip):
                wrap_input(m, config.act_spec, config.act_observer)
                extra.append(name)

    # 2. OPT-m quantizers for post-GELU (and, with --full, post-Softmax) activations
    optm_layers: list[str] = []
    if "optm" in parts:
        bits_needed = [b for b in ((opts.bit_choices if opts.target_bits is not None else ())
                                   or tuple(opts.layer_bits.values()) or (config.abits,))]
        if min(bits_needed) < 3:
            raise VitcompressError("OPT-m needs activations of at least 3 bits")
        for name in _post_gelu_linears(model, example[:2]):
            m = modules[name]
            m.__class__ = TwoRegionLinear
            m.input_quantizer = TwoRegionQuantizer(config.abits, config.act_observer)
            optm_layers.append(name)
        for name, m in modules.items():
            if isinstance(m, QuantMatMul) and name.endswith("av_matmul"):  # QuantAttention's attn @ v
                m.__class__ = TwoRegionMatMul
                m.a_quantizer = TwoRegionQuantizer(config.abits, config.act_observer)
                optm_layers.append(name)

    setup = _Setup(model, config)
    units = _mac_units(model)
    macs, follows = _trace(model, units, extra, example)
    for u, roles in units.items():
        for role, qn in roles.items():
            setup.owner[qn] = (u, "w" if role == "weight" else "a")
    for n in extra:
        setup.owner[f"{n}.input_quantizer"] = (follows[n], "a")

    # the assignments the bank must cover
    if opts.layer_bits:
        wanted = dict(opts.layer_bits)
        missing, unknown = sorted(set(units) - set(wanted)), sorted(set(wanted) - set(units))
        if missing or unknown:
            raise VitcompressError(f"--bits-from does not match this model's quantized layers "
                                   f"(missing: {missing[:3]}, unknown: {unknown[:3]})")
        passes = [{u: (b, b) for u, b in wanted.items()}]
    elif opts.target_bits is not None:
        passes = [{u: (b, b) for u in units} for b in opts.bit_choices]
    else:  # uniform widths; narrow layers keep config.narrow_layer_bits (mixed precision decides them itself)
        passes = [{u: config.layer_bits(is_narrow(modules[u])) for u in units}]

    # 3. SQ-b, searched at the lowest width each layer may get
    sqb_info = {}
    if parts & {"sqb", "sqb-v"}:
        def specs_for(linear: str) -> tuple[QuantSpec, QuantSpec] | None:
            if any(linear not in p for p in passes):
                return None  # kept float
            w = min(p[linear][0] for p in passes)
            a = min(p[linear][1] for p in passes)
            return replace(config.weight_spec_linear, bits=w), replace(config.act_spec, bits=a, symmetric=True)

        sqb_info = apply_sqb(model, batches, specs_for, layernorms="sqb" in parts, values="sqb-v" in parts)
        # SQ-b centres the smoothed inputs: they get a signed symmetric grid (no zero point). An
        # unsigned grid on a symmetric range puts both range ends on rounding ties, and with alpha
        # near 1 every channel's extreme sits there, so torch and onnxruntime would round them apart.
        for v in sqb_info.values():
            for lin in v["linears"]:
                iq = modules[lin].input_quantizer
                iq.spec = replace(iq.spec, symmetric=True)

    # 4. the bank: one observer pass per assignment to cover
    plain = {n: q for n, q in setup.qs.items() if not isinstance(q, TwoRegionQuantizer)}
    two_region = {n: q for n, q in setup.qs.items() if isinstance(q, TwoRegionQuantizer)}
    for k, assignment in enumerate(passes):
        for n, q in setup.qs.items():
            q.mode = "off"
        for n, q in plain.items():
            setup.set_bits(q, setup.bits_of(n, assignment))
            q.observe()
        run_batches(model, batches)
        for n, q in plain.items():
            freeze_named(n, q)
            setup.bank[(n, q.spec.bits)] = (q.scale.clone(), q.zero_point.clone())
        for n, q in plain.items():
            q.mode = "off"
    optm_info: dict[str, dict] = {}
    range_info: dict[str, dict] = {}
    searched = dict(two_region)
    if "range" in parts:  # the remaining inputs of Linear/Conv layers: range searched by output error
        searched.update({n: q for n, q in plain.items() if n.endswith(".input_quantizer")
                         and isinstance(modules[n.rsplit(".", 1)[0]], (QuantLinear, QuantConv2d))})
    if searched:
        owners = {n: n.rsplit(".", 1)[0] for n in searched}
        captured = _capture_inputs(model, sorted(set(owners.values())), batches)
        for n, q in searched.items():
            layer = owners[n]
            for assignment in passes:
                b = setup.bits_of(n, assignment)
                if n in two_region and (n, b) in setup.bank:
                    continue
                if n not in two_region and (n, b) in range_info.get(n, {}):
                    continue
                x, product = _layer_product(setup, layer, modules[layer], captured[layer], assignment)
                if n in two_region:
                    found = search_two_region(x, product, b)
                    setup.bank[(n, b)] = (found["base_scale"], found["zero_point"], found["ratio"])
                    optm_info.setdefault(n, {})[b] = {
                        "ratio": found["ratio"], "output_mse": found["output_mse"],
                        "output_mse_single_scale": found["output_mse_single_scale"]}
                else:
                    spec = replace(q.spec, bits=b)
                    scale, zp, frac = _search_range(x, product, spec, *setup.bank[(n, b)])
                    setup.bank[(n, b)] = (scale, zp)
                    range_info.setdefault(n, {})[b] = frac

    # 5. the assignment
    info: dict = {"mptq": {"parts": sorted(parts), "full": opts.full}}
    if rotation_info is not None:
        info["mptq"]["rotation"] = rotation_info
    mp_info = None
    sens_x = torch.cat(list(batches))[:SENSITIVITY_IMAGES]  # scores mixed-precision steps and judges refinements
    for q in setup.qs.values():
        q.mode = "off"
    with torch.no_grad():
        ref = model(sens_x)
    if opts.target_bits is not None:

        def evaluate(assign: dict[str, int]) -> tuple[float, float]:
            setup.apply({u: (b, b) for u, b in assign.items()})
            with torch.no_grad():
                return kl_and_agreement(ref, model(sens_x))

        def probe_on_workers(assigns: list[dict[str, int]]) -> list[float]:
            chunks = [assigns[i:i + PROBES_PER_TASK] for i in range(0, len(assigns), PROBES_PER_TASK)]
            # one argument per task: the model and the setup that owns its quantizers travel as one object
            return [kl for part in map_shards(_probe_kls, [((setup, sens_x, ref, chunk),) for chunk in chunks]) for kl in part]

        assignment, path, isolated = greedy_mixed_precision(
            macs, opts.bit_choices, opts.target_bits, lambda a: evaluate(a)[0],
            measure=lambda a: dict(zip(("kl", "top1_agreement"), evaluate(a))), progress=progress,
            sensitivities=probe_on_workers if map_shards is not None else None)
        final = {u: (b, b) for u, b in assignment.items()}
        mp_info = {"weighting": "MACs per image", "target_bits": opts.target_bits, "bit_choices": list(opts.bit_choices),
                   "average_bits": average_bits(assignment, macs), "assignment": assignment, "macs": macs,
                   "sensitivity": f"KL(float || quantized logits) on {len(sens_x)} calibration images",
                   "path": path, "isolated_sensitivity": isolated}
    else:
        final = passes[0]
        if opts.layer_bits:
            mp_info = {"weighting": "MACs per image", "assignment": dict(opts.layer_bits), "macs": macs,
                       "average_bits": average_bits(dict(opts.layer_bits), macs)}
    setup.apply(final)
    for q in setup.qs.values():
        assert q.mode == "quantize"
    # 6. refinements, last: GPTQ needs every grid fixed and rounds against the quantized inputs; kept
    # only if it lowers the calibration KL (refine.py: the rule Q-HyViT's refinements follow too)
    linears = [n for n in macs if isinstance(model.get_submodule(n), nn.Linear)]  # the part rounds Linear weights

    def calibration_kl() -> float:
        with torch.no_grad():
            return kl_and_agreement(ref, model(sens_x))[0]

    weighted = [n for n in macs if hasattr(modules[n], "weight_quantizer")]  # execution order
    narrowest = min((min(wa) for wa in final.values()), default=8)
    judged_on = f"{len(sens_x)} calibration images"
    reconstruction, reconstruction_report = reconstruction_refinement(
        weighted, opts.reconstruction_config(narrowest, enabled="reconstruction" in parts),
        progress=progress, judged_on=judged_on, map_shards=map_shards)
    refinements = [
        reconstruction,
        Refinement("gptq", lambda done: "gptq" in parts and not reconstruction_kept(done),
                   lambda m, names, b: gptq_layers(m, linears, b, map_shards=map_shards), lambda m: [m.weight], judged_on=judged_on)]
    steps = apply_refinements(model, weighted, batches, refinements, calibration_kl, calibration_kl())
    if steps:
        info["mptq"]["refinements"] = steps
        info["mptq"]["gptq_layers"] = steps["gptq"]["layers"] if steps.get("gptq", {}).get("kept") else 0
        if "reconstruction" in steps:
            steps["reconstruction"].update(reconstruction_report)

    if range_info:
        info["mptq"]["range_fraction"] = {n.rsplit(".", 1)[0]: by_bits[setup.bits_of(n, final)] for n, by_bits in range_info.items()}
    if sqb_info:
        info["mptq"]["sqb"] = {n: {"kind": v["kind"], "linears": v["linears"], "alpha": v["alpha"]} for n, v in sqb_info.items()}
    if optm_info:
        info["mptq"]["optm"] = {n.rsplit(".", 1)[0]: {"bits": setup.bits_of(n, final), **by_bits[setup.bits_of(n, final)]}
                                for n, by_bits in optm_info.items()}
        info["mptq"]["optm_export"] = EXPORT_NOTE_OPTM
    if opts.full:
        info["mptq"]["full_extra_quantized_inputs"] = extra
    if mp_info is not None:
        info["mixed_precision"] = mp_info
    return info
