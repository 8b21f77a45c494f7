"""Image folders: ImageFolder (class subfolders) or flat folders, seeded sampling, preprocessing.

Decoding is streamed batch by batch so that ImageNet-scale folders at 224 px fit in memory.
Unreadable files are skipped and counted; a folder with nothing readable is an error.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import VitcompressError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs; travels with every exported artifact.

    resize_mode "crop": resize the shorter side to size/crop_pct, then center-crop (timm eval).
    resize_mode "exact": resize straight to the input size (a no-op when it already matches,
    which is how the 32x32 reference models are fed).
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    resize_mode: str = "crop"
    class_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "resize_mode": self.resize_mode,
            "class_names": list(self.class_names) if self.class_names else None,
        }

    @classmethod
    def from_dict(cls, d: dict, interpolation: str = "bicubic", crop_pct: float = 0.875, resize_mode: str = "crop") -> "Preprocessing":
        """From an artifact's metadata or a checkpoint; the keyword arguments are the defaults of
        fields the source may leave out (timm's eval transform unless the format says otherwise)."""
        try:
            return cls(
                input_size=tuple(int(v) for v in d["input_size"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                interpolation=str(d.get("interpolation", interpolation)),
                crop_pct=float(d.get("crop_pct", crop_pct)),
                resize_mode=str(d.get("resize_mode", resize_mode)),
                class_names=tuple(d["class_names"]) if d.get("class_names") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise VitcompressError(f"invalid preprocessing description: {e}") from None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        _, h, w = self.input_size
        image = image.convert("RGB")  # grayscale, palette and RGBA images become RGB
        interp = _PIL_INTERPOLATION.get(self.interpolation, Image.Resampling.BICUBIC)
        if image.size != (w, h):
            if self.resize_mode == "exact":
                image = image.resize((w, h), interp)
            else:
                scale = max(h, w) / self.crop_pct / min(image.size)
                new = (max(w, round(image.size[0] * scale)), max(h, round(image.size[1] * scale)))
                image = image.resize(new, interp)
                left, top = (new[0] - w) // 2, (new[1] - h) // 2
                image = image.crop((left, top, left + w, top + h))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class ImageSet:
    """A list of image files, with labels when the folder has class subfolders."""

    root: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    skipped: int = 0  # files that looked like images but could not be read (counted while loading)

    def __len__(self) -> int:
        return len(self.paths)


def scan_images(root: str | Path, require_labels: bool = False) -> ImageSet:
    """List the images of an ImageFolder (class subfolders) or of a flat folder."""
    root = Path(root)
    if not root.is_dir():
        raise VitcompressError(f"image folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        paths, labels = [], []
        for label, d in enumerate(subdirs):
            for p in sorted(d.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    paths.append(p)
                    labels.append(label)
        image_set = ImageSet(root, tuple(paths), tuple(labels), tuple(d.name for d in subdirs))
    else:
        if require_labels:
            raise VitcompressError(f"{root} has no class subfolders: evaluation needs an ImageFolder layout (DIR/CLASS/IMAGE)")
        paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        image_set = ImageSet(root, tuple(paths), None, None)
    if not image_set.paths:
        raise VitcompressError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return image_set


def sample(image_set: ImageSet, n: int | None, seed: int) -> ImageSet:
    """A seeded, order-independent subset of n images (all of them when n is None or too large)."""
    if n is None or n >= len(image_set):
        return image_set
    if n <= 0:
        raise VitcompressError(f"sample size must be positive, got {n}")
    return _subset(image_set, sorted(random.Random(seed).sample(range(len(image_set)), n)))


def _subset(image_set: ImageSet, idx: Sequence[int]) -> ImageSet:
    labels = tuple(image_set.labels[i] for i in idx) if image_set.labels is not None else None
    return replace(image_set, paths=tuple(image_set.paths[i] for i in idx), labels=labels)


def without(image_set: ImageSet, taken: ImageSet) -> ImageSet:
    """The images of ``image_set`` that are not in ``taken`` (e.g. those calibration did not see)."""
    used = set(taken.paths)
    return _subset(image_set, [i for i, p in enumerate(image_set.paths) if p not in used])


@dataclass
class LoadStats:
    """Filled while batches are read: how many images were decoded and how many were skipped."""

    loaded: int = 0
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)


def iter_batches(
    image_set: ImageSet,
    preprocessing: Preprocessing,
    batch_size: int = 64,
    stats: LoadStats | None = None,
    require_images: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (images, labels) batches; labels is None for unlabelled folders. ``require_images``:
    a set with no readable image is an error (a shard of a larger set may have none)."""
    stats = stats if stats is not None else LoadStats()
    xs: list[torch.Tensor] = []
    ys: list[int] = []

    def flush():
        x = torch.stack(xs)
        y = torch.tensor(ys, dtype=torch.long) if image_set.labels is not None else None
        xs.clear()
        ys.clear()
        return x, y

    for i, path in enumerate(image_set.paths):
        try:
            with Image.open(path) as im:
                x = preprocessing(im)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            stats.skipped += 1
            stats.skipped_files.append(str(path))
            continue
        xs.append(x)
        if image_set.labels is not None:
            ys.append(image_set.labels[i])
        stats.loaded += 1
        if len(xs) == batch_size:
            yield flush()
    if xs:
        yield flush()
    if stats.loaded == 0 and require_images:
        raise no_images_error(image_set)


def no_images_error(image_set: "ImageSet") -> VitcompressError:
    return VitcompressError(f"none of the {len(image_set)} files in {image_set.root} could be read as an image")


def load_tensor(image_set: ImageSet, preprocessing: Preprocessing, stats: LoadStats | None = None) -> torch.Tensor:
    """All images of a (small) set as one tensor: used for calibration sets."""
    return torch.cat([x for x, _ in iter_batches(image_set, preprocessing, 64, stats)])


def label_map_to_model(image_set: ImageSet, model_classes: Sequence[str] | None, num_classes: int) -> list[int]:
    """Map the folder's class indices to the model's output indices.

    With class names on both sides they are matched by name; otherwise the folder's sorted
    order is taken as the label order (the ImageFolder convention).
    """
    if image_set.class_names is None:
        raise VitcompressError(f"{image_set.root} has no class subfolders, so it has no labels")
    if model_classes:
        index = {name: i for i, name in enumerate(model_classes)}
        missing = [c for c in image_set.class_names if c not in index]
        if missing:
            raise VitcompressError(
                f"classes of {image_set.root} do not match the model's: {', '.join(missing[:5])} not among the model's classes"
            )
        return [index[c] for c in image_set.class_names]
    if len(image_set.class_names) > num_classes:
        raise VitcompressError(
            f"{image_set.root} has {len(image_set.class_names)} classes but the model predicts only {num_classes}"
        )
    return list(range(len(image_set.class_names)))
