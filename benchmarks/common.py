"""What every benchmark script shares: where the project and ../shared are, the --out/--shared
arguments, and writing one section of RESULTS.md without touching the others."""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def add_io_arguments(ap: argparse.ArgumentParser) -> None:
    """--out (the RESULTS.md to update) and --shared (the folder with data/ and zoo/)."""
    ap.add_argument("--out", type=Path, default=RESULTS, help="RESULTS.md to update (its other sections are kept)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder holding data/cifar10 and zoo/")


def cpu_line() -> str:
    """The CPU this process runs on, as the tables record it."""
    import os

    from vitcompress.cpu import this_cpu

    cpu = this_cpu()
    return (f"CPU: {cpu['model']}, int8 ISA {cpu['isa']} (int8 products accumulated in int32: {cpu['int32_dot']}), "
            f"{os.cpu_count()} logical cores.")


def write_section(path: Path, text: str, name: str) -> None:
    """Replace one benchmark's section of RESULTS.md (between ``<!-- NAME:start/end -->``
    markers), keeping whatever else the file holds."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if "CPU:" not in text:  # every table names the CPU it was measured on
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{cpu_line()}\n{body}"
    block = f"{start}\n{text}{end}\n"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block if old else block
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(new)
    scratch.replace(path)  # atomic: an interrupted benchmark never leaves half a RESULTS.md


def add_checkpoint_pair_arguments(ap: argparse.ArgumentParser) -> None:
    """A quantized checkpoint, the float one it came from, and the images it was calibrated on."""
    ap.add_argument("--quantized", type=Path, required=True, help="model.*.pth of a quantize run")
    ap.add_argument("--float", dest="float_ckpt", type=Path, required=True, help="the float checkpoint it came from")
    ap.add_argument("--calib-size", type=int, required=True, help="as in the quantize run (same seeded sample)")
    ap.add_argument("--eval-size", type=int, default=None, help="seeded sample of val (default: all of it)")


def load_checkpoint_pair(args: argparse.Namespace):
    """(the quantized model, the float model, calibration images, val images), both models in eval
    mode; the images as ``vitcompress quantize`` samples them (seed 0) from ../shared's cifar10."""
    from vitcompress import load
    from vitcompress.data import load_tensor, sample, scan_images

    data = args.shared / "data" / "cifar10"
    quantized, reference = load(checkpoint=args.quantized), load(checkpoint=args.float_ckpt)
    prep = quantized.preprocessing
    calib = load_tensor(sample(scan_images(data / "train"), args.calib_size, 0), prep)
    val = load_tensor(sample(scan_images(data / "val", require_labels=True), args.eval_size, 0), prep)
    return quantized.model.eval(), reference.model.eval(), calib, val


def publish(out: Path, section: str, title: str, about: str, columns: list[str], rows: list[str], after: str = "") -> None:
    """Write (and print) one RESULTS.md section: title, the command that made it and the date,
    what was measured, then a table of ``rows`` (already formatted "| ... |" lines)."""
    command = f"python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}"
    lines = [f"## {title}", "", f"Command: `{command}` — {dt.date.today().isoformat()}. {about}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows]
    text = "\n".join(lines + (["", after] if after else [])) + "\n"
    write_section(out, text, section)
    print(text)


def val_halves(val, seed: int = 7):
    """Val split once: (A, B). A (a seeded half) is where variants are compared while tuning; B,
    the rest, is where results are reported: no choice was made on it."""
    from vitcompress.data import sample, without

    tuning = sample(val, len(val) // 2, seed)
    return tuning, without(val, tuning)
