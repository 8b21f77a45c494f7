"""Atomic writes and output folders: nothing half-written, nothing overwritten without --force."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import VitcompressError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    """One line naming the first output file that exists, unless ``force``."""
    for path in paths:
        if Path(path).exists() and not force:
            raise VitcompressError(f"{path} exists; pass --force to overwrite it")


def write_text(path: str | Path, text: str) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise VitcompressError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path: str | Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path, what: str = "a vitcompress report") -> dict:
    """A JSON object from a file, or one line saying why not."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise VitcompressError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise VitcompressError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise VitcompressError(f"{path} is not {what}")
    return data


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def prepare_output_dir(out: str | Path, force: bool, expected: list[str]) -> Path:
    """Create ``out`` (or reuse it with ``force``); refuse to clobber existing artifacts otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VitcompressError(f"--out {out} exists and is not a folder")
    if out.is_dir() and not force:
        clash = [name for name in expected if (out / name).exists()]
        if clash or any(out.iterdir()):
            raise VitcompressError(f"output folder {out} is not empty; pass --force to overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vitcompress-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise VitcompressError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    return out
