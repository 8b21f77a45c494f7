"""Name -> thing lookups with one error message for every registry (methods, runtimes, targets...)."""
from __future__ import annotations

from typing import Mapping, TypeVar

from .errors import VitcompressError

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, what: str, aliases: Mapping[str, str] | None = None) -> T:
    """``table[name]`` (through ``aliases``), or one line naming the choices."""
    aliases = aliases or {}
    try:
        return table[aliases.get(name, name)]
    except KeyError:
        raise VitcompressError(f"unknown {what} '{name}' (choose from {', '.join([*table, *aliases])})") from None
