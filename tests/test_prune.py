"""Pruning: allocation meets its budget, unit removal is exact, pruned models export, load and quantize."""
import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import BUNDLED_CKPT, CALIB, VAL
from vitcompress.cli import app
from vitcompress.prune.baseline import MagnitudePruner
from vitcompress.prune.lpvit import LPViTConfig, LPViTPruner, apply_plan, tile_linears
from vitcompress.prune.structure import BiasBranch, find_prunable, keep_units, unit_slices

runner = CliRunner()


@pytest.fixture(scope="module")
def lpvit(loaded, calib_batches):
    return LPViTPruner(loaded.model, calib_batches)


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_lpvit_allocation_meets_budget_and_floor(lpvit, loaded, fraction):
    budget = fraction * lpvit.dense_macs
    plan = lpvit.plan(budget)
    assert plan.macs <= budget
    assert plan.macs >= 0.85 * budget  # the bisection on lambda uses the budget, not far below it
    model = copy.deepcopy(loaded.model)
    apply_plan(model, plan)
    actual = sum(pm.units * pm.macs_per_unit for pm in find_prunable(model))
    assert actual == plan.macs
    for pm in find_prunable(loaded.model):
        assert len(plan.keep[pm.name]) >= max(1, int(np.ceil(0.05 * pm.units)))
    assert plan.info["beta"] > 0  # hardware-aware term active, its balance factor set automatically


def test_tied_scores_still_fill_the_budget(lpvit):
    """Every layer's objective flat (untrained weights: LeViT's branches start at zero, so its
    scores all vanish): λ moves every layer at once, from no pruning to the floors; the blocks
    the budget still allows are given back, so the plan lands just under the budget."""
    tied = copy.copy(lpvit)
    tied.objective = [np.zeros_like(y) for y in lpvit.objective]
    budget = 0.6 * lpvit.dense_macs
    plan = tied.plan(budget)
    step = max(int(np.max(-np.diff(c.macs))) for c in lpvit.curves)  # the largest single move of one layer
    assert budget - step <= plan.macs <= budget


def test_allocation_budgets_are_monotone_and_below_floor_is_refused(lpvit):
    from vitcompress import VitcompressError

    macs = [lpvit.plan(f * lpvit.dense_macs).macs for f in (0.9, 0.6, 0.4, 0.2)]
    assert macs == sorted(macs, reverse=True)
    with pytest.raises(VitcompressError, match="floor"):
        lpvit.plan(0.5 * lpvit.min_macs)


def test_lpvit_keeps_more_accuracy_than_magnitude_at_equal_macs(lpvit, loaded, calib_batches):
    x = torch.cat(calib_batches)
    with torch.no_grad():
        ref = loaded.model(x).argmax(1)
    agree = {}
    for name, pruner in (("lpvit", lpvit), ("magnitude", MagnitudePruner(loaded.model))):
        model = copy.deepcopy(loaded.model)
        plan = pruner.plan(0.6 * pruner.dense_macs)
        apply_plan(model, plan)
        with torch.no_grad():
            agree[name] = (model(x).argmax(1) == ref).float().mean().item()
    assert agree["lpvit"] > agree["magnitude"]


def test_tile_blocks_meet_budget_and_zero_whole_tiles(loaded, calib_batches):
    pruner = LPViTPruner(loaded.model, calib_batches, LPViTConfig(block="tile", tile=(16, 16)))
    plan = pruner.plan(0.5 * pruner.dense_macs)
    assert plan.macs <= 0.5 * pruner.dense_macs
    model = copy.deepcopy(loaded.model)
    apply_plan(model, plan, "tile", (16, 16))
    w = tile_linears(model)["blocks.0.mlp.fc1"].weight.detach()
    tiles = w.reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16).abs().sum((1, 3))
    assert len(plan.keep["blocks.0.mlp.fc1"]) == int((tiles > 0).sum())
    zero_share = sum(float((m.weight == 0).float().mean()) for m in tile_linears(model).values()) / 24
    assert 0.3 < zero_share < 0.9


def _trained_batchnorms(model):
    """Statistics and affines like a trained model's, not the identity a fresh BatchNorm starts from."""
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
            bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_(1, 0.2), bn.bias.normal_(0, 0.2)


def _zero_units(model, pm, units):
    with torch.no_grad():
        for sl in unit_slices(model, pm):
            sl.param.index_fill_(sl.axis, sl.indices(units), 0.0)


def test_removing_zeroed_units_keeps_the_function(loaded):
    x = torch.randn(4, *loaded.preprocessing.input_size)
    zeroed = copy.deepcopy(loaded.model)
    mods = find_prunable(zeroed)
    drop = {}
    for i, pm in enumerate(mods):
        if pm.kind == "attn":
            drop[pm.name] = list(range(pm.units)) if i == 2 else [1, 3]  # block 1 loses every head
        else:
            drop[pm.name] = list(range(pm.units)) if i == 9 else list(range(0, pm.units, 3))
        _zero_units(zeroed, pm, drop[pm.name])
    pruned = copy.deepcopy(zeroed)
    for pm in find_prunable(pruned):
        keep_units(pruned, pm, [u for u in range(pm.units) if u not in drop[pm.name]])
    assert isinstance(pruned.blocks[1].attn, BiasBranch) and isinstance(pruned.blocks[4].mlp, BiasBranch)
    assert pruned.blocks[0].attn.num_heads == 2 and pruned.blocks[0].attn.qkv.out_features == 3 * 2 * 32
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(pruned(x), loaded.model(x), atol=1e-3)  # the pruning did change the model


@pytest.mark.parametrize("arch,kwargs,side", [
    # windowed attention at two stage widths and token counts
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=32), 64),
    # timm Attention over unfolded patches, at three stages' patch grids
    ("mobilevit_xxs", {}, 256),
    # TinyViT: qkv rows head after head (q, k of key_dim, v of val_dim), a bias per head and offset,
    # the attention's own input LayerNorm and NormMlp's, windows at three stage widths
    ("tiny_vit_5m_224", dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                             window_sizes=(7, 7, 7, 7)), 224),
    # LeViT: Linear + BatchNorm pairs (the BatchNorm over qkv's and fc1's rows is cut with them), an
    # activation before proj, MLPs in the stage downsamples too; an emptied branch is its BatchNorm's constant
    ("levit_128s", dict(embed_dim=(32, 48, 64), num_heads=(2, 3, 4), depth=(1, 1, 1), key_dim=8), 224),
])
def test_units_at_different_token_counts_are_costed_as_they_run_and_removed_exactly(arch, kwargs, side):
    import timm

    from vitcompress.prune.structure import apply_layout, count_macs, layout_of, macs

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    _trained_batchnorms(model)
    mods = find_prunable(model)
    assert len({pm.tokens for pm in mods}) > 1 and any(pm.kind == "attn" for pm in mods)
    zeroed, drop = copy.deepcopy(model), {}
    for pm in find_prunable(zeroed):
        drop[pm.name] = list(range(0, pm.units, 2))  # every other head / hidden unit
        _zero_units(zeroed, pm, drop[pm.name])
    pruned = copy.deepcopy(zeroed)
    for pm in find_prunable(pruned):
        keep_units(pruned, pm, [u for u in range(pm.units) if u not in drop[pm.name]])
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-4, rtol=1e-4)
    # the MACs the pruner plans with are the MACs the model runs (counted independently, by hooks)
    size = (3, side, side)
    assert count_macs(model, size) - count_macs(pruned, size) == macs(model) - macs(pruned) > 0
    fresh = timm.create_model(arch, pretrained=False, **kwargs).eval()
    apply_layout(fresh, layout_of(pruned))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))


def test_an_emptied_levit_branch_keeps_what_its_batchnorm_adds():
    """A LeViT attention or MLP without units outputs proj's / ln2's BatchNorm applied to zero,
    not zero: the constant is kept (timm's Attention and Mlp keep their bias the same way)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, embed_dim=(32, 48, 64), num_heads=(2, 3, 4),
                              depth=(1, 1, 1), key_dim=8).eval()
    _trained_batchnorms(model)
    emptied = {"stages.0.blocks.0.attn", "stages.1.downsample.mlp"}
    zeroed = copy.deepcopy(model)
    for pm in find_prunable(zeroed):
        if pm.name in emptied:
            _zero_units(zeroed, pm, range(pm.units))
    pruned = copy.deepcopy(zeroed)
    for pm in find_prunable(pruned):
        if pm.name in emptied:
            keep_units(pruned, pm, [])
    assert all(isinstance(pruned.get_submodule(n), BiasBranch) for n in emptied)
    assert float(pruned.get_submodule("stages.0.blocks.0.attn").bias.detach().abs().max()) > 0.1
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-4, rtol=1e-4)


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_prune_cli_flops_target_exports_loads_and_quantizes(tmp_path):
    from vitcompress import load
    from vitcompress.export import make_session
    from vitcompress.export.runtime import run_session

    out = tmp_path / "p"
    code, text = _run("prune", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 64, "--eval", VAL,
                      "--eval-size", 100, "--target-flops", 2, "--recover-steps", 3, "--out", out)
    assert code == 0, text
    for name in ("model.fp32.onnx", "model.pruned.onnx", "model.pruned.pth", "report.json"):
        assert (out / name).is_file()
    r = json.loads((out / "report.json").read_text())
    assert r["schema"] == "vitcompress-report/1" and r["command"] == "prune"
    assert r["pruning"]["macs_reduction"] >= 2.0 and r["pruning"]["params_pruned"] < r["pruning"]["params_dense"]
    assert r["recovery"]["steps"] == 3
    assert {"before_recovery", "after_recovery"} <= set(r["accuracy"])
    assert r["latency"]["pruned"]["median_ms"] > 0

    reloaded = load(checkpoint=out / "model.pruned.pth")
    assert reloaded.model.blocks[0].mlp.fc1.out_features == r["pruning"]["layout"]["blocks.0.mlp"]
    x = torch.randn(2, *reloaded.preprocessing.input_size)
    with torch.no_grad():
        ref = reloaded.model(x).numpy()
    np.testing.assert_allclose(run_session(make_session(out / "model.pruned.onnx"), x.numpy()), ref, atol=1e-4)

    q = tmp_path / "q"
    code, text = _run("quantize", "--checkpoint", out / "model.pruned.pth", "--calib", CALIB, "--calib-size", 32,
                      "--out", q)
    assert code == 0, text
    requant = load(checkpoint=q / "model.int8.pth")  # the quantized checkpoint keeps the pruned layout
    assert requant.model.blocks[0].mlp.fc1.out_features == r["pruning"]["layout"]["blocks.0.mlp"]


def test_impossible_speedup_fails_with_best_reachable(tmp_path):
    code, text = _run("prune", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 32,
                      "--target-speedup", 50, "--out", tmp_path / "p")
    assert code == 2
    assert "not reachable" in text and "best measured speedup" in text


@pytest.mark.parametrize("args,msg", [
    (["--target-speedup", 2, "--target-flops", 2], "exactly one target"),
    (["--target-speedup", 0.5], "must be > 1"),
    (["--target-speedup", 2, "--block", "tile"], "sparse, no dense speedup"),
    (["--target-flops", 2, "--method", "bogus"], "unknown pruning method"),
])
def test_prune_bad_input_is_one_line_exit_2(tmp_path, args, msg):
    code, text = _run("prune", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, *args, "--out", tmp_path / "p")
    assert code == 2 and msg in text
