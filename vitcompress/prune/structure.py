"""Structural units of timm transformer blocks and their physical removal.

A *unit* is the smallest piece that can be cut out of a dense model and leave a smaller dense
model behind:

- an attention head of ``timm.layers.Attention``, Swin's ``WindowAttention``, TinyViT's or LeViT's
  ``Attention`` (``HEAD_ATTENTION``): its rows of ``qkv`` (weight and bias: ``head_dim`` rows in each
  of the q, k and v parts, or, where ``qkv`` holds the heads one after another, the head's own
  q, k and v rows; LeViT's BatchNorm over them too), the matching columns of ``proj``, and its
  entry in any per-head parameter (Swin's relative position bias table, the attention biases);
- an MLP hidden unit of ``timm.layers.Mlp``, TinyViT's ``NormMlp`` or LeViT's ``LevitMlp``
  (``HIDDEN_MLP``): one row of ``fc1`` (and its bias, and LeViT's BatchNorm channel) and the
  matching column of ``fc2``.

Removing units rebuilds the Linear layers with fewer rows/columns and updates ``num_heads`` /
``attn_dim`` (attention) so timm's own ``forward`` runs the smaller model unchanged. A module
that loses every unit is replaced by :class:`BiasBranch` (its output is then the constant output
bias, or the constant LeViT's last BatchNorm adds) and the LayerNorm feeding it becomes an
Identity, so the exported graph drops the branch.

The residual (embedding) width of a plain timm ``VisionTransformer`` can be cut too: a channel
lives in the patch embedding's output rows, the class/register tokens and position embedding, the
LayerNorms that read the residual stream, the input columns of every Linear that reads a norm's
output (qkv, fc1, head) and the output rows of every Linear that writes the stream (proj, fc2), and
LayerScale. :func:`keep_embed_channels` removes channels from all of them.

A unit's MACs depend on how many tokens its module sees per image and how many each query attends
to; both are measured once per model by one forward pass at its input size (``module_tokens``), so
blocks at different token counts (stages, windows, patch grids) are costed as they run.

The *layout* (units kept per module, plus ``embed_dim`` where the residual width can be pruned) is
a plain dict stored in checkpoints; :func:`apply_layout` reshapes a freshly built model to it before
the weights are loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import VitcompressError


@dataclass(frozen=True)
class PrunableModule:
    """One attention or MLP module of a transformer block, with its structural units."""

    name: str  # module path, e.g. "blocks.3.attn"
    kind: str  # "attn" | "mlp"
    units: int  # heads or hidden units present now
    in_width: int  # input features of the module (token width)
    unit_width: int  # a head's value width (its columns of proj) for attention, 1 for MLP
    macs_per_unit: int  # multiply-accumulates per image for one unit (Linear + attention matmuls)
    norm_name: str | None  # the LayerNorm feeding it inside its block (Identity once the module is gone)
    tokens: int = 1  # tokens per image the module processes


@dataclass(frozen=True)
class UnitModule:
    """A module class with structural units between two Linear layers: ``first`` (a unit owns rows
    of it, and of ``first_norm``, a BatchNorm over its output, where there is one) and ``second`` (a
    unit owns columns of it). ``out``: the part of the module that maps the units' output to the
    module's, run on zeros to give what an emptied module outputs. Paths are relative to the module."""

    module: str  # "package.module:Class"
    first: str
    second: str
    out: str
    first_norm: str | None = None

    def cls(self) -> type:
        import importlib

        where, _, name = self.module.partition(":")
        return getattr(importlib.import_module(where), name)

    def layers(self, m: nn.Module) -> tuple[nn.Module, nn.Module]:
        return m.get_submodule(self.first), m.get_submodule(self.second)


@dataclass(frozen=True)
class HeadAttention(UnitModule):
    """An attention class whose heads can be cut: ``first`` computes q, k and v, ``second`` projects
    the heads' output; ``num_heads``, and parameters holding one entry per head along an axis.

    ``first``'s rows come in one of two layouts: "parts" (q, k and v parts, each ``num_heads`` heads
    of ``head_dim`` rows: timm's Attention, Swin) or "heads" (head after head, each its ``key_dim``
    q rows, ``key_dim`` k rows and ``val_dim`` v rows: TinyViT, LeViT). ``head_widths``: attributes
    that hold ``num_heads`` times a per-head width, rewritten when heads go. ``input_norm``: the
    module's ``norm`` normalises its input (it goes with the module), rather than the attention output."""

    first: str = "qkv"
    second: str = "proj"
    out: str = "proj"
    per_head: tuple[tuple[str, int], ...] = ()  # (parameter, axis) with one entry per head
    qkv_layout: str = "parts"
    head_widths: tuple[str, ...] = ()
    input_norm: bool = False
    caches: tuple[str, ...] = ()  # dict attributes caching per-head values: emptied when heads go

    def dims(self, m: nn.Module) -> tuple[int, int]:
        """(q/k width, v width) of one head."""
        if self.qkv_layout == "heads":
            return int(m.key_dim), int(m.val_dim)
        d = self.layers(m)[0].out_features // 3 // m.num_heads
        return d, d


# What head pruning knows, as data. Each class's forward reads num_heads (and the widths of
# head_widths) and reshapes qkv by them, so the smaller module runs timm's own code.
HEAD_ATTENTION: tuple[HeadAttention, ...] = (
    HeadAttention("timm.layers:Attention", head_widths=("attn_dim",)),
    # windowed attention at a stage's width; its relative position bias table has a column per head
    HeadAttention("timm.models.swin_transformer:WindowAttention", per_head=(("relative_position_bias_table", 1),)),
    # windowed attention with a bias per head and position offset; its LayerNorm reads the block's input
    HeadAttention("timm.models.tiny_vit:Attention", per_head=(("attention_biases", 0),), qkv_layout="heads",
                  head_widths=("out_dim",), input_norm=True, caches=("attention_bias_cache",)),
    # Linear + BatchNorm pairs (LinearNorm), an activation before the projection, a bias per head and offset
    HeadAttention("timm.models.levit:Attention", first="qkv.linear", first_norm="qkv.bn", second="proj.ln.linear",
                  per_head=(("attention_biases", 0),), qkv_layout="heads", head_widths=("key_attn_dim", "val_attn_dim"),
                  caches=("attention_bias_cache",)),
)


@dataclass(frozen=True)
class HiddenMlp(UnitModule):
    """An MLP class whose hidden units can be cut (``first`` rows, ``second`` columns); ``hidden_norm``:
    whether its ``norm`` sits between them (timm's Mlp, Identity unless configured) or reads its input."""

    first: str = "fc1"
    second: str = "fc2"
    out: str = "fc2"
    hidden_norm: bool = True


HIDDEN_MLP: tuple[HiddenMlp, ...] = (
    HiddenMlp("timm.layers:Mlp"),
    HiddenMlp("timm.models.tiny_vit:NormMlp", hidden_norm=False),  # a LayerNorm on its input, then Mlp
    HiddenMlp("timm.models.levit:LevitMlp", first="ln1.linear", first_norm="ln1.bn", second="ln2.linear", out="ln2",
              hidden_norm=False),
)


def _unit_module(m: nn.Module) -> UnitModule | None:
    return _head_attention(m) or _hidden_mlp(m)


def _head_attention(m: nn.Module) -> HeadAttention | None:
    return next((h for h in HEAD_ATTENTION if isinstance(m, h.cls())), None)


class BiasBranch(nn.Module):
    """What an attention/MLP module becomes when all its units are removed: its output bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], self.bias.shape[0])


def _hidden_mlp(m: nn.Module) -> HiddenMlp | None:
    return next((h for h in HIDDEN_MLP if isinstance(m, h.cls())), None)


def _linear_layers(name: str, m: nn.Module, spec: UnitModule) -> tuple[nn.Linear, nn.Linear]:
    """The module's ``first`` and ``second`` layers, which must be Linears (LeViT's conv mode is not)."""
    try:
        first, second = spec.layers(m)
    except AttributeError:
        first = second = None
    norm = m.get_submodule(spec.first_norm) if spec.first_norm and isinstance(first, nn.Linear) else None
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)) or (
            spec.first_norm and not isinstance(norm, nn.BatchNorm1d)):
        raise VitcompressError(f"{name}: only units between Linear layers can be pruned structurally")
    return first, second


def _check_attention(name: str, m: nn.Module) -> None:
    if getattr(m, "gate", None) is not None or (
            not _head_attention(m).input_norm and not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)):
        raise VitcompressError(f"{name}: gated or scale-normalised attention is not supported by structural pruning")
    _linear_layers(name, m, _head_attention(m))


def _check_mlp(name: str, m: nn.Module) -> None:
    _linear_layers(name, m, _hidden_mlp(m))
    if _hidden_mlp(m).hidden_norm and not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        raise VitcompressError(f"{name}: only Linear MLPs without a hidden norm can be pruned structurally")


TOKENS_ATTR = "vitcompress_module_tokens"  # the measurement below, cached on the model (units do not change it)


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    channels = int(getattr(getattr(pe, "proj", None), "in_channels", 3))
    if img is not None:
        return (channels, int(img[0]), int(img[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" not in cfg:
        raise VitcompressError(f"{type(model).__name__}: no input size known to measure its token counts")
    return tuple(int(v) for v in cfg["input_size"])


def module_tokens(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per attention / MLP module: (tokens it processes per image, tokens each query attends to),
    measured by running the model once at batch 1 at its input size."""
    cached = getattr(model, TOKENS_ATTR, None)
    if cached is not None:
        return cached
    seen: dict[str, tuple[int, int]] = {}

    def hook(name: str, kind: str):
        def record(m, inp, out):
            x = inp[0]
            if kind == "attn":  # (batch x windows, tokens per window, width)
                seen[name] = (x.shape[0] * x.shape[1], x.shape[1])
            else:  # (..., width): every position but the channels is a token
                seen[name] = (x.numel() // x.shape[-1], 0)
        return record

    hooks = [m.register_forward_hook(hook(n, "attn" if _head_attention(m) else "mlp"))
             for n, m in model.named_modules() if _head_attention(m) is not None or _hidden_mlp(m) is not None]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *_input_size(model)))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    setattr(model, TOKENS_ATTR, seen)
    return seen


def token_count(model: nn.Module) -> int:
    """Tokens per image (patches plus class/prefix tokens) of a ViT-style model."""
    pe = getattr(model, "patch_embed", None)
    n = int(getattr(pe, "num_patches", 0) or 0)
    n += int(getattr(model, "num_prefix_tokens", 0) or 0)
    return max(n, 1)


def unit_macs(kind: str, tokens, width, unit_width: int = 1, out_width=None, attended=None, qk_width=None):
    """Multiply-accumulates per image of one unit: a head of ``unit_width`` value channels and
    ``qk_width`` query/key channels (``unit_width`` unless given; its q, k, v and output projections
    from/to ``width`` channels, and its scores and weighted sum over the ``attended`` tokens each
    query sees: all ``tokens`` unless windowed), or one hidden unit of an MLP (one input and one
    output weight per channel). Works on ints and on tensors (OFB's expected widths are differentiable)."""
    out_width = width if out_width is None else out_width
    attended = tokens if attended is None else attended
    if kind == "attn":
        qk = unit_width if qk_width is None else qk_width
        return tokens * (width * (2 * qk + unit_width) + unit_width * out_width + attended * (qk + unit_width))
    return tokens * (width + out_width)


def find_prunable(model: nn.Module) -> list[PrunableModule]:
    """Every head-structured attention (``HEAD_ATTENTION``) / MLP with hidden units (``HIDDEN_MLP``)
    (or already emptied branch) inside a block, in model order."""
    tokens = module_tokens(model)
    found: list[PrunableModule] = []
    modules = dict(model.named_modules())
    for name, m in model.named_modules():
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name)
        norm_name = None
        if leaf in ("attn", "mlp") and parent is not None:
            cand = "norm1" if leaf == "attn" else "norm2"
            if hasattr(parent, cand):
                norm_name = f"{parent_name}.{cand}"
        if _head_attention(m) is not None:
            _check_attention(name, m)
            (first, second), (qk, v) = _head_attention(m).layers(m), _head_attention(m).dims(m)
            c, (n, attended) = first.in_features, tokens.get(name, (0, 0))  # (0: never reached, costs nothing)
            found.append(PrunableModule(name, "attn", m.num_heads, c, v,
                                        unit_macs("attn", n, c, v, second.out_features, attended, qk), norm_name, n))
        elif _hidden_mlp(m) is not None:
            _check_mlp(name, m)
            first, second = _hidden_mlp(m).layers(m)
            c, (n, _) = first.in_features, tokens.get(name, (0, 0))
            found.append(PrunableModule(name, "mlp", first.out_features, c, 1, unit_macs("mlp", n, c, 1, second.out_features),
                                        norm_name, n))
        elif isinstance(m, BiasBranch) and leaf in ("attn", "mlp"):
            found.append(PrunableModule(name, leaf, 0, m.bias.shape[0], 1, 0, norm_name))
    if not found:
        raise VitcompressError("no timm Attention/Mlp modules found: structural pruning supports ViT/DeiT/Swin-style models")
    return found


@dataclass(frozen=True, eq=False)
class UnitSlice:
    """Where the units of a module sit in one parameter: along ``axis``, in each of ``parts`` equal
    chunks (qkv's q, k and v parts), unit ``u`` owns ``[u*width, (u+1)*width)`` of the chunk."""

    param: nn.Parameter
    axis: int
    parts: int
    width: int

    def indices(self, units: Sequence[int]) -> torch.Tensor:
        """Indices along ``axis`` that belong to ``units``."""
        chunk = self.param.shape[self.axis] // self.parts
        return torch.tensor([p * chunk + u * self.width + j for p in range(self.parts) for u in units for j in range(self.width)],
                            dtype=torch.long)


def unit_slices(model: nn.Module, pm: PrunableModule) -> list[UnitSlice]:
    """The parameters a unit spans, in this order: the rows of the module's ``first`` Linear weight,
    the columns of its ``second`` (``qkv`` and ``proj`` for a head, ``fc1`` and ``fc2`` for a hidden
    unit; ``keep_units`` cuts by these two), then the first's bias and ``first_norm``'s affine where
    present. Per-head parameters (one entry per head, not a head's width) are cut with the head,
    not scored."""
    m = model.get_submodule(pm.name)
    if pm.kind not in ("attn", "mlp"):
        return []
    spec = _unit_module(m)
    first, second = spec.layers(m)
    parts, width, cols = 1, 1, 1
    if pm.kind == "attn":
        qk, cols = spec.dims(m)
        parts, width = (3, cols) if spec.qkv_layout == "parts" else (1, 2 * qk + cols)
    norm = m.get_submodule(spec.first_norm) if spec.first_norm else None
    rows = [t for t in (first.weight, first.bias, getattr(norm, "weight", None), getattr(norm, "bias", None)) if t is not None]
    return [UnitSlice(rows[0], 0, parts, width), UnitSlice(second.weight, 1, 1, cols)] + [UnitSlice(t, 0, parts, width) for t in rows[1:]]


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.to(old.weight.dtype)


def _batchnorm_rows(old: nn.BatchNorm1d, rows: torch.Tensor) -> nn.BatchNorm1d:
    """The BatchNorm of the kept channels: affine and running statistics cut alike."""
    new = nn.BatchNorm1d(len(rows), eps=old.eps, momentum=old.momentum, affine=old.affine,
                         track_running_stats=old.track_running_stats)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(old, attr, None) is not None:
                getattr(new, attr).copy_(getattr(old, attr)[rows])
        if old.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    return new.to(old.weight.dtype if old.weight is not None else torch.float32).train(old.training)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def _empty(model: nn.Module, pm: PrunableModule, out: nn.Module, width: int) -> None:
    """Replace the module by what it outputs once every unit is gone: its ``out`` part (a Linear, or
    LeViT's activation + Linear + BatchNorm) on a zero input of ``width`` channels, in eval mode."""
    was_training = out.training
    with torch.no_grad():
        constant = out.eval()(torch.zeros(1, 1, width)).reshape(-1)
    out.train(was_training)
    branch = BiasBranch(constant.shape[0])
    with torch.no_grad():
        branch.bias.copy_(constant)
    set_submodule(model, pm.name, branch)
    if pm.norm_name is not None:
        set_submodule(model, pm.norm_name, nn.Identity())


def keep_units(model: nn.Module, pm: PrunableModule, keep: Iterable[int]) -> None:
    """Physically remove every unit of ``pm`` not in ``keep`` (in place); the function of the
    model is unchanged when the removed units' weights were zero."""
    keep = sorted(set(int(k) for k in keep))
    if any(k < 0 or k >= pm.units for k in keep):
        raise VitcompressError(f"{pm.name}: unit index out of range 0..{pm.units - 1}")
    m = model.get_submodule(pm.name)
    if pm.kind in ("attn", "mlp"):
        spec = _unit_module(m)
        first, second = spec.layers(m)
        if not keep:
            _empty(model, pm, m.get_submodule(spec.out), second.in_features)
            return
        rows, cols = (sl.indices(keep) for sl in unit_slices(model, pm)[:2])
        set_submodule(m, spec.first, _linear_like(first, first.weight[rows], None if first.bias is None else first.bias[rows]))
        set_submodule(m, spec.second, _linear_like(second, second.weight[:, cols], second.bias))
        if spec.first_norm:
            set_submodule(m, spec.first_norm, _batchnorm_rows(m.get_submodule(spec.first_norm), rows))
        if pm.kind == "mlp":
            return
        heads = torch.tensor(keep, dtype=torch.long)
        for param, axis in spec.per_head:
            setattr(m, param, _cut(getattr(m, param), axis, heads))
        for attr in spec.head_widths:  # num_heads x a head's width
            if hasattr(m, attr):
                setattr(m, attr, len(keep) * (getattr(m, attr) // m.num_heads))
        for attr in spec.caches:
            setattr(m, attr, {})
        m.num_heads = len(keep)
    elif keep:
        raise VitcompressError(f"{pm.name} has no units left to keep")


EMBED_KEY = "embed_dim"  # layout key of the residual width (not a module path: no timm ViT has a module of that name)


def _vit_classes():
    from timm.models.vision_transformer import Block, LayerScale, VisionTransformer

    return VisionTransformer, Block, LayerScale


def embed_unsupported(model: nn.Module) -> str | None:
    """Why the residual width of ``model`` cannot be cut, or None when :func:`keep_embed_channels` can."""
    VisionTransformer, Block, LayerScale = _vit_classes()
    if not isinstance(model, VisionTransformer):
        return f"{type(model).__name__} is not a timm VisionTransformer (plain attention + MLP blocks)"
    if getattr(model, "attn_pool", None) is not None:
        return "its attention-pooling head mixes the residual channels"
    for what in ("norm_pre", "patch_embed.norm"):
        if not isinstance(model.get_submodule(what), nn.Identity):
            return f"its {what} normalises the residual stream before the blocks"
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            return f"blocks.{i} is a {type(blk).__name__}, not a plain pre-norm Block"
        for ls in (blk.ls1, blk.ls2):
            if not isinstance(ls, (nn.Identity, LayerScale)):
                return f"blocks.{i} scales its branches with a {type(ls).__name__}"
    for name, norm in residual_readers(model):
        if not isinstance(norm, (nn.LayerNorm, nn.Identity)):
            return f"{name} is a {type(norm).__name__}, not a LayerNorm"
    if not isinstance(model.norm, nn.LayerNorm) and not isinstance(model.fc_norm, nn.LayerNorm):
        return "its head reads the residual stream without a final LayerNorm"
    return None


def residual_readers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norms through which every branch and the head read the residual stream, in model order
    (an Identity where the branch it fed has been removed)."""
    out = []
    for i, blk in enumerate(model.blocks):
        out += [(f"blocks.{i}.norm1", blk.norm1), (f"blocks.{i}.norm2", blk.norm2)]
    for name in ("norm", "fc_norm"):
        if isinstance(getattr(model, name), nn.LayerNorm):
            out.append((name, getattr(model, name)))
    return out


def _cut(t: torch.Tensor, dim: int, idx: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().index_select(dim, idx).clone(), requires_grad=t.requires_grad)


def keep_embed_channels(model: nn.Module, keep: Iterable[int]) -> None:
    """Remove every residual channel not in ``keep`` (in place) from a plain timm VisionTransformer.
    The function is unchanged when nothing read the removed channels (see the module notes)."""
    reason = embed_unsupported(model)
    if reason is not None:
        raise VitcompressError(f"the embedding width cannot be pruned: {reason}")
    width = model.embed_dim
    keep = sorted(set(int(k) for k in keep))
    if not keep or keep[0] < 0 or keep[-1] >= width:
        raise VitcompressError(f"embedding channels to keep must be a non-empty subset of 0..{width - 1}")
    idx = torch.tensor(keep, dtype=torch.long)
    conv = model.patch_embed.proj
    conv.weight = _cut(conv.weight, 0, idx)
    if conv.bias is not None:
        conv.bias = _cut(conv.bias, 0, idx)
    conv.out_channels = len(keep)
    for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        if getattr(model, name, None) is not None:
            setattr(model, name, _cut(getattr(model, name), -1, idx))

    def norm(m: nn.Module) -> None:
        if isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight, m.bias = _cut(m.weight, 0, idx), (None if m.bias is None else _cut(m.bias, 0, idx))
            m.normalized_shape = (len(keep),)

    def reader(m: nn.Module) -> None:  # a Linear reading the residual width
        if isinstance(m, nn.Linear):
            m.weight = _cut(m.weight, 1, idx)
            m.in_features = len(keep)

    def writer(m: nn.Module) -> None:  # a Linear (or an emptied branch) writing the residual width
        if isinstance(m, nn.Linear):
            m.weight = _cut(m.weight, 0, idx)
            m.out_features = len(keep)
        if getattr(m, "bias", None) is not None:
            m.bias = _cut(m.bias, 0, idx)

    for blk in model.blocks:
        norm(blk.norm1), norm(blk.norm2)
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                ls.gamma = _cut(ls.gamma, 0, idx)
        if isinstance(blk.attn, BiasBranch):
            writer(blk.attn)
        else:
            reader(blk.attn.qkv), writer(blk.attn.proj)
        if isinstance(blk.mlp, BiasBranch):
            writer(blk.mlp)
        else:
            reader(blk.mlp.fc1), writer(blk.mlp.fc2)
    norm(model.norm), norm(model.fc_norm)
    for name in ("head", "head_dist"):
        if getattr(model, name, None) is not None:
            reader(getattr(model, name))
    for attr in ("embed_dim", "num_features", "head_hidden_size"):
        if hasattr(model, attr):
            setattr(model, attr, len(keep))


def layout_of(model: nn.Module) -> dict[str, int]:
    """Units present per prunable module (and the residual width where it can be cut): the
    structure a pruned checkpoint records."""
    layout = {pm.name: pm.units for pm in find_prunable(model)}
    if embed_unsupported(model) is None:
        layout[EMBED_KEY] = int(model.embed_dim)
    return layout


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Reshape a freshly built model to a recorded layout (weights are loaded afterwards)."""
    layout = dict(layout)
    if EMBED_KEY in layout:
        width = int(layout.pop(EMBED_KEY))
        current = getattr(model, "embed_dim", None)
        if current is None or not 0 < width <= current:
            raise VitcompressError(f"pruned layout asks an embedding width of {width}, which this architecture cannot take")
        if width < current:
            keep_embed_channels(model, range(width))
    by_name = {pm.name: pm for pm in find_prunable(model)}
    for name, units in layout.items():
        pm = by_name.get(name)
        if pm is None:
            raise VitcompressError(f"pruned layout names {name}, which this architecture does not have")
        units = int(units)
        if units > pm.units or units < 0:
            raise VitcompressError(f"pruned layout asks {units} units for {name}, which has {pm.units}")
        if units < pm.units:
            keep_units(model, pm, range(units))


def macs(model: nn.Module) -> int:
    """Multiply-accumulates per image of all prunable modules (the part pruning can change)."""
    return sum(pm.units * pm.macs_per_unit for pm in find_prunable(model))


PRUNE_STATE_ATTR = "vitcompress_prune_state"  # a pruned model carries its checkpoint record here


def apply_prune_state(model: nn.Module, prune_state: dict) -> None:
    """Shape a fresh model like the pruned one a checkpoint's ``prune_state`` describes."""
    layout = prune_state.get("layout") if isinstance(prune_state, dict) else None
    if not isinstance(layout, dict):
        raise VitcompressError("the checkpoint's prune_state has no layout")
    apply_layout(model, layout)
    setattr(model, PRUNE_STATE_ATTR, prune_state)


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates per image of every Linear/Conv2d plus the attention products
    (q·kᵀ and attn·v), counted by running the model once at batch 1."""
    total = [0]

    def linear(m, inp, out):
        total[0] += out.numel() * m.in_features

    def conv(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def attention(m, inp, out):
        n, (qk, v) = inp[0].shape[-2], _head_attention(m).dims(m)
        total[0] += n * n * m.num_heads * (qk + v) * inp[0].shape[0]

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif _head_attention(m) is not None:
            hooks.append(m.register_forward_hook(attention))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return int(total[0])


def _shrink(model: nn.Module, fraction: float) -> nn.Module:
    for pm in find_prunable(model):
        if pm.units:
            keep_units(model, pm, range(max(1, round(fraction * pm.units))))
    if embed_unsupported(model) is None:
        keep_embed_channels(model, range(max(1, round(fraction * model.embed_dim))))
    return model


def shrink_uniformly(model: nn.Module, input_size: tuple[int, int, int], factor: float) -> nn.Module:
    """A copy of ``model`` with the same share of every module's units (and of the embedding width
    where it can be cut) kept, the share chosen so that MACs fall about ``factor``-fold. The weights
    are not meaningful: it is a timing probe (how MACs turn into time on a CPU)."""
    import copy

    dense = count_macs(model, input_size)
    lo, hi = 0.0, 1.0  # keep shares: lo meets the MACs budget, hi does not
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        if count_macs(_shrink(copy.deepcopy(model), mid), input_size) * factor <= dense:
            lo = mid
        else:
            hi = mid
    return _shrink(copy.deepcopy(model), max(lo, 1e-6))
