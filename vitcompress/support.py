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
    method: str  # quantize --method or prune --method name
    families: tuple[str, ...]  # fnmatch patterns over ``models.family_of`` names
    reason: str  # one line: what in these families the method cannot handle (yet)

    def covers(self, family: str, method: str) -> bool:
        return method == self.method and any(fnmatch.fnmatch(family, f) for f in self.families)


# Hierarchical families: the embedding width changes from stage to stage.
_STAGED = ("Swin Transformer*", "MobileViT*", "EfficientFormer*", "LeViT", "EfficientViT*", "TinyViT", "Next-ViT",
           "PVT v2", "ConvNeXt", "SHViT", "RepViT", "FastViT", "CoaT", "Twins", "PoolFormer", "EdgeNeXt")

UNSUPPORTED: tuple[Unsupported, ...] = (
    Unsupported("ofb", _STAGED, "OFB searches one embedding width shared by every block of a plain ViT; this family's "
                "width changes from stage to stage (conv, pooling or windowed stages between its attention blocks)"),
    Unsupported("ofb", ("CaiT",), "class-attention blocks and talking-heads attention (heads mixed across each other "
                "before and after the softmax) are outside OFB's head/MLP/embedding search space"),
    Unsupported("ofb", ("ConViT",), "gated positional self-attention (a per-head gate between content and positional "
                "attention) is outside OFB's head/MLP/embedding search space"),
    Unsupported("ofb", ("CrossViT",), "two token branches of different widths joined by cross-attention: no single "
                "embedding width for OFB to search"),
    Unsupported("ofb", ("VOLO",), "outlooker blocks (attention weights generated per local window) are outside "
                "OFB's head/MLP/embedding search space"),
)


def unsupported_reason(family: str, method: str) -> str | None:
    """The reason ``method`` does not support ``family``, or None when it does (first match wins)."""
    return next((u.reason for u in UNSUPPORTED if u.covers(family, method)), None)


def check_supported(arch: str, family: str, method: str) -> None:
    """Raise a one-line VitcompressError when the table says ``method`` does not support ``family``."""
    reason = unsupported_reason(family, method)
    if reason is not None:
        raise VitcompressError(f"{method} does not support {arch} ({family}): {reason}")
