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


def _lpvit(families: tuple[str, ...], what: str) -> Unsupported:
    """An LPViT row: what the family has instead of the units LPViT removes (whole heads of the
    attention classes of ``prune.structure.HEAD_ATTENTION``, qkv + proj Linear, and hidden units of
    the MLPs of ``HIDDEN_MLP``)."""
    return Unsupported("lpvit", families, f"{what}; LPViT removes heads and hidden units of the attention and MLP "
                       "classes it knows")


UNSUPPORTED: tuple[Unsupported, ...] = (
    _lpvit(("MobileViT v2",), "separable linear self-attention (one context score per token, 1x1 convs, "
           "no heads) and conv MLPs"),
    _lpvit(("EfficientFormer v2",), "attention and MLPs are convolutions (Attention2d with talking "
           "heads, ConvMlpWithNorm)"),
    _lpvit(("EfficientViT (MIT)",), "ReLU linear attention over multi-scale conv projections and "
           "MBConv blocks: no heads or Linear MLPs"),
    _lpvit(("EfficientViT (MSRA)",), "cascaded group attention (each head's output feeds the next "
           "head's input, so a head cannot be removed alone) and conv FFNs"),
    _lpvit(("Next-ViT",), "convolutional multi-head attention, spatially reduced attention and conv "
           "MLPs"),
    _lpvit(("PVT v2",), "its spatial-reduction attention reshapes the heads' output to the block's width, "
           "and its MLPs hold a depthwise conv"),
    _lpvit(("SHViT",), "single-head attention over a channel slice and conv FFNs"),
    _lpvit(("RepViT", "FastViT"), "no attention in its blocks (re-parameterisable conv blocks, "
           "RepMixer token mixing) and conv MLPs"),
    _lpvit(("Swin Transformer v2",), "its attention reshapes the heads' output to the block's width, and "
           "post-norm blocks normalise each branch (an emptied one is not its bias)"),
    _lpvit(("EfficientFormer v1",), "attention and a Linear MLP only in its last block (about a tenth of the "
           "MACs at 224 px); its other blocks pool and mix channels with 1x1 convs"),
    _lpvit(("CoaT", "Twins", "EdgeNeXt", "VOLO"),
           "its own attention variants (factorised, sub-sampled, channel or outlook attention) are not yet "
           "mapped to units"),
    _lpvit(("ConvNeXt", "PoolFormer"), "no attention (depthwise-conv or pooling token mixer), and "
           "MLPs of 1x1 convs"),
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
