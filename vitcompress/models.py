"""Model loading: timm names and short aliases, checkpoints (plain state dicts, the reference-zoo
format, vitcompress's own compressed checkpoints) and the preprocessing each model expects.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)`` or
safetensors, never unpickled.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data import Preprocessing
from .errors import VitcompressError

ZOO_FORMAT = "vitcompress-zoo/1"

# Short names users type -> timm architecture. A table, so adding a family is one line.
MODEL_ALIASES: dict[str, str] = {
    "mobilevit": "mobilevit_s",
    "mobilevit-xxs": "mobilevit_xxs",
    "mobilevit-xs": "mobilevit_xs",
    "mobilevitv2": "mobilevitv2_100",
    "efficientformer": "efficientformer_l1",
    "efficientformerv2": "efficientformerv2_s0",
    "deit": "deit_small_patch16_224",
    "deit-tiny": "deit_tiny_patch16_224",
    "deit-base": "deit_base_patch16_224",
    "vit": "vit_base_patch16_224",
    "swin": "swin_tiny_patch4_window7_224",
    "levit": "levit_128s",
    "efficientvit": "efficientvit_m0",
}

# Known architecture families by timm name prefix (longest prefix wins). Their support per method is
# data in support.py, measured by the conformance benchmark (benchmarks/CONFORMANCE.md); any other
# timm model is accepted and tried.
FAMILIES: dict[str, str] = {
    "vit_": "ViT", "deit_": "DeiT", "deit3_": "DeiT", "swin_": "Swin Transformer", "swinv2_": "Swin Transformer v2",
    "mobilevit_": "MobileViT v1", "mobilevitv2_": "MobileViT v2",
    "efficientformer_": "EfficientFormer v1", "efficientformerv2_": "EfficientFormer v2", "levit_": "LeViT",
    "efficientvit_b": "EfficientViT (MIT)", "efficientvit_l": "EfficientViT (MIT)", "efficientvit_m": "EfficientViT (MSRA)",
    "tiny_vit_": "TinyViT", "nextvit_": "Next-ViT", "pvt_v2_": "PVT v2", "convnext_": "ConvNeXt",
    "crossvit_": "CrossViT", "volo_": "VOLO", "convit_": "ConViT", "shvit_": "SHViT", "repvit_": "RepViT",
    "fastvit_": "FastViT", "cait_": "CaiT", "coat_": "CoaT", "twins_": "Twins", "poolformer_": "PoolFormer",
    "poolformerv2_": "PoolFormer", "edgenext_": "EdgeNeXt",
}

# Families whose timm blocks train as parallel branches that merge into one layer for inference
# (timm's reparameterize_model). Every load converts them: quantizing the training form would put a
# quantizer on every branch and run them all (FastViT's W8A8 artifact ran at 0.4x its float one).
INFERENCE_FORM: dict[str, str] = {
    "FastViT": "MobileOne blocks, RepMixer, large-kernel and positional-encoding convs train as parallel branches",
    "RepViT": "RepVGG-style depthwise blocks train as 3x3 + 1x1 conv + identity branches",
}


@dataclass
class LoadedModel:
    """A float model in eval mode, with what is needed to feed it and to describe it."""

    model: nn.Module
    arch: str
    preprocessing: Preprocessing
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # checkpoint path, or "timm:<arch>"
    weights: str = "checkpoint"  # "checkpoint" | "pretrained" | "random"
    quant_state: dict | None = None  # present when the checkpoint was written by `quantize`
    metrics: dict = field(default_factory=dict)
    inference_form: bool = False  # the model's training-time branches were merged (INFERENCE_FORM)

    @property
    def accuracy_meaningful(self) -> bool:
        return self.weights != "random"


def resolve_arch(name: str) -> str:
    """Turn an alias or a timm name into a timm architecture name, or fail clearly."""
    import timm

    arch = MODEL_ALIASES.get(name.lower(), name)
    if arch not in timm.list_models():
        close = [m for m in timm.list_models(f"*{name.lower().replace('-', '_')}*")][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see `vitcompress models`)"
        raise VitcompressError(f"unknown model '{name}'{hint}")
    return arch


def list_models() -> list[tuple[str, str]]:
    """(alias, timm name) rows for `vitcompress models`."""
    return sorted(MODEL_ALIASES.items())


def family_of(arch: str) -> str:
    """The known family an architecture belongs to, longest prefix first."""
    for prefix in sorted(FAMILIES, key=len, reverse=True):
        if arch.startswith(prefix):
            return FAMILIES[prefix]
    return "other timm model"


def to_inference_form(model: nn.Module, arch: str) -> bool:
    """Merge the training-time branches of a family listed in INFERENCE_FORM, in place (exact up to
    float rounding in eval mode); whether anything was merged."""
    if family_of(arch) not in INFERENCE_FORM:
        return False
    from timm.models import reparameterize_model

    reparameterize_model(model.eval(), inplace=True)
    return True


def _create(arch: str, num_classes: int | None, kwargs: dict, pretrained: bool = False) -> nn.Module:
    import timm

    extra = dict(kwargs)
    if num_classes is not None:
        extra["num_classes"] = num_classes
    try:
        return timm.create_model(arch, pretrained=pretrained, **extra)
    except TypeError as e:
        raise VitcompressError(f"cannot build {arch} with {extra}: {e}") from None


def _preprocessing_from_timm(model: nn.Module, class_names=None) -> Preprocessing:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return Preprocessing(
        input_size=tuple(cfg["input_size"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        resize_mode="crop",
        class_names=tuple(class_names) if class_names else None,
    )


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise VitcompressError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse means the file is unusable as a checkpoint
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitcompressError(f"cannot read checkpoint {path}: {first_line[:200]}") from None


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitcompressError(f"{path} does not hold a state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise VitcompressError(f"checkpoint {path} does not match the architecture: {'; '.join(parts)}")
    model.load_state_dict(state)


def _infer_num_classes(arch: str, state: dict) -> int | None:
    """Class count from the classifier's weight in a plain state dict, so fine-tuned heads load."""
    import timm

    classifier = timm.models.get_pretrained_cfg_value(arch, "classifier") or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    for name in names:
        for key in (f"{name}.weight", f"{name}.fc.weight"):
            w = state.get(key)
            if isinstance(w, torch.Tensor) and w.dim() >= 1:
                return int(w.shape[0])
    return None


def load_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    before_load: Callable[[nn.Module, dict], None] | None = None,
) -> LoadedModel:
    """Build a model from a timm name/alias and/or a checkpoint.

    - zoo/vitcompress checkpoint alone: architecture, kwargs, classes and preprocessing come from it.
    - plain state dict (.pth/.pt/.safetensors): needs ``name``; the class count is read off the head.
    - name alone: timm pretrained weights if they are already cached locally, else a clear error;
      ``pretrained=False`` builds random weights (accuracy is then meaningless).
    ``before_load(model, checkpoint_dict)`` may reshape a fresh zoo-format model before its
    weights are loaded (compressed checkpoints use it).
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        obj = _read_checkpoint(path)
        if isinstance(obj, dict) and obj.get("format") == ZOO_FORMAT:
            return _from_zoo(obj, path, name, before_load)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if name is None:
            raise VitcompressError(f"{path} is a plain state dict: say which architecture it is with --model NAME")
        arch = resolve_arch(name)
        model = _create(arch, _infer_num_classes(arch, obj), {})
        _load_state(model, obj, path)
        return _fresh(model, arch, source=str(path))
    if name is None:
        raise VitcompressError("say which model to load: --model NAME and/or --checkpoint PATH")
    arch = resolve_arch(name)
    if not pretrained:
        return _fresh(_create(arch, None, {}), arch, source=f"timm:{arch}", weights="random")
    try:
        with _hub_offline():
            model = _create(arch, None, {}, pretrained=True).eval()
    except VitcompressError:
        raise
    except Exception:
        raise VitcompressError(
            f"pretrained weights for {arch} are not in the local cache; pass --checkpoint PATH "
            "(a state dict or a vitcompress-zoo file), or --no-pretrained for random weights "
            "(VITCOMPRESS_ALLOW_DOWNLOAD=1 allows a download where a model hub is reachable)"
        ) from None
    return _fresh(model, arch, source=f"timm:{arch}", weights="pretrained")


def _fresh(model: nn.Module, arch: str, **fields: Any) -> LoadedModel:
    """A model built here (not from a vitcompress checkpoint), in eval mode and its inference form."""
    merged = to_inference_form(model.eval(), arch)
    return LoadedModel(model, arch, _preprocessing_from_timm(model), _num_classes(model), inference_form=merged, **fields)


@contextlib.contextmanager
def _hub_offline():
    """Use only locally cached hub weights, so a missing file fails at once instead of retrying
    the network; VITCOMPRESS_ALLOW_DOWNLOAD=1 lets a machine with network fetch them."""
    if os.environ.get("VITCOMPRESS_ALLOW_DOWNLOAD") == "1":
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _num_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or 0)


def _from_zoo(obj: dict, path: Path, name: str | None,
              before_load: Callable[[nn.Module, dict], None] | None = None) -> LoadedModel:
    try:
        arch = str(obj["arch"])
        kwargs = dict(obj.get("kwargs") or {})
        num_classes = int(obj["num_classes"])
        state = obj["state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise VitcompressError(f"{path} is not a valid {ZOO_FORMAT} checkpoint: missing or bad {e}") from None
    if name is not None and resolve_arch(name) != arch:
        raise VitcompressError(f"{path} holds a {arch}, not a {resolve_arch(name)}")
    model = _create(resolve_arch(arch), num_classes, kwargs).eval()
    saved_merged = bool(obj.get("inference_form"))  # written by vitcompress from a merged model
    if saved_merged and not to_inference_form(model, arch):
        raise VitcompressError(f"{path} holds merged {arch} weights, but its family has no inference form here")
    if before_load is not None:
        before_load(model, obj)
    _load_state(model, state, path)
    merged = saved_merged or to_inference_form(model, arch)  # a training-form checkpoint merges after loading
    classes = obj.get("classes")
    if "input_size" in obj:
        # zoo files describe small fixed-size inputs: resized exactly unless they say otherwise
        prep = Preprocessing.from_dict({**obj, "class_names": classes}, interpolation="bilinear", crop_pct=1.0, resize_mode="exact")
    else:
        prep = _preprocessing_from_timm(model, classes)
    return LoadedModel(
        model, arch, prep, num_classes, kwargs=kwargs, source=str(path),
        quant_state=obj.get("quant_state"), metrics=dict(obj.get("metrics") or {}), inference_form=merged,
    )


def checkpoint_dict(loaded: LoadedModel, state_dict: dict, **extra: Any) -> dict:
    """A zoo-format dict (plain types and tensors only, so weights_only loading works)."""
    p = loaded.preprocessing
    return {
        "format": ZOO_FORMAT,
        "arch": loaded.arch,
        "kwargs": loaded.kwargs,
        "num_classes": loaded.num_classes,
        "classes": list(p.class_names) if p.class_names else None,
        "input_size": list(p.input_size),
        "mean": list(p.mean),
        "std": list(p.std),
        "interpolation": p.interpolation,
        "crop_pct": p.crop_pct,
        "resize_mode": p.resize_mode,
        "inference_form": loaded.inference_form,
        "state_dict": {k: v.detach().clone().contiguous() for k, v in state_dict.items()},
        **extra,
    }
