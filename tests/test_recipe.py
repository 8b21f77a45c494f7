"""Recipes: every shipped one validates, and a broken one is one line naming file, line and field."""
from pathlib import Path

import pytest

from vitcompress.errors import VitcompressError
from vitcompress.pipeline import load_recipe
from vitcompress.pipeline.steps import CheckOptions, PruneOptions, QuantizeOptions
from vitcompress.recipe import quantize_step
from tests.conftest import BUNDLED_CKPT, CALIB, VAL

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHARED = RECIPES.parent.parent / "shared"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    """Their steps parse everywhere; those naming the shared reference models load fully where they exist."""
    recipe = load_recipe(path, require_schema=False)
    assert recipe.steps and all(isinstance(s.options, (QuantizeOptions, PruneOptions, CheckOptions)) for s in recipe.steps)
    if "shared/" in path.read_text() and SHARED.is_dir():
        full = load_recipe(path)
        assert full.steps[-1].kind == "check"  # every pipeline recipe ends with its gate


def test_w6a6_recipe_fields():
    cfg = quantize_step(RECIPES / "w6a6_percentile.yaml").config
    assert (cfg.wbits, cfg.abits, cfg.act_observer) == (6, 6, "percentile")
    assert cfg.skip == ("head", "head.fc") and cfg.simulated


def _recipe(tmp_path, steps: str, extra: str = "") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"schema: vitcompress-recipe/1\nmodel:\n  checkpoint: {BUNDLED_CKPT}\n"
                 f"data:\n  calib: {CALIB}\n  eval: {VAL}\n{extra}steps:\n{steps}")
    return p


@pytest.mark.parametrize("steps, extra, message", [
    ("  - quantize:\n      bitz: 4\n", "", r"r.yaml:9: steps\[1\].quantize.bitz: unknown field"),
    ("  - quantize:\n      wbits: eight\n", "", r"r.yaml:9: steps\[1\].quantize.wbits: expected an integer, got 'eight'"),
    ("  - quantize:\n      wbits: 12\n", "", r"r.yaml:9: steps\[1\].quantize: wbits must be an integer between 2 and 8"),
    ("  - quantize:\n      method: brecq\n", "", r"r.yaml:9: steps\[1\].quantize.method: unknown method 'brecq' \(choose from"),
    ("  - distill: {}\n", "", r"r.yaml:8: steps\[1\].distill: unknown step \(choose from prune, quantize, check\)"),
    ("  - check:\n      max_drop: -1\n", "", r"r.yaml:9: steps\[1\].check.max_drop: must be a number >= 0 and <= 100, got -1"),
    ("  - prune: {method: lpvit}\n", "", r"r.yaml:8: steps\[1\].prune.target_speedup: give exactly one"),
    ("  - prune: {method: obf, target_speedup: 2}\n", "", r"r.yaml:8: steps\[1\].prune.method: unknown method 'obf' \(choose from lpvit, magnitude, ofb\)"),
    ("  - quantize: {}\n", "colour: red\n", r"r.yaml:7: colour: unknown field"),
    ("[unclosed\n", "", r"r.yaml:\d+: not valid YAML"),
])
def test_broken_recipes_name_file_line_and_field(tmp_path, steps, extra, message):
    with pytest.raises(VitcompressError, match=message):
        load_recipe(_recipe(tmp_path, steps, extra))


def test_missing_files_and_schema(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("schema: vitcompress-recipe/1\nmodel:\n  checkpoint: nowhere.pth\nsteps:\n  - quantize: {}\n")
    with pytest.raises(VitcompressError, match=r"r.yaml:3: model.checkpoint: no such file or folder: nowhere.pth"):
        load_recipe(p)
    p.write_text("steps:\n  - quantize: {}\n")
    with pytest.raises(VitcompressError, match=r"r.yaml:1: schema: expected 'vitcompress-recipe/1'"):
        load_recipe(p)


def test_overrides_set_step_fields_and_data(tmp_path):
    p = _recipe(tmp_path, "  - quantize:\n      wbits: 8\n  - check:\n      max_drop: 1.0\n")
    r = load_recipe(p, ["quantize.wbits=6", "2.max_drop=0.5", "data.eval_size=50", "seed=3"])
    assert r.steps[0].options.config.wbits == 6 and r.steps[1].options.max_drop == 0.5
    assert r.data.eval_size == 50 and r.seed == 3
    with pytest.raises(VitcompressError, match="no step 'prune'"):
        load_recipe(p, ["prune.target_speedup=2"])
    with pytest.raises(VitcompressError, match=r"steps\[1\].quantize.wbits: expected an integer"):
        load_recipe(p, ["quantize.wbits=x"])
