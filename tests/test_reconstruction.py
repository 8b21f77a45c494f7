import copy

import pytest
import timm
import torch

from vitcompress.errors import VitcompressError
from vitcompress.quant import QuantConfig, quantize_
from vitcompress.quant.bridge import find_bridges
from vitcompress.quant.calibration import batched_logits, float_copy, logits_kl, quantizers_off
from vitcompress.quant.blockwise import reconstruction_blocks
from vitcompress.quant.reconstruction import (AUTO_STEPS, RECONSTRUCTION_AUGMENT, ReconstructionConfig, _Average, reconstruct,
                                              steps_for)
from vitcompress.quant.refine import Refinement, apply_refinements
from vitcompress.quant.spec import fake_quantize


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             embed_dim=48, depth=2, num_heads=2).eval()


def _weighted(model):
    return [n for n, m in model.named_modules() if hasattr(m, "weight_quantizer")]


@pytest.mark.parametrize("arch, size, expected", [
    # a ViT: the patch embedding, each transformer block, the head
    ("vit", 32, ["patch_embed", "blocks.0", "blocks.1", "head"]),
    # a hybrid: inverted-residual blocks one by one; each MobileViT block (a bridge) whole
    ("mobilevit_xxs", 64, ["stem", "stages.0.0", "stages.1.0", "stages.1.1", "stages.1.2", "stages.2.0", "stages.2.1",
                           "stages.3.0", "stages.3.1", "stages.4.0", "stages.4.1", "final_conv", "head"]),
])
def test_blocks_come_from_the_module_tree_and_the_bridges(arch, size, expected):
    model = _vit() if arch == "vit" else timm.create_model(arch, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    quantize_(model, QuantConfig(), [x])
    layers = _weighted(model)
    with quantizers_off(model):
        bridges = find_bridges(model, layers, x[:1])
        blocks = reconstruction_blocks(model, layers, x[:1], bridges)
    assert [b.name for b in blocks] == expected
    assert sorted(n for b in blocks for n in b.layers) == sorted(layers)  # every quantized layer, once


def test_reconstruction_rounds_onto_the_grid_and_beats_nearest_rounding():
    torch.manual_seed(0)
    model = _vit()
    calib = torch.randn(32, 3, 32, 32)
    quantize_(model, QuantConfig(wbits=4, abits=4), list(calib.split(16)))
    reference = batched_logits(float_copy(model), calib, 16)
    nearest_kl = logits_kl(reference, batched_logits(model, calib, 16))
    config = ReconstructionConfig(steps=60, batch_size=16)
    twin = copy.deepcopy(model)
    report = reconstruct(model, _weighted(model), calib, config)

    kept = [b for b in report["blocks"] if b["kept"]]
    assert kept and all(b["error_after"] < b["error_before"] for b in kept)
    assert all(b["error_after"] >= b["error_before"] for b in report["blocks"] if not b["kept"])
    for name in report["layers"]:  # learned rounding leaves each weight exactly on its grid
        layer = model.get_submodule(name)
        q = layer.weight_quantizer
        assert torch.equal(fake_quantize(layer.weight, q.scale, q.zero_point, q.spec), layer.weight)
    assert logits_kl(reference, batched_logits(model, calib, 16)) < nearest_kl

    reconstruct(twin, _weighted(twin), calib, config)  # same inputs and seed: the same weights and scales
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k


def _vectors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}


def test_norm_affines_and_biases_are_learned_with_the_rounding_in_kept_blocks_only():
    torch.manual_seed(0)
    model = _vit()
    calib = torch.randn(32, 3, 32, 32)
    quantize_(model, QuantConfig(wbits=4, abits=4), list(calib.split(16)))
    before = _vectors(model)
    twin = copy.deepcopy(model)
    report = reconstruct(model, _weighted(model), calib, ReconstructionConfig(steps=60, batch_size=16, float_lr=1e-2))
    after = _vectors(model)
    kept = {b["block"] for b in report["blocks"] if b["kept"]}
    assert kept
    for name, value in before.items():
        block = next((b for b in kept if name.startswith(b + ".")), None)
        if block is None:  # outside the kept blocks nothing moved
            assert torch.equal(value, after[name]), name
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(".norm" in n for n in moved) and any(n.endswith(".bias") for n in moved)
    for name in report["layers"]:  # the weights still end on their grids
        layer = model.get_submodule(name)
        q = layer.weight_quantizer
        assert torch.equal(fake_quantize(layer.weight, q.scale, q.zero_point, q.spec), layer.weight)
    reconstruct(twin, _weighted(twin), calib, ReconstructionConfig(steps=60, batch_size=16, float_lr=1e-2))
    assert all(torch.equal(after[n], v) for n, v in _vectors(twin).items())  # same inputs and seed: same vectors


def test_the_average_starts_at_its_step_and_weighs_later_values_more():
    p = torch.zeros(2)
    average = _Average([p], decay=0.5, start=2)
    for step, value in enumerate([10.0, 20.0, 1.0, 2.0, 4.0]):
        p.fill_(value)
        average.update(step)
    average.apply()
    # steps 0 and 1 before the start; then 1 -> 0.5·1 + 0.5·2 = 1.5 -> 0.5·1.5 + 0.5·4 = 2.75
    assert torch.equal(p, torch.full((2,), 2.75))
    q = torch.ones(1)
    never = _Average([q], decay=0.5, start=10)
    never.update(3)
    never.apply()  # averaging never started: the parameter keeps its value
    assert torch.equal(q, torch.ones(1))


def test_averaged_step_sizes_and_vectors_are_what_a_kept_block_ends_with():
    torch.manual_seed(0)
    model = _vit()
    calib = torch.randn(32, 3, 32, 32)
    quantize_(model, QuantConfig(wbits=4, abits=4), list(calib.split(16)))
    runs = {}
    for average in (0.0, 0.9, 0.9):
        twin = copy.deepcopy(model)
        report = reconstruct(twin, _weighted(twin), calib, ReconstructionConfig(steps=40, batch_size=16, float_lr=1e-2, average=average))
        assert report["average"] == average and any(b["kept"] for b in report["blocks"])
        for name in report["layers"]:  # the weights still end on their grids
            layer = twin.get_submodule(name)
            q = layer.weight_quantizer
            assert torch.equal(fake_quantize(layer.weight, q.scale, q.zero_point, q.spec), layer.weight)
        runs.setdefault(average, []).append(_vectors(twin))
    plain, averaged, again = runs[0.0][0], *runs[0.9]
    assert any(not torch.equal(plain[n], averaged[n]) for n in plain)  # the average is not the last step
    assert all(torch.equal(averaged[n], again[n]) for n in averaged)  # same inputs and seed: same result


def test_the_reconstruction_seed_is_an_option():
    torch.manual_seed(0)
    model, calib = _vit(), torch.randn(16, 3, 32, 32)
    runs = []
    for seed in (0, 1):
        options = {"reconstruction_steps": 5, "reconstruction_augment": False, "reconstruction_seed": seed}
        result = quantize_(copy.deepcopy(model), QuantConfig(method="mptq", wbits=4, abits=4, method_options=options), list(calib.split(8)))
        runs.append(result.method_info["mptq"]["refinements"]["reconstruction"]["blocks"])
    # the same grids and images, other batches and QDrop masks: the first block starts alike, ends otherwise
    assert runs[0][0]["error_before"] == runs[1][0]["error_before"]
    assert [b["error_after"] for b in runs[0]] != [b["error_after"] for b in runs[1]]


def test_a_refinement_not_kept_restores_the_vectors_outside_the_layers_it_changed():
    model = _vit()
    quantize_(model, QuantConfig(), [torch.randn(4, 3, 32, 32)])
    before = _vectors(model)

    def run(m, names, batches):
        with torch.no_grad():
            m.blocks[0].norm1.weight.add_(1.0)
        return []

    step = Refinement("nudge", lambda done: True, run, lambda layer: [layer.weight],
                      model_changes=lambda m: [p for p in m.parameters() if p.dim() == 1])
    report = apply_refinements(model, _weighted(model), [], [step], score=lambda: 1.0, start=1.0)
    assert report["nudge"]["kept"] is False
    assert all(torch.equal(before[n], v) for n, v in _vectors(model).items())


def test_chained_blocks_take_their_quantized_input_from_the_block_before_with_the_same_result(monkeypatch):
    """A block handing its output straight to the next: the next block's quantized input is that
    block run again after its rounding was learned, not a forward from the image; same numbers."""
    import vitcompress.quant.reconstruction as reconstruction

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              embed_dim=48, depth=4, num_heads=2).eval()
    calib = torch.randn(32, 3, 32, 32)
    quantize_(model, QuantConfig(wbits=4, abits=4), list(calib.split(16)))
    from_image = copy.deepcopy(model)
    config = ReconstructionConfig(steps=10, batch_size=16)
    stem_calls = []  # the stem's passes over calibration batches (the 1-image probes left out)

    def count(m, inp):
        if len(inp[0]) > 1:
            stem_calls.append(len(inp[0]))

    handle = model.patch_embed.register_forward_pre_hook(count)
    reconstruct(model, _weighted(model), calib, config)
    handle.remove()
    chained = len(stem_calls)
    # the old way: every block's input by a forward of the model up to it
    monkeypatch.setattr(reconstruction, "follows_previous", lambda m, blocks, x: [False] * len(blocks))
    handle = from_image.patch_embed.register_forward_pre_hook(count)
    reconstruct(from_image, _weighted(from_image), calib, config)
    handle.remove()
    for (k, a), (_, b) in zip(model.state_dict().items(), from_image.state_dict().items()):
        assert torch.equal(a, b), k
    # blocks.1..3 follow the block before (the head does not: the final norm is between): three
    # fewer stem passes per batch of 16 images
    assert len(stem_calls) - chained == chained + 3 * 2, (chained, len(stem_calls) - chained)


def test_augmented_reconstruction_fits_the_views_too():
    torch.manual_seed(0)
    model = _vit()
    calib = torch.randn(16, 3, 32, 32)
    quantize_(model, QuantConfig(wbits=4, abits=4), list(calib.split(16)))
    twin = copy.deepcopy(model)
    plain = reconstruct(model, _weighted(model), calib, ReconstructionConfig(steps=20, batch_size=16))
    report = reconstruct(twin, _weighted(twin), calib, ReconstructionConfig(steps=20, batch_size=16, augment=True))
    assert plain["images"] == 16 and report["images"] == 16 * 10  # the images, their mirrors, both shifted 4 ways
    errors = [(b["error_before"], b["error_after"]) for b in report["blocks"]]
    assert errors != [(b["error_before"], b["error_after"]) for b in plain["blocks"]]  # measured on the views too
    # the views are added only while the captured block tensors fit their budget
    tight = reconstruct(copy.deepcopy(model), _weighted(model), calib, ReconstructionConfig(steps=1, batch_size=16, augment=True,
                                                                                             capture_bytes=1))
    assert tight["images"] == 16


def test_the_views_budget_holds_fisher_weights_only_when_the_error_is_fisher_weighted():
    from vitcompress.quant.blockwise import capture
    from vitcompress.quant.reconstruction import _with_views

    torch.manual_seed(0)
    model = _vit()
    calib = torch.randn(16, 3, 32, 32)
    quantize_(model, QuantConfig(wbits=4, abits=4), [calib])
    fp = float_copy(model)
    with torch.no_grad():
        blocks = reconstruction_blocks(fp, _weighted(fp), calib[:1])
        ins, outs = capture(fp, calib[:1], blocks, 1, outputs=True)
    sizes = {k: sum(t.numel() * t.element_size() for t in d.values()) for k, d in (("in", ins), ("out", outs))}
    biggest = max(t.numel() * t.element_size() for t in ins.values())  # the fitted block's quantized input
    plain = (sizes["in"] + sizes["out"] + biggest) * len(calib)  # bytes per view held without Fisher weights
    with torch.no_grad():
        assert len(_with_views(fp, calib, blocks, 3 * plain, fisher=False)) == 3 * len(calib)
        assert len(_with_views(fp, calib, blocks, 3 * plain, fisher=True)) < 3 * len(calib)  # their weights take room


@pytest.mark.parametrize("method", ["qhyvit", "mptq"])
def test_methods_offer_reconstruction_as_a_refinement(method):
    torch.manual_seed(0)
    model = _vit()
    calib = torch.randn(16, 3, 32, 32)
    options = {"reconstruction_steps": 20}
    if method == "qhyvit":
        options.update(alphas=4, rounds=1, scale_tuning_steps=0)
    result = quantize_(model, QuantConfig(method=method, wbits=4, abits=4, method_options=options), list(calib.split(8)))
    info = result.method_info[method]
    steps = info["post_search_steps"] if method == "qhyvit" else info["refinements"]
    recon = steps["reconstruction"]
    assert [b["block"] for b in recon["blocks"]] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert recon["images"] == 16 * (10 if RECONSTRUCTION_AUGMENT else 1)
    assert recon["kl_after"] < recon["kl_before"] if recon["kept"] else recon["kl_after"] >= recon["kl_before"]
    assert ("gptq" in steps) == (not recon["kept"])  # GPTQ rounds only weights reconstruction did not


def test_plain_squared_error_is_an_option():
    # reconstruction_fisher=False: the block error is not weighted by the Fisher diagonal
    torch.manual_seed(0)
    model, calib = _vit(), torch.randn(16, 3, 32, 32)
    reports = {}
    for fisher in (True, False):
        options = {"reconstruction_steps": 5, "reconstruction_augment": False, "reconstruction_fisher": fisher}
        result = quantize_(copy.deepcopy(model), QuantConfig(method="mptq", wbits=4, abits=4, method_options=options), list(calib.split(8)))
        reports[fisher] = result.method_info["mptq"]["refinements"]["reconstruction"]
    assert reports[True]["fisher_weighted"] is True and reports[False]["fisher_weighted"] is False
    # the same model, images and grids: only the weighting of the measured block error differs
    assert [b["error_before"] for b in reports[True]["blocks"]] != [b["error_before"] for b in reports[False]["blocks"]]


@pytest.mark.parametrize("method", ["qhyvit", "mptq"])
@pytest.mark.parametrize("bad", [{"reconstruction_steps": -1}, {"reconstruction_steps": "many"}, {"qdrop": 1.0},
                                 {"qdrop": "half"}, {"reconstruction_augment": "yes"}, {"reconstruction_fisher": "no"},
                                 {"reconstruction_float_lr": -1e-3}, {"reconstruction_float_lr": "fast"},
                                 {"reconstruction_average": 1.0}, {"reconstruction_average": "slow"},
                                 {"reconstruction_seed": "lucky"}, {"reconstruction_seed": 1.5}, {"reconstruction_steps": 2.5}])
def test_bad_reconstruction_options_are_refused(method, bad):
    with pytest.raises(VitcompressError):
        quantize_(_vit(), QuantConfig(method=method, method_options=bad), [torch.randn(2, 3, 32, 32)])


def test_default_steps_follow_the_measured_widths():
    # on by default only at the widths where it lowered the held-out KL (docs/reconstruction.md)
    assert steps_for(None, 4, auto_max_bits=4, auto_steps=AUTO_STEPS) == AUTO_STEPS
    assert steps_for(None, 6, auto_max_bits=4, auto_steps=AUTO_STEPS) == 0
    assert steps_for(0, 4, auto_max_bits=4, auto_steps=AUTO_STEPS) == 0 and steps_for(50, 8, auto_max_bits=4, auto_steps=AUTO_STEPS) == 50
    assert steps_for(None, 4, auto_max_bits=4, auto_steps=400) == 400


def test_each_method_has_its_own_default_steps_and_an_explicit_count_wins():
    from vitcompress.quant.mptq import MptqOptions
    from vitcompress.quant.qhyvit import QHyViTOptions
    assert MptqOptions().reconstruction_config(4).steps == MptqOptions.auto_steps == 400
    assert QHyViTOptions().reconstruction_config(4).steps == AUTO_STEPS
    assert MptqOptions(reconstruction_steps=50).reconstruction_config(4).steps == 50
    for options in (MptqOptions, QHyViTOptions):  # off above each method's widest measured gain
        assert options().reconstruction_config(options.auto_max_bits).steps > 0
        assert options().reconstruction_config(options.auto_max_bits + 1).steps == 0
