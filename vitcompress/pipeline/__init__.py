"""The pipeline as composable steps: recipes (``recipe.py``), steps (``steps.py``), runs (``run.py``).

    from vitcompress.pipeline import load_recipe, run_recipe
    manifest = run_recipe(load_recipe("recipes/deit_prune2x_w8a8.yaml"), out=Path("runs/deit"))
"""
from .recipe import SCHEMA, Recipe, load_recipe
from .run import run_recipe
from .steps import STEPS, RunState, StepSpec

__all__ = ["SCHEMA", "STEPS", "Recipe", "RunState", "StepSpec", "load_recipe", "run_recipe"]
