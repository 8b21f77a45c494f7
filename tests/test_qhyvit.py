import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

from vitcompress.quant import QuantConfig, quantize_
from vitcompress.quant.bridge import find_bridges
from vitcompress.quant.qhyvit import _search_quantizer
from vitcompress.quant.spec import QuantSpec


def _layers(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


@pytest.mark.parametrize("arch, size, expected", [
    ("mobilevit_xxs", 64, ["stages.2.1", "stages.3.1", "stages.4.1"]),    # conv -> unfold -> tokens -> fold
    ("mobilevitv2_050", 64, ["stages.2.1", "stages.3.1", "stages.4.1"]),  # conv -> (C, P, N) patches -> fold
    # the 4-D -> 3-D switch (Flat): from the last 4-D block through Flat to the first Linear after it
    ("efficientformer_l1", 224, ["stages.3.blocks.2..stages.3.blocks.4.token_mixer.qkv"]),
    ("efficientformerv2_s0", 224, []),  # attention runs on 4-D maps: no layout switch between layers
    ("deit_tiny_patch16_224", 224, []),
    ("swin_tiny_patch4_window7_224", 224, []),  # windows regroup tokens between Linears: no conv/token switch
])
def test_bridge_blocks_found_from_structure(arch, size, expected):
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    bridges = find_bridges(model, _layers(model), torch.randn(1, 3, size, size))
    assert [b.name for b in bridges] == expected
    for b in bridges:  # every bridge holds both conv-layout and token-layout layers
        assert len(b.layers) >= 2


class _TokenBlock(nn.Module):
    """A Linear over the channels of a conv map's positions: conv layout in and out, tokens inside."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        n, c, h, w = x.shape
        return self.fc(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)


class _Stage(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.down, self.blocks = nn.Conv2d(c, c, 1), nn.Sequential(_TokenBlock(c), _TokenBlock(c))

    def forward(self, x):
        return self.blocks(self.down(x))


class _TwoStages(nn.Module):
    def __init__(self, op_between: bool = False):
        super().__init__()
        self.stages, self.op_between = nn.Sequential(_Stage(8), _Stage(8)), op_between
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        if self.op_between:  # an operation between the stages: no chain across them
            x = self.stages[1](self.stages[0](x) * 1.0)
        else:
            x = self.stages(x)
        return self.head(x.mean((2, 3)))


def test_a_switch_between_stages_bridges_the_tail_of_one_and_the_head_of_the_next():
    """Where each module hands its output tensor itself to the next, the bridge is the narrowest
    chain across the switch (last block of one stage, first conv of the next), not both stages
    whole; with an operation between the stages it falls back to the span of both. Each bridge
    run alone gives what it gives inside the model."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    model = _TwoStages().eval()
    bridges = find_bridges(model, _layers(model), x)
    assert [b.name for b in bridges] == ["stages.0.down..stages.0.blocks.0", "stages.0.blocks.1..stages.1.down",
                                         "stages.1.down..stages.1.blocks.0"]
    owned = [n for b in bridges for n in b.layers]
    assert len(owned) == len(set(owned)) == 5  # each layer in one bridge; the last block and the head alone
    for b in bridges:
        seen = {}
        first, last = b.modules(model)[0], b.modules(model)[-1]
        hooks = [first.register_forward_pre_hook(lambda m, inp: seen.setdefault("in", inp[0])),
                 last.register_forward_hook(lambda m, inp, out: seen.setdefault("out", out))]
        with torch.no_grad():
            model(x)
            for h in hooks:
                h.remove()
            assert torch.equal(b.forward(model, seen["in"]), seen["out"]), b.name

    fallback = _TwoStages(op_between=True).eval()
    names = [b.name for b in find_bridges(fallback, _layers(fallback), x)]
    assert "stages[0:2]" in names and "stages.0.blocks.1..stages.1.down" not in names


def test_search_never_increases_the_objective_and_fixes_a_bad_start():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(64, 16)
    model = nn.Sequential(layer)
    quantize_(model, QuantConfig(wbits=4, abits=4, fold_batchnorm=False), [x])
    target = layer(x).detach()
    wq = layer.weight_quantizer
    wq.set_qparams(wq.scale * 0.05, wq.zero_point)  # a terrible starting scale

    def error(half=None):
        assert half is None  # a weight's range does not depend on the images: no cross-fit
        with torch.no_grad():
            return float((layer(x) - target).pow(2).sum())

    with torch.no_grad():
        layer.input_quantizer.mode = "off"
        target = nn.functional.linear(x, layer.weight, layer.bias)
        start = error()
        best, _, _ = _search_quantizer(wq, lambda: layer.weight, [QuantSpec(4, True, True, 0), QuantSpec(4, True, False, 0)],
                                    torch.linspace(0.01, 1.2, 40), error)
    assert best == pytest.approx(error())
    assert best < 0.1 * start


def _spiky(n, seed):
    """Inputs whose channels 4-7 are near 0 but for one rare spike each, in a random image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([4 * torch.randn(n, 4, generator=g), 0.1 * torch.randn(n, 4, generator=g)], 1)
    rows = torch.randperm(n, generator=g)[:4]
    x[rows, torch.arange(4, 8)] = 6.0
    return x


def test_crossfit_rejects_per_channel_ranges_that_only_fit_their_own_images():
    x, unseen = _spiky(64, 0), _spiky(64, 1)
    x[:32, 4:] = 0.1 * torch.randn(32, 4, generator=torch.Generator().manual_seed(2))  # spikes in the 2nd half only
    x[32:36, 4:] = torch.eye(4) * 6.0
    model = nn.Sequential(nn.Linear(8, 8))
    quantize_(model, QuantConfig(wbits=8, abits=8, fold_batchnorm=False), [x])
    aq = model[0].input_quantizer
    specs = [QuantSpec(8, True, False, 0), QuantSpec(8, True, True, 1)]

    def error_on(data):
        def error(half=None):
            rows = data if half is None else data[:32] if half == 0 else data[32:]
            with torch.no_grad():
                return float((aq(rows) - rows).pow(2).sum() / len(data))
        return error

    chosen = {}
    for n_images in (0, 64):  # in-sample, then cross-fit
        _search_quantizer(aq, lambda: x, specs, torch.linspace(0.5, 1.2, 8), error_on(x), n_images=n_images)
        chosen[n_images] = (aq.spec.per_channel, error_on(unseen)())
    assert chosen[0][0] and not chosen[64][0]  # in-sample per-channel ranges win; the cross-fit sees them clip
    assert chosen[64][1] < 0.5 * chosen[0][1]  # and on images neither saw, its choice is the better one


def test_zero_point_overflow_is_fixed_and_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.rand(32, 8) + 2.0  # strictly positive inputs: an asymmetric range would exclude 0
    result = quantize_(model, QuantConfig(method="qhyvit", wbits=8, abits=8, act_symmetric=False, fold_batchnorm=False,
                                          method_options={"rounds": 1, "alphas": 8, "search_scheme": False}), [x])
    aq = model[0].input_quantizer
    assert int(aq.zero_point) == 0  # range widened down to 0: the zero point sits at the grid's edge, not beyond
    assert result.method_info["qhyvit"]["zero_point_fix_fired"] == 1


def test_qhyvit_zero_point_report_and_export_agreement(loaded, calib_batches, tmp_path):
    from vitcompress.export import export_qdq, make_session
    from vitcompress.export.runtime import run_session

    from vitcompress.quant.calibration import logits_kl

    m = copy.deepcopy(loaded.model)
    calib = torch.cat(calib_batches)[:16]
    with torch.no_grad():
        float_logits = loaded.model(calib)
    result = quantize_(m, QuantConfig(method="qhyvit", wbits=6, abits=6, method_options={"rounds": 2, "alphas": 6, "scale_tuning_steps": 100,
                                                                                      "reconstruction_steps": 0}),
                       [calib])
    info = result.method_info["qhyvit"]
    assert isinstance(info["zero_point_fix_fired"], int)
    assert len(info["choices"]) == 26 and len(info["objective_per_round"]) == 2
    # the search ends at its round with the lowest calibration KL (0 = min-max); post-search steps
    # are kept only when they lower it further, a rejected one is undone, so the model ends exactly
    # at the last recorded KL
    steps, kl = info["post_search_steps"], info["calibration_kl_per_round"]
    assert {"gptq", "bias_correction", "scale_tuning"} <= set(steps) and steps["gptq"]["layers"] > 0
    assert steps["gptq"]["target"] == "float"  # "auto" below 8 bits: towards the float model first,
    assert ("gptq_own" in steps) == (not steps["gptq"]["kept"])  # plain GPTQ only if that was rejected
    assert len(kl) == 4 + sum(s["kept"] for s in steps.values())
    assert kl[3] == min(kl[:3]) == kl[info["best_round"]]
    assert all(st["kept"] == (st["kl_after"] < st["kl_before"]) for st in steps.values())
    kept_kl = iter(kl[4:])
    for name in ("gptq", "gptq_own", "bias_correction"):  # judged on the calibration images themselves
        if name in steps and steps[name]["kept"]:
            assert next(kept_kl) == steps[name]["calibration_kl"] < steps[name]["kl_before"]
    with torch.no_grad():
        assert logits_kl(float_logits, m(calib)) == pytest.approx(kl[-1], rel=1e-4)
    export_qdq(m, loaded.preprocessing.input_size, tmp_path / "q.onnx", {})
    from tests.conftest import VAL
    from vitcompress.data import load_tensor, sample, scan_images

    x = load_tensor(sample(scan_images(VAL), 500, 0), loaded.preprocessing)  # enough images that one near-tie is 0.2 %
    with torch.no_grad():
        ref = m(x).numpy()
    got = run_session(make_session(tmp_path / "q.onnx"), x.numpy())
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99
    assert np.isfinite(got).all()


def test_qhyvit_checkpoint_reloads_with_each_layers_grid(tmp_path):
    """Searched per-layer granularity/scheme survive a checkpoint round trip (same ONNX outputs)."""
    import json

    from typer.testing import CliRunner

    from tests.conftest import BUNDLED_CKPT, CALIB, VAL
    from vitcompress.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - quantize: {method: qhyvit, wbits: 6, abits: 6, method_options: {rounds: 1, alphas: 6, scale_tuning_steps: 50, reconstruction_steps: 0}}\n")
    run = CliRunner().invoke
    r = run(app, ["quantize", "--checkpoint", str(BUNDLED_CKPT), "--recipe", str(recipe), "--calib", str(CALIB),
                  "--calib-size", "16", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    choices = json.loads((tmp_path / "q" / "report.json").read_text())["quantization"]["qhyvit"]["choices"]
    assert choices
    r = run(app, ["export", "--checkpoint", str(tmp_path / "q" / "model.w6a6.pth"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    r = run(app, ["check", str(tmp_path / "e" / "model.quantized.onnx"), "--baseline", str(tmp_path / "q" / "model.w6a6.onnx"),
                  "--eval", str(VAL), "--eval-size", "100", "--max-drop", "0", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c.json").read_text())["top1_agreement"] == 100.0


def test_unknown_or_invalid_qhyvit_options_are_clear_errors():
    from vitcompress.errors import VitcompressError

    model = nn.Sequential(nn.Linear(8, 4))
    for opts in ({"alpha": 3}, {"activation_granularity": "some"}, {"gptq_target": "best"}):
        with pytest.raises(VitcompressError, match="qhyvit"):
            quantize_(copy.deepcopy(model), QuantConfig(method="qhyvit", fold_batchnorm=False, method_options=opts),
                      [torch.randn(4, 8)])


def test_depthwise_inputs_with_uneven_channels_choose_per_channel_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.SiLU(),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():  # channel ranges spanning three orders of magnitude after the first conv
        model[0].weight.mul_(torch.logspace(-2, 1, 8).view(8, 1, 1, 1))
    x = torch.randn(32, 3, 8, 8)
    result = quantize_(model, QuantConfig(method="qhyvit", wbits=6, abits=6, narrow_layer_bits=6, fold_batchnorm=False,
                                          method_options={"rounds": 1, "alphas": 10, "reconstruction_steps": 0}), [x])
    info = result.method_info["qhyvit"]
    assert info["per_channel_activations"] == ["2"]  # only the depthwise conv may take per-channel inputs
    assert model[2].input_quantizer.spec.per_channel and model[2].input_quantizer.spec.axis == 1
    kl = info["calibration_kl_per_round"]
    assert kl[-1] < kl[0]  # the searched model is closer to float than min-max on the calibration images


def test_a_depthwise_conv_fed_directly_by_a_conv_keeps_a_per_tensor_input_and_the_export_runs(tmp_path):
    """Nothing between the two convs: onnxruntime fuses the first with the depthwise conv's input
    quantizer into one QLinearConv, whose output zero point must be a single value (RepViT's stem
    failed at inference with a per-channel one)."""
    from vitcompress.export import export_qdq, make_session
    from vitcompress.export.runtime import run_session

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.SiLU(),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():  # uneven channel ranges, which per-channel inputs would otherwise win on
        model[0].weight.mul_(torch.logspace(-2, 1, 8).view(8, 1, 1, 1))
    x = torch.randn(32, 3, 8, 8)
    result = quantize_(model, QuantConfig(method="qhyvit", fold_batchnorm=False,
                                          method_options={"rounds": 1, "alphas": 10, "activation_granularity": "all"}), [x])
    assert "1" not in result.method_info["qhyvit"]["per_channel_activations"]
    assert not model[1].input_quantizer.spec.per_channel
    export_qdq(model, (3, 8, 8), tmp_path / "m.onnx", {})
    out = run_session(make_session(tmp_path / "m.onnx"), x.numpy())
    with torch.no_grad():
        assert (out.argmax(1) == model(x).numpy().argmax(1)).mean() >= 0.95


def test_augmented_calibration_images_are_mirrors_and_shifts():
    from vitcompress.quant.scale_tuning import augmented

    x = torch.randn(3, 3, 32, 32)
    a = augmented(x)
    assert a.shape == (30, 3, 32, 32)
    assert torch.equal(a[:3], x) and torch.equal(a[3:6], x.flip(-1))
    assert torch.equal(a[6:9], x.roll(2, -2))  # shifted by 1/16 of the side


def test_scale_tuning_lowers_the_kl_from_a_bad_activation_scale():
    from vitcompress.quant.calibration import logits_kl, quantizers_off
    from vitcompress.quant.scale_tuning import augmented, tune_activation_scales

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(16, 3, 8, 8)
    quantize_(model, QuantConfig(wbits=6, abits=4, fold_batchnorm=False), [x])
    iq = model[3].input_quantizer
    iq.set_qparams(iq.scale * 3, iq.zero_point)  # a range 3x too wide: most codes unused
    images = augmented(x)
    with torch.no_grad(), quantizers_off(model):
        ref = model(images)
    weights = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        before = logits_kl(ref, model(images))
    checks = tune_activation_scales(model, [model[0].input_quantizer, iq], images, ref, steps=150, lr=0.03,
                                    batch_size=32, check_every=25)
    with torch.no_grad():
        after = logits_kl(ref, model(images))
    assert len(checks) == 1 + 150 // 25 and checks[0] == pytest.approx(before, rel=1e-4)
    assert after == pytest.approx(min(checks), rel=1e-4)  # the scales of the lowest measured KL are kept
    assert after < 0.5 * before
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # only scales move
    assert "forward" not in vars(iq) and iq.mode == "quantize"


def test_large_inputs_go_through_backward_in_pieces_with_the_same_numbers(monkeypatch):
    """Where a batch's module outputs exceed the backward budget (224-px models), the Fisher
    diagonals and scale tuning's steps take it in pieces: the same numbers as whole batches."""
    from vitcompress.quant import calibration
    from vitcompress.quant.fisher import output_fisher
    from vitcompress.quant.scale_tuning import tune_activation_scales

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 12)).eval()
    x = torch.randn(16, 3, 8, 8)
    per_image = calibration.output_bytes_per_image(model, x[:1])
    assert per_image == 4 * (8 * 6 * 6 * 3 + 12)  # conv, ReLU, Flatten and Linear outputs, float32
    assert calibration.images_per_backward(model, x, 16, budget=3 * per_image + 1) == 3
    assert calibration.images_per_backward(model, x, 16, budget=per_image // 2) == 1
    assert calibration.images_per_backward(model, x, 16) == 16  # small inputs are never cut by default

    outputs_of = {"conv": model[0], "head": model[3]}
    whole = output_fisher(model, x, outputs_of, 16, max_exact=4, seed=3)  # 12 classes > 4: sampled labels
    monkeypatch.setattr(calibration, "BACKWARD_BYTES", 3 * per_image)
    pieces = output_fisher(model, x, outputs_of, 16, max_exact=4, seed=3)
    monkeypatch.undo()
    for key in outputs_of:
        assert whole[key].shape[0] == 16 and whole[key].abs().sum() > 0
        torch.testing.assert_close(pieces[key], whole[key], rtol=1e-5, atol=1e-12)

    quantize_(model, QuantConfig(wbits=6, abits=4, fold_batchnorm=False), [x])
    with torch.no_grad(), calibration.quantizers_off(model):
        ref = model(x)
    tuned = [model[0].input_quantizer, model[3].input_quantizer]
    start = [q.scale.clone() for q in tuned]

    def tune() -> list[torch.Tensor]:
        for q, s in zip(tuned, start):
            q.set_qparams(s.clone(), q.zero_point)
        tune_activation_scales(model, tuned, x, ref, steps=5, lr=0.05, batch_size=8, check_every=5)
        return [q.scale.clone() for q in tuned]

    one_batch = tune()
    monkeypatch.setattr(calibration, "BACKWARD_BYTES", 3 * calibration.output_bytes_per_image(model, x[:1]))
    in_pieces = tune()
    assert not torch.equal(one_batch[1], start[1])  # the steps moved the scale
    for a, b in zip(in_pieces, one_batch):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


class _SharedPositionConv(nn.Module):
    """CoaT's pattern: one conv module run twice per forward (a position encoding shared by two blocks)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pos(x)
        x = x + self.pos(x)
        return self.head(x.mean((2, 3)))


def test_a_layer_run_twice_per_forward_keeps_its_min_max_start_and_is_named():
    torch.manual_seed(0)
    model = _SharedPositionConv().eval()
    x = torch.randn(8, 3, 8, 8)
    result = quantize_(model, QuantConfig(method="qhyvit", method_options={"rounds": 1, "alphas": 6, "scale_tuning_steps": 0}), [x])
    info = result.method_info["qhyvit"]
    assert info["not_searched_called_repeatedly"] == ["pos"]
    assert set(info["choices"]) == {"stem", "pos", "head"}


def test_the_reconstruction_seed_reaches_every_seeded_draw_of_qhyvit(monkeypatch):
    from vitcompress.quant import qhyvit

    seen = {}
    fisher, tuning = qhyvit.output_fisher, qhyvit.scale_tuning_refinement

    def record_fisher(*args):
        seen["fisher"] = args[5]  # output_fisher(model, images, outputs, batch_size, labels, seed, map_shards)
        return fisher(*args)

    def record_tuning(*args, seed, **kwargs):
        seen["scale tuning"] = seed
        return tuning(*args, seed=seed, **kwargs)

    monkeypatch.setattr(qhyvit, "output_fisher", record_fisher)
    monkeypatch.setattr(qhyvit, "scale_tuning_refinement", record_tuning)
    torch.manual_seed(0)
    options = {"rounds": 1, "alphas": 6, "scale_tuning_steps": 2, "reconstruction_steps": 0, "reconstruction_seed": 3}
    quantize_(_SharedPositionConv().eval(), QuantConfig(method="qhyvit", method_options=options), [torch.randn(8, 3, 8, 8)])
    assert seen == {"fisher": 3, "scale tuning": 3}


class _ClassAttention(nn.Module):
    """CaiT's pattern: a block called with two tensors (the tokens and the class token)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(8, 8)
        self.q = nn.Linear(8, 8)

    def forward(self, x, cls):
        keys = self.k(x)  # (B, N, 8)
        return cls + self.q(cls[:, 0] * keys.mean(1)).unsqueeze(1)  # (B, 8): the layout switches inside


class _TwoInputBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.Sequential(_ClassAttention(), _ClassAttention())

    def forward(self, x):
        x = self.stem(x)
        cls = x[:, :1]
        for b in self.blocks:
            cls = b(x, cls)
        return cls[:, 0]


def test_a_block_taking_two_tensors_is_no_bridge_and_its_layers_are_searched_alone():
    torch.manual_seed(0)
    model = _TwoInputBlocks().eval()
    x = torch.randn(8, 5, 4)
    layers = ["stem", "blocks.0.k", "blocks.0.q", "blocks.1.k", "blocks.1.q"]
    assert find_bridges(model, layers, x[:1]) == []
    result = quantize_(model, QuantConfig(method="qhyvit", method_options={"rounds": 1, "alphas": 6, "scale_tuning_steps": 0}), [x])
    assert set(result.method_info["qhyvit"]["choices"]) == set(layers)
