from pathlib import Path

import pytest

from vitcompress.errors import VitcompressError
from vitcompress.quant import QuantConfig
from vitcompress.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")))
def test_bundled_recipes_parse(path):
    steps = load_recipe(path)
    assert steps and all(isinstance(s, QuantConfig) for s in steps)


def test_w6a6_recipe_fields():
    (cfg,) = load_recipe(RECIPES / "w6a6_percentile.yaml")
    assert (cfg.wbits, cfg.abits, cfg.act_observer) == (6, 6, "percentile")
    assert cfg.skip == ("head", "head.fc") and cfg.simulated


@pytest.mark.parametrize("text, message", [
    ("steps: []", "non-empty"),
    ("steps:\n  - prune: {}", "unknown step"),
    ("steps:\n  - quantize: {bitz: 4}", "unknown field"),
    ("steps:\n  - quantize: {wbits: 12}", "between 2 and 8"),
    ("steps: [unclosed", "not valid YAML"),
])
def test_invalid_recipes_are_clear(tmp_path, text, message):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(VitcompressError, match=message):
        load_recipe(p)
