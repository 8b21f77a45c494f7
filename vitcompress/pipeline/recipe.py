"""Recipes: a reviewed, re-runnable pipeline in one YAML file (schema ``vitcompress-recipe/1``).

    schema: vitcompress-recipe/1
    model: {checkpoint: ../../shared/zoo/cifar10_vit_tiny.pth}    # or {name: deit_tiny_patch16_224, pretrained: false}
    data: {calib: ../../shared/data/cifar10/train, eval: ../../shared/data/cifar10/val}
    seed: 0
    steps:
      - prune: {method: lpvit, target_speedup: 2}
      - quantize: {wbits: 8, abits: 8, placement: speed}
      - check: {max_drop: 1.0}

Relative paths are read from the recipe file's folder. Every error names the file, the line and
the field in one line: ``recipe.yaml:7: steps[2].quantize.wbits: expected an integer, got 'eight'``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import VitcompressError
from ..models import family_of, resolve_arch
from ..support import check_supported
from .steps import STEPS, StepSpec

SCHEMA = "vitcompress-recipe/1"


class _Mapping(dict):
    """A YAML mapping that remembers the line of each key (and its own)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.line = 0
        self.lines: dict[str, int] = {}


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    mapping = _Mapping(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    mapping.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass(frozen=True)
class ModelSource:
    name: str | None = None  # timm name or alias
    checkpoint: Path | None = None
    pretrained: bool = True


@dataclass(frozen=True)
class DataSource:
    calib: Path | None = None
    eval: Path | None = None
    eval_size: int | None = None


@dataclass(frozen=True)
class Step:
    kind: str
    options: Any  # the step's config dataclass
    line: int


@dataclass(frozen=True)
class Recipe:
    path: Path
    model: ModelSource
    data: DataSource
    seed: int
    steps: tuple[Step, ...]
    description: str = ""
    overrides: tuple[str, ...] = field(default_factory=tuple)


class _Where:
    """Builds 'file:line: field: message' errors."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, line: int, name: str, message: str) -> VitcompressError:
        return VitcompressError(f"{self.path}:{line}: {name}: {message}")


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path",
            dict: "a mapping"}.get(t, getattr(t, "__name__", str(t)))


def _coerce(value: Any, t: Any) -> Any:
    """``value`` as type ``t`` (from a dataclass annotation); TypeError with what was expected."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: TypeError | None = None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a)
            except TypeError as e:
                last = e
        raise last or TypeError("unexpected value")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item) for v in value)
    if origin is dict or t is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {value!r}")
        return dict(value)
    if t is Any:
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if t in (str, Path):
        if not isinstance(value, str):
            raise TypeError(f"expected {_type_name(t)}, got {value!r}")
        return t(value)
    raise TypeError(f"unsupported field type {t}")


def build_dataclass(cls: type, fields: dict, where: _Where, line: int, prefix: str, lines: dict | None = None,
                    extra_valid: list[str] | tuple[str, ...] = ()) -> Any:
    """``cls(**fields)`` with every field checked against its annotation, errors pointing at the
    line (``extra_valid``: keys another config of the same step takes, named in the error)."""
    hints = typing.get_type_hints(cls)
    # a nested config (a dataclass-typed field) is filled by its step's builder, not by the recipe
    valid = [f.name for f in dataclasses.fields(cls) if f.init and not dataclasses.is_dataclass(hints[f.name])]
    lines = lines if lines is not None else getattr(fields, "lines", {})
    values = {}
    for key, value in fields.items():
        at = lines.get(key, line)
        if key not in valid:
            raise where.error(at, f"{prefix}.{key}", f"unknown field (valid: {', '.join(sorted([*valid, *extra_valid]))})")
        try:
            values[key] = _coerce(value, hints[key])
        except TypeError as e:
            raise where.error(at, f"{prefix}.{key}", str(e)) from None
    try:
        return cls(**values)
    except VitcompressError as e:  # the config's own checks (e.g. bits out of range)
        raise where.error(line, prefix, str(e)) from None
    except TypeError as e:
        raise where.error(line, prefix, str(e)) from None


def _section(doc: _Mapping, key: str, where: _Where) -> _Mapping:
    value = doc.get(key)
    if value is None:
        return _Mapping()
    if not isinstance(value, dict):
        raise where.error(doc.lines.get(key, doc.line), key, f"expected a mapping, got {value!r}")
    return value


def _resolve_path(base: Path, value: Path | None, where: _Where, line: int, name: str, must_exist: bool = True) -> Path | None:
    if value is None:
        return None
    path = value if value.is_absolute() else (base / value)
    if must_exist and not path.exists():
        raise where.error(line, name, f"no such file or folder: {value} (relative paths are read from the recipe's folder)")
    return path.resolve()


def apply_overrides(doc: _Mapping, overrides: list[str] | tuple[str, ...], where: _Where) -> None:
    """``--set step.key=value`` (``quantize.wbits=6``; the first step of that kind), ``N.key=value``
    (the N-th step, from 1), or a top-level section (``data.eval_size=500``, ``seed=1``)."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        if not sep or not target:
            raise VitcompressError(f"--set {item}: expected KEY=VALUE, e.g. quantize.wbits=6")
        value = yaml.safe_load(raw) if raw else None
        head, _, key = target.partition(".")
        steps = doc.get("steps") or []
        if head in ("model", "data") and key:
            section = doc.setdefault(head, _Mapping())
            section[key] = value
        elif head == "seed" and not key:
            doc["seed"] = value
        elif key:
            index = int(head) - 1 if head.isdigit() else next(
                (i for i, s in enumerate(steps) if isinstance(s, dict) and head in s), None)
            if index is None or not 0 <= index < len(steps):
                raise VitcompressError(f"--set {item}: the recipe has no step '{head}'")
            (kind, options), = steps[index].items()
            if options is None:
                options = steps[index][kind] = _Mapping()
            options[key] = value
        else:
            raise VitcompressError(f"--set {item}: name a step field (quantize.wbits=6), data.KEY, model.KEY or seed")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), require_schema: bool = True) -> Recipe:
    """Parse and validate a recipe file; any problem is a one-line VitcompressError.

    ``require_schema=False`` reads a bare step list (what `quantize --recipe` takes: the model and
    images come from its flags), without the schema line, the data the steps need or the files the
    recipe names."""
    path = Path(path)
    where = _Where(path)
    try:
        doc = yaml.load(path.read_text(), Loader=_LineLoader)
    except OSError as e:
        raise VitcompressError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise VitcompressError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: "
                               f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise where.error(1, "recipe", "expected a mapping with 'steps:'")
    apply_overrides(doc, overrides, where)
    known = {"schema", "description", "model", "data", "seed", "steps"}
    for key in doc:
        if key not in known:
            raise where.error(doc.lines.get(key, 1), key, f"unknown field (valid: {', '.join(sorted(known))})")
    if require_schema and doc.get("schema") != SCHEMA:
        raise where.error(doc.lines.get("schema", 1), "schema", f"expected '{SCHEMA}', got {doc.get('schema')!r}")
    base = path.parent
    model_doc = _section(doc, "model", where)
    model = build_dataclass(ModelSource, model_doc, where, model_doc.line or 1, "model")
    model = dataclasses.replace(model, checkpoint=_resolve_path(base, model.checkpoint, where, model_doc.lines.get("checkpoint", 1),
                                                               "model.checkpoint", require_schema))
    data_doc = _section(doc, "data", where)
    data = build_dataclass(DataSource, data_doc, where, data_doc.line or 1, "data")
    data = dataclasses.replace(data, calib=_resolve_path(base, data.calib, where, data_doc.lines.get("calib", 1), "data.calib",
                                                         require_schema),
                               eval=_resolve_path(base, data.eval, where, data_doc.lines.get("eval", 1), "data.eval", require_schema))
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise where.error(doc.lines.get("seed", 1), "seed", f"expected an integer, got {seed!r}")
    steps_doc = doc.get("steps")
    if not isinstance(steps_doc, list) or not steps_doc:
        raise where.error(doc.lines.get("steps", 1), "steps", "expected a non-empty list of steps")
    steps = []
    for i, item in enumerate(steps_doc):
        name = f"steps[{i + 1}]"
        line = getattr(item, "line", doc.lines.get("steps", 1))
        if not isinstance(item, dict) or len(item) != 1:
            raise where.error(line, name, "each step is one mapping like 'quantize: {wbits: 8}'")
        (kind, options), = item.items()
        spec: StepSpec | None = STEPS.get(kind)
        if spec is None:
            raise where.error(line, f"{name}.{kind}", f"unknown step (choose from {', '.join(STEPS)})")
        options = options if options is not None else _Mapping()
        if not isinstance(options, dict):
            raise where.error(line, f"{name}.{kind}", f"expected a mapping of options, got {options!r}")
        at = getattr(options, "line", line) or line
        lines = getattr(options, "lines", {})
        config = spec.build(spec, options, lambda cls, fields, extra_valid=(), at=at, lines=lines, prefix=f"{name}.{kind}":
                            build_dataclass(cls, fields, where, at, prefix, lines, extra_valid))
        spec.validate(config, lambda field_, msg: where.error(getattr(options, "lines", {}).get(field_, line), f"{name}.{kind}.{field_}", msg))
        for needed in spec.needs if require_schema else ():
            if getattr(data, needed) is None:
                raise where.error(data_doc.line or doc.lines.get("steps", 1), f"data.{needed}",
                                  f"step {i + 1} ({kind}) needs images: set data.{needed}")
        steps.append(Step(kind, config, line))
    if require_schema and model.name is None and model.checkpoint is None:
        raise where.error(model_doc.line or 1, "model", "name a model: model.name (timm name or alias) or model.checkpoint")
    if model.name is not None:  # a method the family does not support fails here, before any step runs
        arch = resolve_arch(model.name)
        for i, step in enumerate(steps):
            method = STEPS[step.kind].method(step.options)
            try:
                if method is not None:
                    check_supported(arch, family_of(arch), method)
            except VitcompressError as e:
                raise where.error(step.line, f"steps[{i + 1}].{step.kind}.method", str(e)) from None
    return Recipe(path=path, model=model, data=data, seed=seed, steps=tuple(steps), description=str(doc.get("description") or ""),
                  overrides=tuple(overrides))
