"""Typed method options: a method with knobs registers its options dataclass here.

``from_config(config)`` parses and validates ``QuantConfig.method_options`` (one place for every
caller: the command line, recipes, the method itself); an optional ``precision(raw options)``
names what the knobs do to the bit widths (mixed precision), for ``QuantConfig.label``.
"""
from __future__ import annotations

from typing import Any

from ..errors import VitcompressError

METHOD_OPTIONS: dict[str, type] = {}


def register_options(method: str):
    """``@register_options(name)``: files an options dataclass under its method's name."""
    def deco(cls: type) -> type:
        METHOD_OPTIONS[method] = cls
        return cls

    return deco


def method_options(config: Any) -> Any:
    """The method's parsed options (None for a method without knobs, which then must be given none)."""
    options = METHOD_OPTIONS.get(config.method)
    if options is None:
        if config.method_options:
            raise VitcompressError(f"method '{config.method}' takes no options, got {', '.join(sorted(config.method_options))}")
        return None
    return options.from_config(config)


def precision(method: str, raw: dict) -> tuple[str, bool] | None:
    """(label, below 8 bits?) as the method's options define it, or None."""
    options = METHOD_OPTIONS.get(method)
    return options.precision(raw) if options is not None and hasattr(options, "precision") else None


def accepts_option(method: str, name: str) -> bool:
    """Does ``method`` have the knob ``name``? (A flag offered by several methods checks here.)"""
    import dataclasses

    options = METHOD_OPTIONS.get(method)
    return options is not None and name in {f.name for f in dataclasses.fields(options)}
