"""Q-HyViT: post-training quantization of hybrid ViTs (arXiv 2303.12557).

Per quantized layer, a search over the scale (a grid of α·Δ₀ around the min-max scale Δ₀), the
granularity and the scheme, minimising the Hessian-guided output error

    E[ ΔOᵀ diag((∂L/∂O)²) ΔO ],   L = KL(float logits ‖ quantized logits),

alternating weights and activations for a few rounds. For a layer inside a bridge block (where
the layout switches between conv maps and tokens, see ``bridge.py``) O is the output of the
whole bridge block, so the block is reconstructed as a whole.

Interpretations and simplifications (also in docs/qhyvit.md):
- diag((∂L/∂O)²) is read as the diagonal Hessian of L at the float model. There the gradient of
  that KL is exactly zero, and its Hessian is the Fisher information of the model's prediction,
  Σ_c p_c (∂ log p_c/∂O)²: computed exactly (one backward pass per class) for up to 16 classes,
  and by sampling 16 labels from the model's prediction (seeded) for more.
- O is computed from the layer's (or block's) float input; other quantizers inside a bridge block
  keep their current parameters while one is searched.
- Granularity is searched for weights (per-tensor vs per-output-channel) and, for the inputs of
  depthwise convs, for activations too (per-tensor vs per-channel). The paper's answer to highly
  dynamic activation ranges is channel-wise activation granularity; we offer it only where each
  output channel reads one input channel, so the product of the two per-channel scales stays a
  per-output-channel requantization (integer arithmetic is possible). onnxruntime's QLinearConv
  takes one input scale, so such a conv is exported as per-axis Q/DQ around a float conv and the
  coverage report lists it as a float island (simulated, never labelled integer).
- Scheme is searched for activations (symmetric int8 vs asymmetric uint8). Weights stay
  symmetric: asymmetric int8 weights do not map to onnxruntime's integer kernels.
- The α grid has ``alphas`` points in [0.01, 1.2] (the paper scans ~100).
- Ours: activation candidates are scored by a 2-fold cross-fit (``crossfit``): the range is taken
  on one half of the calibration images and the error measured on the other, both ways; the kept
  candidate's range is α × the mean of the halves' ranges. The paper scores in sample; on few images that
  picks per-channel ranges that clip unseen images (docs/qhyvit.md).
- Zero-point overflow: asymmetric ranges are widened to include 0 (``qparams_from_range``), and
  the number of activation quantizers whose calibrated range needed it is reported.

The search ends at its round of lowest whole-model KL on the calibration images (later rounds can
raise it: each layer's objective is local). After the search (ours, not in the paper): GPTQ weight
rounding on the searched grids (``gptq.py``; below 8 bits towards the float model's layer outputs,
GPTAQ's objective), empirical bias correction (``bias_correction.py``),
and end-to-end activation-scale tuning (``scale_tuning.py``); each is kept only if it lowers the
whole model's KL on the calibration images, and the report says which were kept.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import VitcompressError
from .calibration import batched_logits, float_copy, logits_kl, quantizers_off
from .minmax import calibrate_observers
from .options import register_options
from .registry import register_method
from .fisher import output_fisher
from .bias_correction import correct_bias, float_output_means
from .gptq import gptq_layers
from .scale_tuning import augmented, scale_tuning_refinement
from .bridge import Bridge, find_bridges, layer_order, well_formed
from .config import QuantConfig
from .modules import QuantConv2d, QuantLinear, TensorQuantizer
from .placement import is_depthwise
from .reconstruction import ReconstructionOptions, reconstruction_kept, reconstruction_refinement
from .refine import Refinement, apply_refinements
from .spec import QuantSpec, qparams_from_range
from .tracing import consumers_of


@register_options("qhyvit")
@dataclass(frozen=True)
class QHyViTOptions(ReconstructionOptions):
    alphas: int = 40
    rounds: int = 3
    search_granularity: bool = True
    gptq: bool = True  # ours: GPTQ weight rounding on the searched grids, after the search (gptq.py)
    # ours: what GPTQ rounds towards: "own" (each layer's output on its quantized input, plain GPTQ),
    # "float" (the float model's layer output, GPTAQ's objective), "auto" (float below 8 bits, where
    # it lowered the val KL 3-8 %; at W8A8 it lowered it on mobilevit_xxs and raised it on mobilevitv2_050)
    gptq_target: str = "auto"
    # ours: GPTQ takes input columns in decreasing order of their Hessian diagonal (GPTQ's act-order);
    # W6A6, 32 images, val KL: mobilevit_xxs 0.0127 -> 0.0102, mobilevitv2_050 0.0113 -> 0.0110 (docs/qhyvit.md)
    gptq_act_order: bool = True
    # reconstruction_steps, qdrop, reconstruction_augment, reconstruction_fisher (ReconstructionOptions): weight rounding learned per
    # block (bridge blocks and the blocks between them) after the search; by default at 6 bits or fewer
    # (auto_max_bits), where it lowered the held-out KL (docs/reconstruction.md). GPTQ runs only where it was not kept.
    bias_correction: bool = True  # ours: empirical bias correction after the search (bias_correction.py)
    scale_tuning_steps: int = 600  # ours: end-to-end activation-scale tuning after them (scale_tuning.py); 0 = off
    # per-channel activation candidates: "depthwise" convs | "all" convs | "none"; never a Linear, nor a
    # layer fed directly by another (onnxruntime's fused integer kernels take one activation zero point)
    activation_granularity: str = "depthwise"
    search_scheme: bool = True
    # ours: activation candidates (α, granularity, scheme) scored by a 2-fold cross-fit over the
    # calibration images (range from one half, error on the other): per-channel ranges fit on few
    # images overfit (docs/qhyvit.md, "Why W8A8 at 32 images ended below min-max")
    crossfit: bool = True
    bridge_reconstruction: bool = True
    keep_best_round: bool = True  # end with the round whose whole-model calibration KL is lowest (0 = min-max)
    batch_size: int = 32  # images per forward/backward chunk
    weights_alone: bool = False  # search weights with the layer's input quantizer off
    quantized_inputs: bool = False  # feed targets the quantized model's inputs (error accumulated upstream)
    objective: str = "hessian"  # "hessian" (the paper's) or "mse" (unweighted output error, for ablation)

    def __post_init__(self):
        super().__post_init__()
        if self.gptq_target not in ("own", "float", "auto"):
            raise VitcompressError(f"qhyvit gptq_target must be own, float or auto, got {self.gptq_target!r}")
        if self.activation_granularity not in ("depthwise", "all", "none"):
            raise VitcompressError(f"qhyvit activation_granularity must be depthwise, all or none, got {self.activation_granularity!r}")

    @classmethod
    def from_config(cls, config: QuantConfig) -> "QHyViTOptions":
        raw = dict(getattr(config, "method_options", {}) or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise VitcompressError(f"unknown qhyvit option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**{**raw, **cls.given(raw)})


def _alpha_grid(n: int) -> torch.Tensor:
    return torch.linspace(0.01, 1.2, n)


def _range(t: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.per_channel:
        flat = t.detach().movedim(spec.axis, 0).reshape(t.shape[spec.axis], -1)
        return flat.amin(1), flat.amax(1)
    return t.detach().amin(), t.detach().amax()


class _Target:
    """One quantized layer and what its error is measured on (itself, or its bridge block)."""

    def __init__(self, model: nn.Module, name: str, bridge: Bridge | None):
        self.name = name
        self.layer = model.get_submodule(name)
        self.bridge = bridge
        self.key = name if bridge is None else bridge.name
        self.first = self.layer if bridge is None else bridge.modules(model)[0]
        self.last = self.layer if bridge is None else bridge.modules(model)[-1]

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) if self.bridge is None else self.bridge.forward(model, x)


def _record(model: nn.Module, calib: torch.Tensor, targets: list[_Target], bs: int, fisher: bool,
            fisher_labels: int = 16, seed: int = 0, map_shards: Callable | None = None) -> dict[str, torch.Tensor]:
    """One pass over the calibration images.

    ``fisher=False``: the float inputs of every target block and of every layer
    (keys "in:<key>", "layer:<name>"), and the block outputs ("out:<key>").
    ``fisher=True``: the diagonal of the Hessian of L = KL(float ‖ quantized) at the float model,
    which is the Fisher information of the model's prediction, at each block output ("g2:<key>").
    """
    if fisher:
        lasts = {t.key: t.last for t in targets}
        return {"g2:" + k: v for k, v in output_fisher(model, calib, lasts, bs, fisher_labels, seed, map_shards).items()}
    chunks: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def keep(key: str, t: torch.Tensor) -> None:
        chunks.setdefault(key, []).append(t.detach().clone())  # clone: later in-place ops (SiLU, +=) reuse storage

    seen_blocks = set()
    for t in targets:
        hooks.append(t.layer.register_forward_pre_hook(lambda m, inp, n=t.name: keep("layer:" + n, inp[0])))
        if t.key in seen_blocks:
            continue
        seen_blocks.add(t.key)
        if t.bridge is not None:  # a layer alone: its block input is its layer input, recorded once
            hooks.append(t.first.register_forward_pre_hook(lambda m, inp, k=t.key: keep("in:" + k, inp[0])))
        hooks.append(t.last.register_forward_hook(lambda m, inp, out, k=t.key: keep("out:" + k, out)))
    try:
        for i in range(0, len(calib), bs):
            with torch.no_grad():
                model(calib[i:i + bs])
    finally:
        for h in hooks:
            h.remove()
    recorded = {}
    for k in list(chunks):  # joined one key at a time: the peak is the records and one key, not twice the records
        recorded[k] = torch.cat(chunks.pop(k))
    for t in targets:
        if t.bridge is None:
            recorded["in:" + t.key] = recorded["layer:" + t.name]
    return recorded


def _rows(n_rows: int, n_images: int, half: int | None) -> slice:
    """Rows of a recorded tensor that belong to one half of the calibration images (None: all).

    Recorded tensors are image-major: the first dimension is the image, or image × patch inside
    MobileViT's unfolded transformer (timm reshapes (B, C, P, N) to (B·P, N, C))."""
    if half is None:
        return slice(None)
    cut = (n_images // 2) * (n_rows // n_images)
    return slice(0, cut) if half == 0 else slice(cut, n_rows)


def _search_quantizer(q: TensorQuantizer, tensor_fn: Callable[[], torch.Tensor], specs: Sequence[QuantSpec],
                      alphas: torch.Tensor, error: Callable[[int | None], float], current_alpha: float = 1.0,
                      n_images: int = 0) -> tuple[float, float, bool]:
    """Try every (spec, α) for one quantizer; keep the best by ``error``.

    ``n_images`` ≥ 2 turns on the 2-fold cross-fit (ours) where the tensor's rows split by image
    (else candidates are scored in sample): each candidate's range is taken on one
    half of the calibration images and its error measured on the other half, both ways, so a
    range that only fits the images it was taken on (per-channel activation ranges on a few
    images: rare channels' peaks unseen) loses to one that carries over. The kept candidate is
    then set as validated: α × the mean of the two halves' ranges (α × the range of all images
    would be wider than what was scored: at W4A4 on mobilevitv2_050, 128 images, val KL 0.119
    against 0.110). ``error(half)`` is the objective summed over that half's
    images (None: all) divided by the number of all images, so the two halves add up.

    Returns the best error, its α and whether the kept range had to be widened to include 0 (an
    asymmetric range entirely on one side of 0: the zero-point overflow case)."""
    tensor = tensor_fn()
    folds = n_images >= 2 and tensor.shape[0] % n_images == 0

    ranges: dict[tuple[QuantSpec, int | None], tuple[torch.Tensor, torch.Tensor]] = {}  # one reduction per spec and half, not per α

    def fitted(spec: QuantSpec, alpha: float, half: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if (spec, half) not in ranges:
            ranges[spec, half] = _range(tensor[_rows(tensor.shape[0], n_images, half)], spec)
        lo, hi = ranges[spec, half]
        return lo * alpha, hi * alpha

    def kept(spec: QuantSpec, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not folds:
            return fitted(spec, alpha, None)
        # the estimator the cross-fit validated: α × a half's range (both halves averaged)
        (lo0, hi0), (lo1, hi1) = fitted(spec, alpha, 0), fitted(spec, alpha, 1)
        return (lo0 + lo1) / 2, (hi0 + hi1) / 2

    def score(spec: QuantSpec, alpha: float) -> float:
        q.spec = spec
        if not folds:
            q.set_qparams(*qparams_from_range(*fitted(spec, alpha, None), spec))
            return error(None)
        total = 0.0
        for fit, held in ((0, 1), (1, 0)):
            q.set_qparams(*qparams_from_range(*fitted(spec, alpha, fit), spec))
            total += error(held)
        return total

    # the current parameters are a candidate, scored like the others, so no step raises the objective
    start = (q.spec, q.scale.clone(), q.zero_point.clone())
    best = (score(q.spec, current_alpha) if folds else error(None), None, current_alpha)
    for spec in specs:
        for a in alphas.tolist():
            err = score(spec, a)
            if err < best[0]:
                best = (err, spec, a)
    err, spec, alpha = best
    if spec is None:  # the current parameters stay as they were
        spec = q.spec = start[0]
        q.set_qparams(start[1], start[2])
        lo, hi = kept(spec, alpha)  # only for the overflow count: the kept estimator on this tensor
    else:
        q.spec = spec
        lo, hi = kept(spec, alpha)
        q.set_qparams(*qparams_from_range(lo, hi, spec))
    return err, alpha, not spec.symmetric and bool(((lo > 0) | (hi < 0)).any())


@register_method("qhyvit")
def qhyvit(model: nn.Module, config: QuantConfig, batches: Sequence[torch.Tensor],
           progress: Callable[[int, int], None] | None, map_shards: Callable[[Callable, list], list] | None = None) -> dict:
    """``map_shards`` (a worker pool's map): the min-max start point, the Fisher diagonals and GPTQ's
    input statistics are computed in shards on the workers (the same numbers); the searches run here."""
    opts = QHyViTOptions.from_config(config)
    calib = torch.cat(list(batches))
    calibrate_observers(model, config, batches, None, map_shards)  # min-max start point (Δ₀)
    layers = [n for n, m in model.named_modules() if hasattr(m, "weight_quantizer")]
    example = calib[:1]
    with quantizers_off(model):
        bridges = find_bridges(model, layers, example) if opts.bridge_reconstruction else []
        # A layer reading another quantized layer's output directly: onnxruntime fuses that producer
        # with this layer's input quantizer into one integer kernel (QLinearConv / QLinearMatMul),
        # whose output zero point must be a single value, so its input cannot be per channel.
        fed_by_layer = set(consumers_of(model, layers, (QuantConv2d, QuantLinear), example))
    bridge_of = {n: br for br in bridges for n in br.layers}
    order = [n for n, _ in layer_order(model, layers, example)]
    alphas = _alpha_grid(opts.alphas)
    bs = opts.batch_size
    seed = opts.reconstruction_seed  # every seeded draw of the method: Fisher labels, scale tuning's batches

    # a layer outside the bridges that runs more than once per forward (CoaT shares one position-
    # encoding conv between blocks) has no one input/output to search on: it keeps its min-max start
    alone = [n for n in order if n not in bridge_of]
    with quantizers_off(model):
        repeated = {n for n, ok in zip(alone, well_formed(model, [Bridge(n, layers=[n]) for n in alone], example)) if not ok}
    targets = [_Target(model, n, bridge_of.get(n)) for n in order if n not in repeated]
    history = []
    widened: dict[str, bool] = {}
    alpha_of: dict[TensorQuantizer, float] = {}  # each activation quantizer's current α (1 = the min-max start)
    n_images = len(calib)
    total_steps = opts.rounds * len(targets)
    step = 0
    with quantizers_off(model):  # the float model: inputs, outputs, Fisher and logits to match
        fp = _record(model, calib, targets, bs, fisher=False)
        grads = _record(model, calib, targets, bs, fisher=True, seed=seed, map_shards=map_shards) if opts.objective == "hessian" else {}
        float_logits = batched_logits(model, calib, bs)
        tuning_images = augmented(calib) if opts.scale_tuning_steps else None
        tuning_logits = batched_logits(model, tuning_images, bs) if opts.scale_tuning_steps else None

    def end_to_end() -> float:
        return logits_kl(float_logits, batched_logits(model, calib, bs))

    searched = [q for t in targets for q in (t.layer.weight_quantizer, t.layer.input_quantizer)]

    def snapshot() -> list[tuple]:
        return [(q.spec, q.scale.clone(), q.zero_point.clone()) for q in searched]

    def augmented_kl() -> float | None:  # reported beside the calibration KL: the views are not fitted by the search
        return logits_kl(tuning_logits, batched_logits(model, tuning_images, bs)) if tuning_images is not None else None

    e2e_history = [end_to_end()]
    augmented_history = [augmented_kl()]
    best_round, best = 0, snapshot()
    for r in range(opts.rounds):
        round_err = 0.0
        inputs = _record(model, calib, targets, bs, fisher=False) if opts.quantized_inputs else fp
        for t in targets:
            x_fp, o_fp = inputs["in:" + t.key], fp["out:" + t.key]
            g2 = grads["g2:" + t.key] if opts.objective == "hessian" else torch.ones_like(o_fp)

            def error(half: int | None) -> float:
                x, o, w = (v[_rows(len(v), n_images, half)] for v in (x_fp, o_fp, g2))
                with torch.no_grad():
                    return float((w * (t.run(model, x) - o).pow(2)).sum() / len(x_fp))

            wq, aq = t.layer.weight_quantizer, t.layer.input_quantizer
            wspecs = [QuantSpec(wq.spec.bits, True, True, 0)]
            if opts.search_granularity:
                wspecs.append(QuantSpec(wq.spec.bits, True, False, 0))
            schemes = [aq.spec.symmetric, not aq.spec.symmetric] if opts.search_scheme else [aq.spec.symmetric]
            # (a Linear's input stays per tensor too: onnxruntime's integer MatMul kernels take one zero point)
            per_channel_ok = ({"all": True, "depthwise": is_depthwise(t.layer), "none": False}[opts.activation_granularity]
                              and isinstance(t.layer, nn.Conv2d) and t.name not in fed_by_layer)
            granularities = [False, True] if per_channel_ok else [False]
            axis = 1 if isinstance(t.layer, nn.Conv2d) else -1  # channels: NCHW maps, (…, D) tokens
            aspecs = [QuantSpec(aq.spec.bits, sym, pc, axis if pc else 0) for pc in granularities for sym in schemes]
            aq_mode = aq.mode
            if opts.weights_alone:
                aq.mode = "off"
            _search_quantizer(wq, lambda: t.layer.weight, wspecs, alphas, error)
            aq.mode = aq_mode
            err, alpha_of[aq], widened[t.name] = _search_quantizer(
                aq, lambda: fp["layer:" + t.name], aspecs, alphas, error, alpha_of.get(aq, 1.0),
                n_images if opts.crossfit else 0)
            round_err += err
            step += 1
            if progress:
                progress(step, total_steps)
        history.append(round_err)
        e2e_history.append(end_to_end())
        augmented_history.append(augmented_kl())
        if not opts.keep_best_round or e2e_history[-1] < e2e_history[best_round]:
            best_round, best = r + 1, snapshot()
    # Later rounds can raise the whole model's KL (each layer's objective is local): the round with
    # the lowest calibration KL is the search's result.
    for q, (spec, scale, zp) in zip(searched, best):
        q.spec = spec
        q.set_qparams(scale, zp)
    e2e_history.append(e2e_history[best_round])

    # Post-search refinements (ours, refine.py) are kept only if they lower the whole model's KL on
    # the calibration images, the search's own end-to-end yardstick. Scale tuning is judged on the
    # augmented images it was fit on: the plain-image KL is too noisy a judge of it (docs/qhyvit.md).
    input_quantizers = [q for q in (model.get_submodule(n).input_quantizer for n in order) if q.mode == "quantize"]

    # the float model's layer means, taken while the weights are still float (GPTQ rewrites them)
    float_means = float_output_means(model, order, batches) if opts.bias_correction else None
    scale_tuning, tuning_checks = scale_tuning_refinement(input_quantizers, tuning_images, tuning_logits,
                                                          opts.scale_tuning_steps, batch_size=bs, seed=seed)

    # "auto": towards the float model below 8 bits; if that does not lower the calibration KL, plain
    # GPTQ gets its own chance (docs/qhyvit.md, "GPTQ target")
    first_target = opts.gptq_target if opts.gptq_target != "auto" else (
        "own" if min(config.wbits, config.abits) >= 8 else "float")

    def round_weights(target: str) -> Callable[..., list[str]]:
        def run(m: nn.Module, names: Sequence[str], b: Sequence[torch.Tensor]) -> list[str]:
            # m's weights are still float when GPTQ runs (it is the first post-search step)
            reference = None if target == "own" else float_copy(m)
            return gptq_layers(m, names, b, reference, act_order=opts.gptq_act_order, map_shards=map_shards)
        return run

    reconstruction, reconstruction_report = reconstruction_refinement(
        order, opts.reconstruction_config(min(config.wbits, config.abits), batch_size=bs),
        bridges, progress, map_shards=map_shards)
    weights_of = lambda m: [m.weight]  # noqa: E731
    refinements = [
        reconstruction,
        Refinement("gptq", lambda done: opts.gptq and not reconstruction_kept(done), round_weights(first_target), weights_of),
        Refinement("gptq_own", lambda done: (opts.gptq and opts.gptq_target == "auto" and first_target == "float"
                                             and "gptq" in done and not done["gptq"]["kept"]), round_weights("own"), weights_of),
        Refinement("bias_correction", lambda done: opts.bias_correction, lambda m, o, b: correct_bias(m, o, b, float_means),
                   lambda m: [m.bias] if m.bias is not None else []),
        scale_tuning,
    ]
    post_steps = apply_refinements(model, order, batches, refinements, end_to_end, e2e_history[-1], on_kept=e2e_history.append)
    if "gptq" in post_steps:
        post_steps["gptq"]["target"] = first_target
    if "reconstruction" in post_steps:
        post_steps["reconstruction"].update(reconstruction_report)
    if "scale_tuning" in post_steps:
        post_steps["scale_tuning"]["augmented_kl_checks"] = tuning_checks  # start, then every 50 steps

    choices = {}
    for name in order:
        layer = model.get_submodule(name)
        aspec = layer.input_quantizer.spec
        choices[name] = {"weights": "per-channel" if layer.weight_quantizer.spec.per_channel else "per-tensor",
                         "activations": ("symmetric" if aspec.symmetric else "asymmetric")
                         + (", per-channel" if aspec.per_channel else "")}
    overflow = sum(widened.values())
    return {
        "qhyvit": {
            "options": opts.__dict__,
            "bridge_blocks": [{"block": b.name, "layers": len(b.layers)} for b in bridges],
            "objective_per_round": history,
            "calibration_kl_per_round": e2e_history,  # KL(float ‖ quantized) on the calibration images; [0] = min-max,
            # then one entry per round, then the best round's (the search's result), then one per post-search step kept
            "augmented_kl_per_round": augmented_history,  # [0] = min-max, then one per round (scale tuning on)
            "best_round": best_round,
            "post_search_steps": post_steps,  # per step: layers changed, KL before/after on the images it is judged on,
            # calibration KL after, kept?
            "choices": choices,
            "zero_point_fix_fired": overflow,
            "per_channel_activations": sorted(n for n, c in choices.items() if "per-channel" in c["activations"]),
            **({"not_searched_called_repeatedly": sorted(repeated)} if repeated else {}),
        }
    }
