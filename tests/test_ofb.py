"""OFB: the width distributions become one-hot, folding + removal is exact, the slim model reloads and
exports, unsupported families are refused in one line."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import BUNDLED_CKPT, CALIB, VAL
from vitcompress.cli import app
from vitcompress.prune.ofb import OFBConfig, OFBSearch, WidthGroup, _fitted_plan, ofb_unsupported
from vitcompress.prune.structure import count_macs, layout_of

runner = CliRunner()


def _tiny_vit(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=4,
                             embed_dim=32, depth=2, num_heads=4, **kw).eval()


def _toy_search(g: WidthGroup, importance: torch.Tensor, target: float, steps: int = 1000) -> None:
    opt = torch.optim.AdamW([g.alpha], lr=0.05, betas=(0.5, 0.999))
    for step in range(1, steps + 1):
        task = (importance * (1 - g.mask(0.1)) ** 2).sum()
        loss = task + 5 * ((g.expected_width() - target) / 8) ** 2 + 0.5 * g.onehot_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            g.drop(0.2)


def test_width_distribution_becomes_one_hot_at_the_target_on_a_toy_problem():
    """Eight units of falling importance (the task loses Σ importance·(1 − m)²), a FLOPs loss
    pulling the expected width to 3, the adaptive one-hot loss and progressive pruning: the
    distribution collapses onto width 3, whatever the seed of the scores."""
    importance = torch.tensor([8.0, 7, 6, 1, 0.8, 0.6, 0.4, 0.2]) / 8
    for seed in range(3):
        g = WidthGroup("mlp", "toy", 8, list(range(1, 9)), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            g.score.copy_(importance)
        _toy_search(g, importance, 3.0)
        assert g.decided() and int(g.widths[g.choice()]) == 3
        assert float(g.probs().detach().max()) == pytest.approx(1.0)
        assert torch.equal(g.candidate_mask(hard=True), g.candidate_mask())  # the soft mask is the chosen prefix


def test_a_decided_width_reopens_below_its_choice_and_can_cut_further():
    """A continued search toward a tighter target: the candidates at or below the choice come back
    (uniform), wider ones and the units past the choice stay off, and the toy settles on 2 of 8."""
    importance = torch.tensor([8.0, 7, 1, 0.9, 0.8, 0.6, 0.4, 0.2]) / 8
    g = WidthGroup("mlp", "toy", 8, list(range(1, 9)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.score.copy_(importance)
    _toy_search(g, importance, 5.0)
    assert g.decided() and int(g.widths[g.choice()]) == 5
    assert g.reopen()
    assert g.alive.tolist() == [True] * 5 + [False] * 3 and not g.decided()
    torch.testing.assert_close(g.probs()[:5], torch.full((5,), 0.2))
    assert torch.all(g.mask(0.1)[5:] == 0)  # cut units stay cut in the soft mask too
    _toy_search(g, importance, 2.0)
    assert g.decided() and int(g.widths[g.choice()]) == 2
    g.alive.fill_(False)
    g.alive[0] = True
    assert not g.reopen()  # nothing narrower than the narrowest candidate


def test_an_undecided_width_keeps_the_candidate_nearest_its_expected_width():
    """Cut short, a group keeps the surviving width the FLOPs loss steered its expectation to, not
    the most probable one; decided, it keeps its candidate."""
    g = WidthGroup("mlp", "m", 8, [2, 4, 6, 8], torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.alpha.copy_(torch.tensor([1.0, 0.0, 0.0, 1.2]))  # the most probable is 8, the expectation ~5.1
    expected = float(g.expected_width().detach())
    assert 4.0 < expected < 6.0
    assert int(g.widths[g.choice()]) == (4 if expected < 5.0 else 6)
    g.alive.copy_(torch.tensor([False, False, False, True]))
    assert int(g.widths[g.choice()]) == 8


def test_folding_and_removal_keep_the_function_exactly():
    model = _tiny_vit(init_values=0.1)  # with LayerScale, which carries embedding channels too
    search = OFBSearch(model, OFBConfig(steps=6, batch_size=8, prune_every=2, pad=1))
    x = torch.randn(32, 3, 16, 16)
    search.run(x, search.dense_macs / 2.5)
    search.reopen()  # and a continuation below the choices (ceilings on the units)
    search.run(x, search.dense_macs / 3, steps=4)
    for g in search.groups:  # make the masks far from trivial: random scores and distributions
        with torch.no_grad():
            g.score.copy_(torch.randn(g.units))
            g.alpha.copy_(torch.randn(len(g.widths)))
    slim = search.slim()
    ref = search.hard_forward(x)
    with torch.no_grad():
        out = slim(x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    widths = search.widths()
    layout = layout_of(slim)
    assert layout["embed_dim"] == widths["embed_dim"] == slim.embed_dim
    assert all(layout[k] == v for k, v in widths.items())
    assert count_macs(slim, (3, 16, 16)) == pytest.approx(float(search.expected_macs("chosen")))
    assert count_macs(slim, (3, 16, 16)) < count_macs(model, (3, 16, 16))
    with torch.no_grad():  # the masks did matter: the float model computes something else
        assert not torch.allclose(model(x), out, atol=1e-3)


def test_a_time_budget_fits_the_whole_schedule_into_the_steps_it_allows():
    """Cut by its time budget, the search still goes through its warm-up, ramp and dying checks
    (planned over the steps that fit), instead of stopping with half-learned distributions."""
    search = OFBSearch(_tiny_vit(), OFBConfig(steps=100_000, batch_size=8, pad=1))
    result = search.run(torch.randn(32, 3, 16, 16), search.dense_macs / 2, max_seconds=2.0)
    assert result["planned_steps"] < 100_000
    assert result["steps"] <= result["planned_steps"]
    assert search.w == pytest.approx(search.config.w_end)  # the warm-up ended within the budget


def test_the_refit_plan_times_only_the_steps_after_the_first_fit():
    """Three slow first steps (3 s each), then 1 s a step: the first fit plans for the slow pace, the
    refit after 20 steps for the real one, and neither plans past the requested steps."""
    first = _fitted_plan(3, 9.0, (0, 0.0), 900.0, 2000)
    assert first == 300
    refit = _fitted_plan(20, 26.0, (3, 9.0), 900.0, 2000)
    assert refit == 20 + 874
    assert _fitted_plan(20, 26.0, (3, 9.0), 900.0, 500) == 500


def test_ofb_cli_flops_target_reloads_from_checkpoint_alone_and_exports(tmp_path):
    from vitcompress import load
    from vitcompress.export import make_session
    from vitcompress.export.runtime import run_session

    out = tmp_path / "ofb"
    result = runner.invoke(app, [str(a) for a in (
        "prune", "--method", "ofb", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 32,
        "--recover-size", 64, "--search-steps", 12, "--eval", VAL, "--eval-size", 64, "--target-flops", 1.5,
        "--recover-steps", 2, "--out", out)])
    assert result.exit_code == 0, result.output
    r = json.loads((out / "report.json").read_text())
    assert r["method"] == "ofb" and r["pruning"]["macs_reduction"] >= 1.5
    assert r["pruning"]["layout"]["embed_dim"] <= 128
    assert r["pruning"]["allocation"]["search_steps"] >= 12
    reloaded = load(checkpoint=out / "model.pruned.pth")
    assert layout_of(reloaded.model) == r["pruning"]["layout"]
    x = torch.randn(2, *reloaded.preprocessing.input_size)
    with torch.no_grad():
        ref = reloaded.model(x).numpy()
    np.testing.assert_allclose(run_session(make_session(out / "model.pruned.onnx"), x.numpy()), ref, atol=1e-4)


@pytest.mark.parametrize("arch, reason", [
    ("mobilevit_xxs", "width changes from stage to stage"),  # a known family: the support table's decision
    ("resnet18", "not a timm VisionTransformer"),  # outside the known families: OFB's own structural check
])
def test_unsupported_family_fails_in_one_line(tmp_path, arch, reason):
    import timm

    assert "not a timm VisionTransformer" in ofb_unsupported(timm.create_model(arch, num_classes=10))
    result = runner.invoke(app, ["prune", "--method", "ofb", "--model", arch, "--no-pretrained",
                                 "--calib", str(CALIB), "--target-flops", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "ofb" in result.output and reason in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o" / "model.fp32.onnx").exists()
