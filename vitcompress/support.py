"""Which method supports which model family: decisions kept as data, each with its reason.

Checked before any work starts (``check_supported``), so an unsupported pair fails in one line
instead of a traceback halfway. The measured table behind these rows is benchmarks/CONFORMANCE.md
(``make conformance``); a timm model outside the known families is tried, and the methods' own
structural checks (e.g. ``prune.ofb.ofb_unsupported``) still guard it.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .errors import VitcompressError


@dataclass(frozen=True)
class Unsupported:
    family: str  # fnmatch pattern over ``models.family_of`` names
    method: str  # quantize --method or prune --method name
    reason: str  # one line: what in the family the method cannot handle (yet)


UNSUPPORTED: tuple[Unsupported, ...] = ()


def unsupported_reason(family: str, method: str) -> str | None:
    """The reason ``method`` does not support ``family``, or None when it does (first match wins)."""
    return next((u.reason for u in UNSUPPORTED if u.method == method and fnmatch.fnmatch(family, u.family)), None)


def check_supported(arch: str, family: str, method: str) -> None:
    """Raise a one-line VitcompressError when the table says ``method`` does not support ``family``."""
    reason = unsupported_reason(family, method)
    if reason is not None:
        raise VitcompressError(f"{method} does not support {arch} ({family}): {reason}")
