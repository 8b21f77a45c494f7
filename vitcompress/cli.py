"""The `vitcompress` command: parses flags, calls the Python API, prints tables. No computation."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import api
from .errors import VitcompressError
from .fileio import refuse_overwrite, write_text
from .workers import Workers

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training compression of vision transformers: quantize, export, check.")
console = Console(stderr=True)
out_console = Console()

EXIT_FAIL, EXIT_BAD_INPUT = 1, 2

# Where evaluation (and min-max calibration, MPTQ's probes) runs: the same flags on every command.
WORKERS_OPTION = typer.Option(1, "--workers", help="Run evaluation shards on N Ray workers (a local instance started for the job); "
                                                   "the numbers are those of one process.")
RAY_ADDRESS_OPTION = typer.Option(None, "--ray-address", help="Run them on a running Ray cluster (paths must be readable there).")


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # an install hint's [extra] is text
    raise typer.Exit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def _progress():
    """A rich progress display; yields the (stage, done, total) callback the API expects."""
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False,
                  disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, info: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info=info)
            bar.update(tasks[stage], completed=done, total=total, info=info)

        yield update


def _guard(fn, *args, **kwargs):
    """Run an API call; bad input becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except VitcompressError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _print_session_config(export_info: dict) -> None:
    entries = export_info.get("onnxruntime_session_config")
    if entries:
        out_console.print("deploy with onnxruntime session config " + ", ".join(f"{k}={v}" for k, v in entries.items())
                          + " (kept in the artifact's metadata; without it the attention products run u8·u8: same results, slower)",
                          highlight=False)


def _size_latency_rows(t: Table, r: dict, kind: str, speedup_label: str) -> None:
    """Size, median latency and speedup of fp32 vs the compressed artifact (``kind``)."""
    a, lat = r["artifacts"], r["latency"]
    t.add_row("size", _mb(a["fp32"]["bytes"]), _mb(a[kind]["bytes"]))
    rt = lat["fp32"].get("runtime") or {"name": "onnxruntime", "version": ""}
    t.add_row(f"latency ms ({rt['name']} {rt['version']}, {lat['fp32']['threads']} thread, batch 1, median)",
              f"{lat['fp32']['median_ms']:.3f}", f"{lat[kind]['median_ms']:.3f}")
    t.add_row(speedup_label, "", f"{lat['speedup']:.2f}x")
    if "fp32_onnxruntime" in lat:
        t.add_row("speedup vs the fastest fp32 (either runtime)", "", f"{lat['speedup_vs_fastest_fp32']:.2f}x")


def print_quantize_report(r: dict) -> None:
    t = Table(title=f"{r['model']['arch']} · {r['method']} · {r['bits']['label']}", show_header=True)
    t.add_column("")
    t.add_column("fp32 (ONNX)", justify="right")
    t.add_column(f"{r['bits']['label']} (ONNX)", justify="right")
    acc = r.get("accuracy")
    if acc:
        t.add_row("top-1 %", _pct(acc["fp32"]["top1"]), _pct(acc["quantized"]["top1"]))
        if "top5" in acc["fp32"]:
            t.add_row("top-5 %", _pct(acc["fp32"]["top5"]), _pct(acc["quantized"]["top5"]))
        t.add_row("top-1 drop (points; < 0 is a gain)", "", f"{acc['drop']:.2f}")
        t.add_row("top-1 agreement %", "", _pct(acc["top1_agreement"]))
        t.add_row("mean KL", "", f"{acc['kl']:.4f}")
    _size_latency_rows(t, r, "quantized", "speedup")
    t.add_row("MACs in integer kernels", "", f"{100 * r['coverage']['integer_mac_share']:.1f}%")
    out_console.print(t)
    q = r["quantization"]
    kept = ", ".join(f"{k} x{v}" for k, v in q["kept_float"].items()) or "nothing"
    out_console.print(f"kept float: {kept}; {q['functional_ops_float']}")
    if q.get("narrow_layer_bits"):
        nl = q["narrow_layer_bits"]
        out_console.print(f"narrow layers (< 64 products per output) kept at {nl['bits']} bits: {len(nl['layers'])}, "
                          f"{100 * nl['mac_share']:.1f}% of the quantized MACs")
    if q["kept_float_weighted_layers"]:
        names = q["kept_float_weighted_layers"]
        out_console.print(f"[yellow]warning:[/] {len(names)} Linear/Conv layer(s) the placement selects stayed float "
                          f"(a skip pattern, the per-family table in quant/placement.py, or an unsupported subclass): {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
    if r["coverage"]["float_islands"]:
        top = r["coverage"]["float_islands"][:3]
        by_op = list(r["coverage"].get("float_mac_share_by_op", {}).items())[:3]
        out_console.print("largest float islands: " + ", ".join(f"{i['node']} ({i['op']})" for i in top)
                          + ("; float MACs by operator: " + ", ".join(f"{op} {100 * share:.1f}%" for op, share in by_op) if by_op else ""))
    if r["coverage"].get("simulated_layers"):
        out_console.print(f"simulated (Q/DQ around a float kernel): {len(r['coverage']['simulated_layers'])} layer(s)")
    _print_session_config(r["export"])
    if acc:
        out_console.print(f"eval: {acc['images']} images from {acc['eval_dir']} ({acc['skipped']} unreadable skipped); "
                          f"exported vs torch simulation agreement {acc['export_vs_torch_agreement']:.2f}%")
    auto = r.get("placement_auto")
    if auto:
        tried = "; ".join(f"{c['placement']}: " + (f"{c['speedup']:.2f}x, {c['measured']}" if "speedup" in c else c["error"])
                          for c in auto["candidates"])
        out_console.print(f"placement {auto['mode']}: chose {auto['chosen']}, {auto['why']} — {tried}", highlight=False)
    for note in r["notes"]:
        out_console.print(f"[yellow]note:[/] {note}")


@app.command()
def quantize(
    out: Path = typer.Option(..., "--out", help="Output folder for artifacts and report.json."),
    model: Optional[str] = typer.Option(None, "--model", help="timm name or alias (see `vitcompress models`)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="State dict, zoo file or vitcompress checkpoint."),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random weights (speed/export work only)."),
    bits: int = typer.Option(8, "--bits", help="Bits for weights and activations."),
    wbits: Optional[int] = typer.Option(None, "--wbits", help="Weight bits (overrides --bits)."),
    abits: Optional[int] = typer.Option(None, "--abits", help="Activation bits (overrides --bits)."),
    method: str = typer.Option("minmax", "--method", help="Quantization method."),
    observer: str = typer.Option("minmax", "--observer", help="Activation range observer: minmax, percentile, mse."),
    placement: str = typer.Option("default", "--placement", help="default (placements tried in the order of the per-runtime/family/CPU table; the first measured faster than float on this CPU within --max-drop is kept: top-1 drop on --eval, or else disagreement with fp32 on held-out calibration images), auto (all of speed/speed-wide/linear/partial/matmul-int8/eltwise measured, the fastest within --max-drop kept), partial (alias accuracy: Linear/Conv weights and inputs), partial-wide (partial with convs summing fewer than 64 products per output float; what qhyvit/mptq run on at W8A8 by default, partial below), partial+matmul (also attention products), eltwise (partial+matmul with the operands of residual adds, attention products and norms quantized too, so OpenVINO keeps the tensors between layers int8; minmax only), speed (integer chains onnxruntime fuses: conv outputs and SiLU gates quantized too), speed-wide (speed with depthwise convs float) or linear (Linear only; convs float)."),
    calib: Path = typer.Option(..., "--calib", help="Calibration images: ImageFolder or flat folder."),
    calib_size: int = typer.Option(256, "--calib-size", help="Images sampled (seeded) for calibration."),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Labelled ImageFolder for accuracy."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="Evaluate on a seeded sample of this many images."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output folder."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of the table."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe; its quantize step replaces the bit/method flags."),
    target_bits: Optional[float] = typer.Option(None, "--target-bits", help="mptq: greedy mixed precision down to this MAC-weighted average width."),
    bit_choices: str = typer.Option("4,5,6,8", "--bit-choices", help="mptq: candidate widths for --target-bits."),
    bits_from: Optional[Path] = typer.Option(None, "--bits-from", help="mptq: per-layer bits YAML written by a --target-bits run."),
    skip: list[str] = typer.Option([], "--skip", help="Module-name pattern kept float (repeatable), e.g. 'head' or 'blocks.1*'."),
    full: bool = typer.Option(False, "--full", help="mptq: also quantize attention products, Softmax, GELU and LayerNorm inputs."),
    reconstruct_steps: Optional[int] = typer.Option(None, "--reconstruct-steps", help="qhyvit, mptq: steps per block of block reconstruction with learned rounding (BRECQ/AdaRound/QDrop) after the search; 0 = off (default: the method's)."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="--placement default/auto: top-1 points the chosen placement may lose on --eval."),
    min_agreement: float = typer.Option(97.0, "--min-agreement", help="--placement default/auto without --eval: top-1 agreement with fp32 (%) asked on held-out calibration images."),
    target_cpu: str = typer.Option("auto", "--target-cpu", help="int8 kernels of the deployment CPU: auto (this machine), portable (7-bit weights, uint8 attention operands: exact on every CPU; pick it when the deployment CPU is unknown), vnni (full-range int8: exact only with VNNI/AMX/ARM dot product, faster there); avx2 = portable."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="Where accuracy, latency and integer coverage are measured: onnxruntime or openvino (pip install 'vitcompress[openvino]')."),
    weight_format: str = typer.Option("int8", "--weight-format", help="int8 (weights stored as int8 codes: integer kernels) or int4 (Linear weights of <= 4 bits packed two per byte as onnxruntime MatMulNBits: about half the size, computed in float)."),
    workers: int = WORKERS_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
):
    """Calibrate and quantize a model, export fp32 and QDQ ONNX, measure both."""
    if recipe is not None:
        from .recipe import quantize_step

        given = [flag for flag, value, default in (
            ("--bits", bits, 8), ("--wbits", wbits, None), ("--abits", abits, None), ("--method", method, "minmax"),
            ("--observer", observer, "minmax"), ("--placement", placement, "default"), ("--target-bits", target_bits, None),
            ("--bit-choices", bit_choices, "4,5,6,8"), ("--bits-from", bits_from, None), ("--skip", skip, []),
            ("--full", full, False), ("--reconstruct-steps", reconstruct_steps, None)) if value != default]
        if given:
            _fail(f"--recipe sets the quantization; drop {', '.join(given)} or put them in the recipe")

        config = _guard(quantize_step, recipe).config
    else:
        from .mptq_files import mptq_cli_options

        options = _guard(mptq_cli_options, method, target_bits, bit_choices, bits_from, full)
        if reconstruct_steps is not None:
            from .quant.options import accepts_option

            if not accepts_option(method, "reconstruction_steps"):
                _fail(f"--reconstruct-steps needs a method with block reconstruction (qhyvit, mptq), not {method!r}")
            options["reconstruction_steps"] = reconstruct_steps
        config = _guard(api.QuantConfig, method=method, wbits=wbits or bits, abits=abits or bits, act_observer=observer,
                        placement="partial+matmul" if options.get("full") else placement, method_options=options,
                        skip=tuple(skip))
    job = api.QuantizeJob(out=out, model=model, checkpoint=checkpoint, pretrained=not no_pretrained, config=config,
                          calib_dir=calib, calib_size=calib_size, eval_dir=eval_dir, eval_size=eval_size, seed=seed, force=force,
                          max_drop=max_drop, min_agreement=min_agreement, target_cpu=target_cpu, weight_format=weight_format,
                          runtime=runtime, workers=_guard(Workers, workers, ray_address))
    with _progress() as progress:
        report = _guard(api.quantize, job, progress)
    mp = report["quantization"].get("mixed_precision") or {}
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print_quantize_report(report)
        out_console.print(f"artifacts in {out}/: {', '.join(v['path'] for v in report['artifacts'].values())}, report.json, report.md, report.html")
        if "path" in mp:
            out_console.print(f"mixed precision: average {mp['average_bits']:.3f} bits ({mp['weighting']}); "
                              f"{out}/bits.yaml (reuse with --bits-from), {out}/pareto.png", highlight=False)


def print_prune_report(r: dict) -> None:
    pr = r["pruning"]
    for it in r["iterations"]:
        measured = (f" -> measured {it['measured_speedup']:.2f}x ({it['fp32_ms']:.3f} vs {it['pruned_ms']:.3f} ms; "
                    f"minima {it['speedup_of_minima']:.2f}x)") if "measured_speedup" in it else ""
        out_console.print(f"iteration {it['iteration']}: MACs /{it['macs_factor']:.2f}{measured}"
                          f"{' (meets target)' if it['meets_target'] else ''} [{it['note']}]", highlight=False)
    alloc = pr.get("allocation") or {}
    if "rounds" in alloc:
        out_console.print(f"search: {alloc['search_steps']} steps in {alloc['search_seconds']:.0f} s "
                          f"({len(alloc['rounds'])} round{'s' if len(alloc['rounds']) > 1 else ''})", highlight=False)
    t = Table(title=f"{r['model']['arch']} · {r['method']} · {pr['label']}", show_header=True)
    t.add_column("")
    t.add_column("fp32 (ONNX)", justify="right")
    t.add_column("pruned (ONNX)", justify="right")
    acc = r.get("accuracy")
    if acc:
        t.add_row("top-1 % before recovery", _pct(acc["fp32"]["top1"]), _pct(acc["before_recovery"]["top1"]))
        t.add_row("top-1 % after recovery", "", _pct(acc["after_recovery"]["top1"]))
        t.add_row("top-1 drop after recovery (points)", "", f"{acc['drop_after_recovery']:.2f}")
        t.add_row("top-1 agreement % after recovery", "", _pct(acc["fidelity_after_recovery"]["top1_agreement"]))
    t.add_row("MACs per image", f"{pr['macs_dense'] / 1e6:.1f} M", f"{pr['macs_pruned'] / 1e6:.1f} M")
    t.add_row("parameters", f"{pr['params_dense'] / 1e6:.2f} M", f"{pr['params_pruned'] / 1e6:.2f} M")
    _size_latency_rows(t, r, "pruned", "measured speedup")
    out_console.print(t)
    rec = r["recovery"]
    if rec.get("steps"):
        out_console.print(f"recovery: {rec['steps']} distillation steps in {rec['seconds']:.0f} s "
                          f"on {rec['config']['images']} images, {rec['threads']} threads")
    out_console.print("units kept: " + ", ".join(f"{k.replace('blocks.', '')} {v}/{pr['units_dense'][k]}"
                                                  for k, v in pr["layout"].items()), highlight=False)
    for note in r["notes"]:
        out_console.print(f"[yellow]note:[/] {note}")


@app.command()
def prune(
    out: Path = typer.Option(..., "--out", help="Output folder for artifacts and report.json."),
    method: str = typer.Option("lpvit", "--method", help="lpvit, ofb (importance and width search), or magnitude (the uniform baseline)."),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="Measured fp32 ONNX speedup to reach."),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="Dense/pruned MACs ratio to reach (proxy)."),
    model: Optional[str] = typer.Option(None, "--model", help="timm name or alias."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="State dict or zoo file."),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random weights (speed work only)."),
    calib: Path = typer.Option(..., "--calib", help="Calibration images (scores; recovery images by default)."),
    calib_size: int = typer.Option(1024, "--calib-size"),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Labelled ImageFolder for accuracy."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size"),
    block: str = typer.Option("unit", "--block", help="unit (heads/MLP units, removed) or tile (sparse, no dense speedup)."),
    tile: str = typer.Option("16x16", "--tile", help="Tile shape for --block tile, ROWSxCOLS."),
    min_keep: float = typer.Option(0.05, "--min-keep", help="Per-layer floor: fraction of blocks always kept."),
    recover_steps: int = typer.Option(0, "--recover-steps", help="Distillation steps from the float model (0: none)."),
    recover_dir: Optional[Path] = typer.Option(None, "--recover-dir", help="Images for recovery (default: --calib)."),
    recover_size: int = typer.Option(5000, "--recover-size"),
    recover_minutes: float = typer.Option(10.0, "--recover-minutes", help="Time limit of the recovery."),
    search_steps: int = typer.Option(2000, "--search-steps", help="OFB: search steps (distillation over the recovery images)."),
    search_minutes: float = typer.Option(15.0, "--search-minutes", help="OFB: time limit of the first search round; each continuation toward a measured target gets a fifth of it."),
    pmim: bool = typer.Option(False, "--pmim", help="OFB: masked-image-modelling regulariser during the search."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output folder."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of the table."),
    workers: int = WORKERS_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
):
    """Prune heads / MLP units (LPViT, OFB also the embedding width) to a measured speedup, optionally recover, export and measure."""
    from . import prune_api

    try:
        tile_shape = tuple(int(v) for v in tile.lower().split("x"))
    except ValueError:
        tile_shape = ()
    if len(tile_shape) != 2:
        _fail(f"--tile must look like 16x16, got {tile}")
    job = prune_api.PruneJob(out=out, model=model, checkpoint=checkpoint, pretrained=not no_pretrained, method=method,
                             target_speedup=target_speedup, target_flops=target_flops, block=block, tile=tile_shape,
                             min_keep=min_keep, calib_dir=calib, calib_size=calib_size, eval_dir=eval_dir,
                             eval_size=eval_size, recover_steps=recover_steps, recover_dir=recover_dir,
                             recover_size=recover_size, recover_minutes=recover_minutes, search_steps=search_steps,
                             search_minutes=search_minutes, pmim=pmim, seed=seed, force=force,
                             workers=_guard(Workers, workers, ray_address))
    with _progress() as progress:
        report = _guard(prune_api.prune, job, progress)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print_prune_report(report)
        out_console.print(f"artifacts in {out}/: {', '.join(v['path'] for v in report['artifacts'].values())}, report.json, report.md, report.html")


@app.command()
def export(
    out: Path = typer.Option(..., "--out"),
    model: Optional[str] = typer.Option(None, "--model"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint"),
    no_pretrained: bool = typer.Option(False, "--no-pretrained"),
    force: bool = typer.Option(False, "--force"),
    simplify: bool = typer.Option(False, "--simplify", help="Run onnxsim on a float export (can make it slower in onnxruntime)."),
    weight_format: str = typer.Option("int8", "--weight-format", help="Quantized checkpoints: int8 codes, or int4 (Linear weights of <= 4 bits packed as MatMulNBits, computed in float)."),
):
    """Export a float model or a quantized checkpoint (QDQ) to ONNX with metadata."""
    info = _guard(api.export, out, model, checkpoint, not no_pretrained, force, simplify, weight_format)
    out_console.print(f"wrote {info['artifact']} ({_mb(info['bytes'])})")
    _print_session_config(info)


@app.command()
def check(
    artifact: Path = typer.Argument(..., help="Exported ONNX file to gate."),
    eval_dir: Path = typer.Option(..., "--eval", help="Labelled ImageFolder."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Largest allowed top-1 drop against the baseline, in points."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Smallest top-1 agreement with the baseline, %."),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="Smallest baseline/artifact latency ratio (timed here, 1 thread, batch 1)."),
    min_coverage: Optional[float] = typer.Option(None, "--min-coverage", help="Smallest share of MACs in integer kernels on --runtime, %."),
    max_size_ratio: Optional[float] = typer.Option(None, "--max-size-ratio", help="Largest artifact/baseline file size ratio."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Float ONNX baseline."),
    model: Optional[str] = typer.Option(None, "--model"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint"),
    eval_size: Optional[int] = typer.Option(None, "--eval-size"),
    seed: int = typer.Option(0, "--seed"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here: one testcase per threshold."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write a Markdown summary here (for a CI job summary)."),
    report_dir: Optional[Path] = typer.Option(None, "--report", help="Write report.md and report.html (with plots) into this folder."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json/--junit/--summary/--report files."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime or openvino (pip install 'vitcompress[openvino]')."),
    workers: int = WORKERS_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
):
    """CI gate: exit 0 when every budget holds, 1 when one does not, 2 on bad input."""
    from .gate import Gate
    from .reports import check_summary, document, junit_xml, write_report_files

    gate = _guard(Gate(max_drop, min_agreement, min_speedup, min_coverage, max_size_ratio).validate)
    outputs = [p for p in (json_file, junit, summary) if p is not None]
    outputs += [report_dir / name for name in ("report.md", "report.html")] if report_dir is not None else []
    _guard(refuse_overwrite, outputs, force)
    with _progress() as progress:
        r = _guard(api.check, artifact, eval_dir, gate, baseline, model, checkpoint, True, eval_size, seed, progress, runtime,
                   _guard(Workers, workers, ray_address))
    if r["cpu_compatibility"]["note"]:
        console.print(f"[yellow]warning:[/] {escape(r['cpu_compatibility']['note'])}", highlight=False, soft_wrap=True)
    if json_file is not None:
        _guard(api.write_json, json_file, r)
    if junit is not None:
        _guard(write_text, junit, junit_xml(r))
    if summary is not None:
        _guard(write_text, summary, check_summary(r))
    if report_dir is not None:
        _guard(write_report_files, report_dir, document(r))
    verdict = "[bold green]PASS[/]" if r["passed"] else "[bold red]FAIL[/]"
    out_console.print(
        f"{verdict} {artifact.name}: top-1 {r['artifact_accuracy']['top1']:.2f}% vs baseline "
        f"{r['baseline_accuracy']['top1']:.2f}% (drop {r['drop']:.2f}), agreement {r['top1_agreement']:.2f}%, KL {r['kl']:.4f}, "
        f"{r['images']} images ({r['runtime']['name']} {r['runtime']['version']}, {r['cpu_compatibility']['cpu']['isa']})", highlight=False)
    for o in r["gate"].values():
        mark = "[green]pass[/]" if o["passed"] else "[bold red]FAIL[/]"
        out_console.print(f"  {mark} {o['message']}", highlight=False)
    raise typer.Exit(0 if r["passed"] else EXIT_FAIL)


def _step_summary(kind: str, report: dict) -> str:
    """One line of what a step measured."""
    if kind == "check":
        verdict = "PASS" if report["passed"] else "FAIL"
        budgets = "; ".join(o["message"] for o in report["gate"].values())
        return f"{verdict}: {budgets}; {report['images']} images, {report['runtime']['name']}"
    speed = (report.get("latency") or {}).get("speedup")
    label = report.get("bits", {}).get("label") or report.get("pruning", {}).get("label", "")
    acc = report.get("accuracy") or {}
    drop = acc.get("drop", acc.get("drop_after_recovery"))
    return f"{label}" + (f", {speed:.2f}x vs fp32" if speed else "") + (f", top-1 drop {drop:.2f}" if drop is not None else "")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe file (schema vitcompress-recipe/1)."),
    out: Path = typer.Option(..., "--out", help="Run folder: one sub-folder per step, manifest.json."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field: quantize.wbits=6, 2.max_drop=0.5, data.eval_size=500, seed=1 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Redo every step, and overwrite a folder that holds something else."),
    json_out: bool = typer.Option(False, "--json", help="Print manifest.json to stdout."),
    workers: int = WORKERS_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML of every check step here (one testcase per threshold)."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write the run's Markdown summary here (for a CI job summary)."),
):
    """Run a recipe (prune -> quantize -> check ...); finished steps whose inputs did not change are reused."""
    from .pipeline import load_recipe, run_recipe
    from .reports import junit_xml, run_document, to_markdown

    parsed = _guard(load_recipe, recipe, set_)
    _guard(refuse_overwrite, [p for p in (junit, summary) if p is not None], force)

    def on_step(result) -> None:
        out_console.print(f"{result.index:>2}. {result.kind:<9} {result.status:<6} {_step_summary(result.kind, result.report)} "
                          f"[{result.folder.name}/]", highlight=False)

    reports = {}

    def keep(result) -> None:
        reports[result.folder.name] = result.report
        on_step(result)

    with _progress() as progress:
        manifest = _guard(run_recipe, parsed, out, force, progress, keep, _guard(Workers, workers, ray_address))
    if junit is not None:
        _guard(write_text, junit, junit_xml(*[reports[s["folder"]] for s in manifest["steps"] if s["kind"] == "check"]))
    if summary is not None:
        _guard(write_text, summary, to_markdown(run_document(manifest, reports), figures_note=None))
    if json_out:
        print(json.dumps(manifest, indent=2))
    final = manifest["final_artifact"]
    out_console.print(f"{'passed' if manifest['passed'] else 'FAILED'}: {out}/manifest.json"
                      + (f"; final artifact {out}/{final}" if final else ""), highlight=False)
    raise typer.Exit(0 if manifest["passed"] else EXIT_FAIL)


@app.command()
def compare(
    a: Path = typer.Argument(..., help="A, the reference: report.json, a run or output folder, or an ONNX artifact."),
    b: Path = typer.Argument(..., help="B, the candidate: the same kind as A."),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Labelled ImageFolder (needed to compare two ONNX artifacts)."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size"),
    seed: int = typer.Option(0, "--seed"),
    max_drop: float = typer.Option(0.5, "--max-drop", help="Top-1 points B may lose against A."),
    max_slowdown: float = typer.Option(0.10, "--max-slowdown", help="Fraction B may be slower than A (0.1: 10%)."),
    max_coverage_loss: float = typer.Option(5.0, "--max-coverage-loss", help="Points of int8 coverage B may lose."),
    max_size_growth: float = typer.Option(0.05, "--max-size-growth", help="Fraction B may be larger than A."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="Runtime for two ONNX artifacts."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the comparison as JSON here."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write a Markdown summary here."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json/--summary files."),
):
    """What changed from A to B; exit 1 when B regresses beyond the tolerances (a pull request against main)."""
    from .compare import Tolerances, compare_artifacts, compare_reports
    from .reports import document, to_markdown

    tol = _guard(Tolerances(max_drop, max_slowdown, max_coverage_loss, max_size_growth).validate)
    _guard(refuse_overwrite, [p for p in (json_file, summary) if p is not None], force)
    artifacts = [p.suffix == ".onnx" for p in (a, b)]
    if any(artifacts) and not all(artifacts):
        _fail("compare two ONNX artifacts, or two reports/folders, not one of each")
    if all(artifacts):
        if eval_dir is None:
            _fail("comparing two ONNX artifacts measures them: give --eval DIR (labelled images)")
        with _progress() as progress:
            r = _guard(compare_artifacts, a, b, eval_dir, tol, eval_size, seed, runtime, progress)
    else:
        r = _guard(compare_reports, a, b, tol)
    t = Table(title=f"A = {a}, B = {b}")
    for col in ("metric", "A", "B", "change", "allowed worse by", "status"):
        t.add_column(col)
    for row in r["rows"]:
        style = {"regressed": "bold red", "improved": "green"}.get(row["status"], "")
        t.add_row(f"{row['label']} ({row['unit']})", _num(row["a"]), _num(row["b"]), _num(row["change"]), _num(row["allowed"]),
                  f"[{style}]{row['status']}[/]" if style else row["status"])
    out_console.print(t)
    for note in r["notes"]:
        out_console.print(f"note: {note}", highlight=False)
    if json_file is not None:
        _guard(api.write_json, json_file, r)
    if summary is not None:
        _guard(write_text, summary, to_markdown(document(r, title="vitcompress compare"), figures_note=None))
    out_console.print("[bold green]PASS[/]" if r["passed"] else f"[bold red]FAIL[/]: B regresses on {', '.join(r['regressed'])}", highlight=False)
    raise typer.Exit(0 if r["passed"] else EXIT_FAIL)


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


@app.command()
def report(
    folder: Path = typer.Argument(..., help="An output folder of quantize/prune (report.json) or of run (manifest.json)."),
):
    """Write report.md and a self-contained report.html (plots embedded) into FOLDER from its report.json or manifest.json."""
    from .reports import load_document, write_report_files

    files = _guard(write_report_files, folder, _guard(load_document, folder))
    out_console.print(f"wrote {files['markdown']} and {files['html']}", highlight=False)


@app.command()
def models():
    """List model aliases and the timm architectures they stand for."""
    from .models import FAMILIES, list_models
    from .support import UNSUPPORTED

    t = Table(title="aliases")
    t.add_column("alias")
    t.add_column("timm name")
    for alias, arch in list_models():
        t.add_row(alias, arch)
    out_console.print(t)
    out_console.print("families: " + ", ".join(sorted(set(FAMILIES.values()))) + "; any timm name is accepted.")
    for row in UNSUPPORTED:
        out_console.print(f"not supported: {row.method} on {', '.join(row.families)} ({row.reason})", highlight=False)
    out_console.print("measured support of every family by every method: benchmarks/CONFORMANCE.md", highlight=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out"),
    force: bool = typer.Option(True, "--force/--no-force", help="Overwrite the demo folder (default yes)."),
):
    """Quantize the bundled reference model (W8A8 minmax, placement chosen by measurement) on the bundled images, offline."""
    for p in (api.DEMO_CHECKPOINT, api.DEMO_CALIB, api.DEMO_EVAL):
        if not p.exists():
            _fail(f"bundled demo file missing: {p} (run from a source checkout)")
    out_console.print(f"demo: {api.DEMO_CHECKPOINT.name}, calibration {api.DEMO_CALIB}, evaluation {api.DEMO_EVAL}")
    quantize(**{**_command_defaults(quantize), "out": out, "checkpoint": api.DEMO_CHECKPOINT, "calib": api.DEMO_CALIB,
                "eval_dir": api.DEMO_EVAL, "force": force})


def _command_defaults(command) -> dict:
    """A command's flags at their defaults, as a user who gives none gets them (new flags included)."""
    import inspect

    return {name: (p.default.default if isinstance(p.default, typer.models.ParameterInfo) else p.default)
            for name, p in inspect.signature(command).parameters.items()}


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # last resort: never show a traceback to the user
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e}", highlight=False)
        sys.exit(3)


if __name__ == "__main__":
    main()
