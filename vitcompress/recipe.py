"""YAML recipes: an ordered list of compression steps, each a plain config.

    steps:
      - quantize:
          method: minmax
          wbits: 8
          abits: 8
          act_observer: percentile

Today one step kind exists (``quantize``, fields of ``QuantConfig``); pruning steps will join it.
Unknown step kinds or fields are rejected with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from .errors import VitcompressError
from .quant import QuantConfig

STEP_CONFIGS: dict[str, type] = {"quantize": QuantConfig}


def load_recipe(path: str | Path) -> list[object]:
    """Parse a recipe file into a list of step configs."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise VitcompressError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise VitcompressError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    steps = doc.get("steps") if isinstance(doc, dict) else None
    if not isinstance(steps, list) or not steps:
        raise VitcompressError(f"recipe {path} needs a non-empty 'steps:' list")
    configs = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            raise VitcompressError(f"recipe {path}, step {i + 1}: each step is one mapping like 'quantize: {{...}}'")
        (kind, fields), = step.items()
        cls = STEP_CONFIGS.get(kind)
        if cls is None:
            raise VitcompressError(f"recipe {path}, step {i + 1}: unknown step '{kind}' (known: {', '.join(STEP_CONFIGS)})")
        fields = fields or {}
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - valid)
        if unknown:
            raise VitcompressError(f"recipe {path}, step {i + 1}: unknown field(s) {', '.join(unknown)} (valid: {', '.join(sorted(valid))})")
        if "skip" in fields:
            fields = {**fields, "skip": tuple(fields["skip"])}
        try:
            configs.append(cls(**fields))
        except TypeError as e:
            raise VitcompressError(f"recipe {path}, step {i + 1}: {e}") from None
    return configs
