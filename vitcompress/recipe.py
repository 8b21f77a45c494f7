"""``vitcompress quantize --recipe FILE``: the quantize step of a recipe (see ``pipeline.recipe``).

Recipes without a ``schema:`` line (a bare ``steps:`` list) are read too, for files written before
the schema existed.
"""
from __future__ import annotations

from pathlib import Path

from .errors import VitcompressError
from .pipeline.steps import QuantizeOptions


def quantize_step(path: str | Path) -> QuantizeOptions:
    """The options of a recipe's single quantize step."""
    from .pipeline.recipe import load_recipe

    recipe = load_recipe(path, require_schema=False)
    steps = [s for s in recipe.steps if s.kind == "quantize"]
    if len(recipe.steps) != 1 or not steps:
        raise VitcompressError(f"recipe {path}: `quantize --recipe` runs exactly one quantize step (use `vitcompress run` for more)")
    return steps[0].options
