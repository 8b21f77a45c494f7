"""MPTQ-ViT: SQ-b keeps the float function, OPT-m beats one scale on a real post-GELU activation,
greedy mixed precision meets its budget, and the whole method exports consistently."""
import copy
import random

import numpy as np
import pytest
import torch
import yaml

from vitcompress.errors import VitcompressError
from vitcompress.quant import QuantConfig, quantize_
from vitcompress.quant.mixed_precision import average_bits, check_budget_tight, greedy_mixed_precision
from vitcompress.quant.optm import TwoRegionQuantizer, search_two_region, two_region_quantize
from vitcompress.quant.smoothquant import apply_sqb, find_layernorm_linear_pairs
from vitcompress.quant.spec import QuantSpec, fake_quantize, qparams_from_range

W4, A4 = QuantSpec(4, True, True, 0), QuantSpec(4, False)


def test_sqb_pairs_come_from_dataflow_and_float_function_is_unchanged(loaded, calib_batches):
    model = copy.deepcopy(loaded.model).eval()
    pairs = find_layernorm_linear_pairs(model, calib_batches[0][:2])
    depth = len(model.blocks)
    assert {(p.norm, tuple(p.linears)) for p in pairs} == (
        {(f"blocks.{i}.norm1", (f"blocks.{i}.attn.qkv",)) for i in range(depth)}
        | {(f"blocks.{i}.norm2", (f"blocks.{i}.mlp.fc1",)) for i in range(depth)}
        | {("norm", ("head",))})  # the final norm reaches the head through the class token only
    x = calib_batches[0]
    with torch.no_grad():
        before = model(x)
    gamma_before = model.blocks[0].norm1.weight.detach().clone()
    chosen = apply_sqb(model, calib_batches, lambda name: (W4, A4))
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-5
    assert not torch.allclose(model.blocks[0].norm1.weight, gamma_before)  # something was folded
    # the searched smoothing lowers the quantized output error of every pair
    assert all(v["output_mse"] < v["output_mse_unsmoothed"] for v in chosen.values())


def test_value_smoothing_into_the_output_projection_is_exact(loaded, calib_batches):
    model = copy.deepcopy(loaded.model).eval()
    x = calib_batches[0]
    with torch.no_grad():
        before = model(x)
    chosen = apply_sqb(model, calib_batches, lambda name: (W4, A4), layernorms=False, values=True)
    with torch.no_grad():
        after = model(x)
    assert {v["kind"] for v in chosen.values()} == {"value"} and len(chosen) == len(model.blocks)
    assert (after - before).abs().max().item() <= 1e-5


def _post_gelu_input_and_weight(loaded, batches):
    model = copy.deepcopy(loaded.model).eval()
    fc2 = model.blocks[0].mlp.fc2
    got = []
    h = fc2.register_forward_pre_hook(lambda m, i: got.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for x in batches:
            model(x)
    h.remove()
    x = torch.cat(got)
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:1024]], fc2.weight.detach()


def test_optm_has_lower_output_error_than_a_single_scale_on_real_post_gelu(loaded, calib_batches):
    x, weight = _post_gelu_input_and_weight(loaded, calib_batches)
    assert x.min() < 0 < x.max()  # a GELU output: small negative tail, long positive one
    w_scale, w_zp = qparams_from_range(weight.amin(1), weight.amax(1), W4)
    wq = fake_quantize(weight, w_scale, w_zp, W4)

    def product(a):
        return a @ wq.t()

    found = search_two_region(x, product, bits=4)
    ref = product(x)
    opt_err = (product(two_region_quantize(x, found["base_scale"], found["zero_point"], found["ratio"], 4)) - ref).pow(2).mean()
    s, z = qparams_from_range(x.min(), x.max(), A4)  # the plain 4-bit min-max quantizer
    minmax_err = (product(fake_quantize(x, s, z, A4)) - ref).pow(2).mean()
    assert found["ratio"] > 1
    assert opt_err < 0.5 * minmax_err
    assert found["output_mse"] < found["output_mse_single_scale"]  # the best single scale (m = 1) too


def test_two_region_quantizer_module_matches_the_searched_function(loaded, calib_batches):
    x, _ = _post_gelu_input_and_weight(loaded, calib_batches)
    q = TwoRegionQuantizer(4)
    scale, zp = torch.tensor(0.05), torch.tensor(2, dtype=torch.int32)
    q.set_regions(scale, zp, 8)
    fine, coarse = q.parts(x)
    assert torch.equal(q(x), two_region_quantize(x, scale, zp, 8, 4))
    assert torch.equal(fine + coarse, q(x))
    assert len(torch.unique(q(x))) <= 2 ** 4  # two regions of 3 bits: at most 16 levels


def _additive_problem(n: int, seed: int):
    rng = random.Random(seed)
    macs = {f"l{i}": rng.choice([1, 3, 4, 12]) * 1000 + rng.randint(0, 50) for i in range(n)}
    weight = {k: rng.random() for k in macs}
    return macs, (lambda a: sum(weight[k] * 2.0 ** (-a[k]) for k in a))


@pytest.mark.parametrize("target", [4.0, 4.5, 5.0, 5.37, 6.0, 8.0])
def test_greedy_budget_is_met_exactly(target):
    macs, sensitivity = _additive_problem(20, seed=int(target * 100))
    choices = (4, 5, 6, 8)
    assignment, path, isolated = greedy_mixed_precision(macs, choices, target, sensitivity)
    assert set(isolated) == set(macs) and all(set(v) == set(choices) for v in isolated.values())
    assert average_bits(assignment, macs) <= target + 1e-12
    assert check_budget_tight(assignment, macs, choices, target)
    assert path[0]["average_bits"] == 8 and path[-1]["average_bits"] == pytest.approx(average_bits(assignment, macs))
    assert all(b in choices for b in assignment.values())


def test_greedy_lowers_the_least_sensitive_layer_first():
    macs = {"a": 100, "b": 100}
    assignment, path, _ = greedy_mixed_precision(macs, (4, 8), 6.0, lambda a: (8 - a["a"]) * 10 + (8 - a["b"]))
    assert assignment == {"a": 8, "b": 4}
    assert path[1]["step"] == "lower b to 4"


def test_mptq_mixed_precision_on_the_model(loaded, calib_batches):
    model = copy.deepcopy(loaded.model)
    # min-max calibration (parts []) keeps the test quick; the walk is the same for every part
    # only block 0 walks (skip keeps blocks 1-5 float): the walk is the same, the test is quick
    cfg = QuantConfig(method="mptq", skip=("blocks.[1-5].*",),
                      method_options={"target_bits": 5.5, "bit_choices": [4, 8], "parts": []})
    result = quantize_(model, cfg, [calib_batches[0][:16]])
    mp = result.method_info["mixed_precision"]
    assert mp["weighting"] == "MACs per image"
    assert mp["average_bits"] <= 5.5 + 1e-12
    assert check_budget_tight(mp["assignment"], mp["macs"], (4, 8), 5.5)
    assert cfg.label == "mp5.5" and cfg.simulated
    # the quantizers carry the assigned widths
    for layer, bits in mp["assignment"].items():
        m = dict(model.named_modules())[layer]
        q = getattr(m, "weight_quantizer", None) or m.a_quantizer
        assert q.spec.bits == bits
    # the walk's measured KL at the end is worse than at the start (it did lower widths)
    assert mp["path"][-1]["kl"] > mp["path"][0]["kl"]


def test_mptq_full_exports_consistently(tmp_path):
    from tests.conftest import BUNDLED_CKPT, CALIB, VAL
    from vitcompress import QuantizeJob, quantize

    # a short reconstruction: the export must also carry learned rounding and step sizes exactly
    cfg = QuantConfig(method="mptq", wbits=6, abits=6, placement="partial+matmul",
                      method_options={"full": True, "reconstruction_steps": 10})
    job = QuantizeJob(out=tmp_path / "out", checkpoint=BUNDLED_CKPT, config=cfg, calib_dir=CALIB, calib_size=32,
                      eval_dir=VAL, eval_size=200, latency_rounds=3)
    report = quantize(job)
    q = report["quantization"]
    assert "blocks.0.attn.av_matmul" in q["mptq"]["optm"] and "blocks.0.mlp.fc2" in q["mptq"]["optm"]
    assert "blocks.0.norm1" in q["mptq"]["full_extra_quantized_inputs"]
    assert "two integer MatMuls" in q["mptq"]["optm_export"]
    assert report["accuracy"]["export_vs_torch_agreement"] >= 98.0
    assert report["accuracy"]["top1_agreement"] >= 90.0
    # the checkpoint reloads with its OPT-m regions and LayerNorm/GELU input quantizers: the same artifact
    from vitcompress.api import export
    from vitcompress.data import load_tensor, sample, scan_images
    from vitcompress.export import make_session
    from vitcompress.export.runtime import run_session

    info = export(tmp_path / "re", checkpoint=tmp_path / "out" / "model.w6a6.pth")
    x = load_tensor(sample(scan_images(VAL), 64, 0), report_preprocessing(tmp_path / "out" / "model.w6a6.onnx")).numpy()
    a = run_session(make_session(tmp_path / "out" / "model.w6a6.onnx"), x)
    b = run_session(make_session(info["artifact"]), x)
    assert np.array_equal(a.argmax(1), b.argmax(1)) and np.abs(a - b).max() < 1e-4


def report_preprocessing(artifact):
    from vitcompress.data import Preprocessing
    from vitcompress.export import read_metadata

    return Preprocessing.from_dict(read_metadata(artifact)["preprocessing"])


def test_cli_greedy_writes_assignment_that_bits_from_reuses(tmp_path):
    from typer.testing import CliRunner

    from tests.conftest import BUNDLED_CKPT, CALIB
    from vitcompress.cli import app

    runner = CliRunner()
    common = ["quantize", "--checkpoint", str(BUNDLED_CKPT), "--calib", str(CALIB), "--calib-size", "16"]
    recipe = tmp_path / "mp.yaml"  # a recipe step can restrict the parts (min-max calibration keeps this quick)
    recipe.write_text("steps:\n  - quantize:\n      method: mptq\n"
                      "      skip: ['blocks.[1-5].*']\n"
                      "      method_options: {target_bits: 6, bit_choices: [4, 8], parts: []}\n")
    r = runner.invoke(app, common + ["--recipe", str(recipe), "--out", str(tmp_path / "mp")])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load((tmp_path / "mp" / "bits.yaml").read_text())
    assert doc["format"] == "vitcompress-bits/1" and doc["average_bits"] <= 6
    assert (tmp_path / "mp" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # reconstruction off: the assignment is what is compared, and it is read before any refinement
    r2 = runner.invoke(app, common + ["--method", "mptq", "--bits-from", str(tmp_path / "mp" / "bits.yaml"),
                                      "--skip", "blocks.[1-5].*", "--reconstruct-steps", "0",
                                      "--out", str(tmp_path / "again"), "--json"])
    assert r2.exit_code == 0, r2.output
    import json

    again = json.loads(r2.stdout[r2.stdout.index("{"):])
    assert again["quantization"]["mixed_precision"]["assignment"] == doc["layers"]


@pytest.mark.parametrize("options, message", [
    ({"target_bits": 3}, "outside the bit choices"),
    ({"parts": ["sqb", "nope"]}, "unknown MPTQ part"),
    ({"full": True}, "partial\\+matmul"),
    ({"colour": 1}, "unknown mptq option"),
    ({"layer_bits": {"blocks.0.attn.qkv": 4}}, "does not match"),
])
def test_bad_mptq_options_are_one_line_errors(loaded, calib_batches, options, message):
    with pytest.raises(VitcompressError, match=message):
        quantize_(copy.deepcopy(loaded.model), QuantConfig(method="mptq", method_options=options), calib_batches[:1])


def test_mptq_flags_need_the_mptq_method(tmp_path):
    from typer.testing import CliRunner

    from tests.conftest import BUNDLED_CKPT, CALIB
    from vitcompress.cli import app

    r = CliRunner().invoke(app, ["quantize", "--checkpoint", str(BUNDLED_CKPT), "--calib", str(CALIB), "--target-bits", "5",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--method mptq" in r.output


def test_mptq_on_swin_exports_exactly(tmp_path, cpu_target):
    """Swin: SQ-b pairs where a LayerNorm feeds a Linear directly (norm2 -> fc1, patch merging),
    OPT-m on fc2, GPTQ on every Linear; the QDQ export reproduces the torch simulation."""
    from timm.models.swin_transformer import SwinTransformer

    from vitcompress.export import export_qdq, make_session
    from vitcompress.export.runtime import run_session

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(2, 2),
                            num_classes=10).eval()
    x = torch.randn(16, 3, 32, 32)
    # reconstruction off: this test pins GPTQ on Swin (reconstruction would take the rounding over)
    config = QuantConfig(method="mptq", wbits=4, abits=4, reduce_range=cpu_target["reduce_range"],
                         method_options={"reconstruction_steps": 0})
    info = quantize_(model, config, [x[:8], x[8:]]).method_info["mptq"]
    paired = {lin for v in info["sqb"].values() for lin in v["linears"]}
    assert {"layers.0.blocks.0.mlp.fc1", "layers.1.downsample.reduction"} <= paired
    assert "layers.0.blocks.0.mlp.fc2" in info["optm"] and info["gptq_layers"] > 0
    export_qdq(model, (3, 32, 32), tmp_path / "swin.onnx", {})
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_session(make_session(tmp_path / "swin.onnx"), x.numpy())
    assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0 and abs(out - ref).max() < 1e-4


def test_mptq_checkpoint_of_a_swin_reloads_with_the_biases_smoothing_added(tmp_path):
    """SQ-b moves a channel shift into the bias of Swin's patch-merging Linear, built without one:
    the quantized checkpoint must reload into a fresh model (it did not: 'unexpected keys')."""
    from vitcompress import QuantizeJob, load, quantize
    from vitcompress.artifacts import save_checkpoint
    from vitcompress.models import LoadedModel, _create
    from vitcompress.data import Preprocessing
    from tests.conftest import CALIB

    kwargs = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(2, 2))
    torch.manual_seed(0)
    model = _create("swin_tiny_patch4_window7_224", 10, kwargs).eval()
    assert model.layers[1].downsample.reduction.bias is None
    prep = Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, resize_mode="exact")
    float_ckpt = tmp_path / "swin.pth"
    save_checkpoint(float_ckpt, LoadedModel(model, "swin_tiny_patch4_window7_224", prep, 10, kwargs=kwargs), model.state_dict())
    r = quantize(QuantizeJob(out=tmp_path / "q", checkpoint=float_ckpt, config=QuantConfig(method="mptq"),
                             calib_dir=CALIB, calib_size=16, latency_rounds=1))
    reloaded = load(checkpoint=tmp_path / "q" / r["artifacts"]["checkpoint"]["path"])
    assert reloaded.model.layers[1].downsample.reduction.bias is not None
    from vitcompress.export import make_session
    from vitcompress.export.runtime import run_session

    x = torch.randn(4, 3, 32, 32)
    exported = run_session(make_session(tmp_path / "q" / r["artifacts"]["quantized"]["path"]), x.numpy())
    with torch.no_grad():  # the reloaded simulation is the model that was exported
        np.testing.assert_allclose(reloaded.model(x).numpy(), exported, atol=1e-3)


def test_a_layernorm_whose_output_also_reaches_a_conv_through_a_reshape_is_not_smoothed():
    """PVT v2's norm1 feeds q (a Linear) and, reshaped to a map, the spatial-reduction conv: hooks see
    only the Linear. Folding into such a pair would change the conv's input, so it is left out."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.q, self.other = nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8)
            self.sr, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 8)

        def forward(self, x):  # x: (B, 16 tokens, 8)
            y = self.norm(x)
            reduced = self.sr(y.transpose(1, 2).reshape(-1, 8, 4, 4)).flatten(2).transpose(1, 2)
            return self.q(y) + reduced + self.fc(self.other(x))

    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.norm.bias.uniform_(-1, 1), model.other.bias.uniform_(-1, 1)
    x = torch.randn(4, 16, 8)
    assert [p.norm for p in find_layernorm_linear_pairs(model, x)] == ["other"]
    spec = QuantSpec(8, True, True, 0)
    with torch.no_grad():
        before = model(x)
    chosen = apply_sqb(model, [x], lambda name: (spec, QuantSpec(8, False, False, 0)))
    assert list(chosen) == ["other"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


def test_a_pooled_layernorm_is_paired_only_where_the_fold_keeps_the_function():
    """A LayerNorm read through token averaging pairs with the next Linear; one whose pooled output
    also leaves the model unchanged by that Linear (here: added to the logits) is left out."""
    from torch import nn

    class Pooled(nn.Module):
        def __init__(self, leak: bool):
            super().__init__()
            self.leak, self.norm, self.head = leak, nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):  # x: (B, 16 tokens, 8)
            pooled = self.norm(x).mean(1)
            return self.head(pooled) + (pooled if self.leak else 0)

    torch.manual_seed(0)
    x = torch.randn(4, 16, 8)
    for leak, expected in ((False, [("norm", ["head"])]), (True, [])):
        model = Pooled(leak).eval()
        with torch.no_grad():
            model.norm.bias.uniform_(-1, 1)
        assert [(p.norm, p.linears) for p in find_layernorm_linear_pairs(model, x)] == expected
