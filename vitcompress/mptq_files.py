"""Files of a mixed-precision run: the per-layer bit assignment (YAML) and the walked Pareto curve (PNG).

The YAML is what ``vitcompress quantize --method mptq --bits-from FILE`` reads back:

    format: vitcompress-bits/1
    weighting: MACs per image
    average_bits: 4.98
    layers: {blocks.0.attn.qkv: 6, ...}
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import VitcompressError
from .fileio import atomic_path

BITS_FORMAT = "vitcompress-bits/1"


def write_bits_yaml(path: Path, mixed_precision: dict, arch: str, full: bool) -> None:
    doc = {
        "format": BITS_FORMAT,
        "arch": arch,
        "full": full,
        "weighting": mixed_precision["weighting"],
        "target_bits": mixed_precision.get("target_bits"),
        "average_bits": round(float(mixed_precision["average_bits"]), 4),
        "bit_choices": mixed_precision.get("bit_choices"),
        "layers": {k: int(v) for k, v in mixed_precision["assignment"].items()},
    }
    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(doc, sort_keys=False))


def read_bits_yaml(path: Path) -> dict:
    """The assignment file as {"layers": {name: bits}, "full": bool}; bad files are a VitcompressError."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise VitcompressError(f"cannot read bits file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise VitcompressError(f"bits file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or doc.get("format") != BITS_FORMAT or not isinstance(doc.get("layers"), dict):
        raise VitcompressError(f"{path} is not a {BITS_FORMAT} file (written by --target-bits)")
    layers = doc["layers"]
    if not layers or any(not isinstance(v, int) or not 2 <= v <= 8 for v in layers.values()):
        raise VitcompressError(f"{path}: every layer needs an integer bit-width between 2 and 8")
    return {"layers": {str(k): int(v) for k, v in layers.items()}, "full": bool(doc.get("full", False))}


def plot_pareto(path: Path, mixed_precision: dict, title: str) -> None:
    """Average bits vs measured sensitivity (KL) and vs top-1 agreement along the greedy walk."""
    from .reports.plots import pareto

    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(pareto(mixed_precision["path"], mixed_precision["target_bits"], title))


def mptq_cli_options(method: str, target_bits: float | None, bit_choices: str, bits_from: Path | None,
                     full: bool) -> dict:
    """``QuantConfig.method_options`` for the mptq flags of `vitcompress quantize` (validated)."""
    if method != "mptq":
        if target_bits is not None or bits_from is not None or full:
            raise VitcompressError("--target-bits, --bits-from and --full need --method mptq")
        return {}
    try:
        choices = sorted({int(b) for b in bit_choices.split(",") if b.strip()})
    except ValueError:
        raise VitcompressError(f"--bit-choices must be comma-separated integers like 4,5,6,8, got {bit_choices!r}") from None
    options: dict = {}
    if bits_from is not None:
        if target_bits is not None:
            raise VitcompressError("give either --target-bits or --bits-from, not both")
        assignment = read_bits_yaml(bits_from)
        options["layer_bits"] = assignment["layers"]
        full = full or assignment["full"]
    if target_bits is not None:
        options.update(target_bits=float(target_bits), bit_choices=choices)
    if full:
        options["full"] = True
    return options


def write_mixed_precision_files(out: Path, report: dict) -> dict[str, Path]:
    """bits.yaml (the assignment, for --bits-from) and pareto.png (the walk) beside report.json."""
    mp = report["quantization"]["mixed_precision"]
    full = bool(report["quantization"].get("mptq", {}).get("full", False))
    files = {"bits": Path(out) / "bits.yaml", "pareto": Path(out) / "pareto.png"}
    write_bits_yaml(files["bits"], mp, report["model"]["arch"], full)
    plot_pareto(files["pareto"], mp, f"{report['model']['arch']} greedy mixed precision, target {mp['target_bits']:g} bits")
    return files
