"""A report as a document: titled sections of paragraphs, tables and figures, built from a
report.json (quantize, prune, check) or a run's manifest.json. One builder per command, in a
registry; the Markdown and HTML writers render the same document."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from . import plots


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str
    caption: str
    png: bytes


Block = Union[str, Table, Figure]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    sections: list[Section]
    timing_fields: list[str] = field(default_factory=list)


def _f(v, digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and abs(v) >= 1e4:
        return f"{v:,.0f}{unit}"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}{unit}" if isinstance(v, float) else f"{v}{unit}"
    return str(v)


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MiB"


def _latency_figure(latency: dict, names: dict[str, str], title: str) -> Figure:
    med = {label: latency[k]["median_ms"] for k, label in names.items() if k in latency}
    err = {label: (latency[k]["min_ms"], latency[k]["max_ms"]) for k, label in names.items() if k in latency}
    return Figure("latency", "median latency (ms), whiskers min and max; lower is faster", plots.bars(med, "ms per image", title, err, "{:.3f}"))


def _latency_rows(latency: dict, names: dict[str, str]) -> list[list[str]]:
    return [[label, _f(latency[k]["median_ms"], 3), _f(latency[k]["min_ms"], 3), _f(latency[k]["max_ms"], 3),
             str(latency[k]["rounds"]), str(latency[k]["threads"]), f"{latency[k]['runtime']['name']} {latency[k]['runtime']['version']}"]
            for k, label in names.items() if k in latency]


_LATENCY_HEADER = ["model", "median ms", "min ms", "max ms", "rounds", "threads", "runtime"]


def _environment(report: dict) -> Section:
    rows = [["report", report.get("command", "?")], ["created", _f(report.get("created"))]]
    model = report.get("model") or {}
    if model:
        rows += [["model", f"{model.get('arch')} ({model.get('family')}, {model.get('weights')}, input {model.get('input_size')})"]]
    cpu = (report.get("cpu_compatibility") or {}).get("cpu") or {}
    if cpu:
        rows += [["measured on", f"{cpu.get('model')} ({cpu.get('isa')})"]]
    built = (report.get("target_cpu") or report.get("built_for") or {})
    if built:
        on = built.get("built_on") or {}
        rows += [["built for", f"{built.get('resolved', built.get('target'))} (built on {on.get('model')}, {on.get('isa')})"]]
    env = report.get("environment") or {}
    if env:
        rows += [["versions", ", ".join(f"{k} {v}" for k, v in env.items())]]
    blocks: list[Block] = [Table(["", "value"], rows)]
    note = (report.get("cpu_compatibility") or {}).get("note")
    if note:
        blocks.append(f"Warning: {note}")
    return Section("Where it ran", blocks)


def _quantize(report: dict) -> list[Section]:
    acc, lat, arts = report.get("accuracy") or {}, report.get("latency") or {}, report.get("artifacts") or {}
    cov = report.get("coverage") or {}
    fp32_b, q_b = (arts.get("fp32") or {}).get("bytes"), (arts.get("quantized") or {}).get("bytes")
    rows = [["method", report.get("method")], ["bits", (report.get("bits") or {}).get("label")],
            ["placement", (report.get("config") or {}).get("placement")],
            ["top-1 float / quantized", f"{_f((acc.get('fp32') or {}).get('top1'))} / {_f((acc.get('quantized') or {}).get('top1'))} %"
             if acc.get("fp32") else "not measured (no --eval)"],
            ["top-1 drop", _f(acc.get("drop"), unit=" pp")], ["top-1 agreement with float", _f(acc.get("top1_agreement"), unit=" %")],
            ["speedup vs float", _f(lat.get("speedup"), unit="x")],
            ["int8 coverage", _f(100 * cov["integer_mac_share"], 1, " % of MACs") if "integer_mac_share" in cov else "–"],
            ["size float / quantized", f"{_mib(fp32_b)} / {_mib(q_b)}"]]
    summary = Section("Result", [Table(["", "value"], rows)])
    if acc.get("fp32"):
        summary.blocks.append(Figure("accuracy", f"top-1 on {acc.get('images')} images of {acc.get('eval_dir')} ({acc.get('measured_on')})",
                                     plots.bars({"float": acc["fp32"]["top1"], "quantized": acc["quantized"]["top1"]}, "top-1 %", "accuracy")))
    sections = [summary]
    if lat:
        names = {"fp32": "float", "quantized": "quantized"}
        sections.append(Section("Latency", [Table(_LATENCY_HEADER, _latency_rows(lat, names)), _latency_figure(lat, names, "latency, batch 1")]))
    auto = report.get("placement_auto")
    if auto:
        rows = [[c.get("placement"), _f(c.get("speedup"), unit="x"), _f(c.get("within_budget")), _f(c.get("measured"))]
                for c in auto.get("candidates", [])]
        sections.append(Section("Placement", [f"Chosen: {auto.get('chosen')}. {auto.get('why', '')}", f"Judged on: {auto.get('judged_on')}.",
                                              Table(["placement", "speedup", "within budget", "measured"], rows)]))
    sections += _method_sections(report.get("quantization") or {}, report)
    islands = cov.get("float_islands") or []
    if cov:
        blocks: list[Block] = [f"{_f(100 * cov.get('integer_mac_share', 0), 1)} % of {cov.get('total_macs')} MACs run in integer kernels "
                               f"on {cov.get('runtime', {}).get('name')}."]
        if islands:
            blocks.append(Table(["float island", "op", "MACs"], [[i.get("layer") or i.get("node"), i.get("op"), str(i.get("macs"))] for i in islands[:40]]))
        sections.append(Section("Integer coverage", blocks))
    if report.get("notes"):
        sections.append(Section("Notes", list(report["notes"])))
    return sections


def _method_sections(quant: dict, report: dict) -> list[Section]:
    out = []
    mp = quant.get("mixed_precision")
    if mp:
        blocks: list[Block] = [
            f"Average {mp['average_bits']:.3f} bits ({mp.get('weighting')}); target {_f(mp.get('target_bits'))}, choices {mp.get('bit_choices')}.",
            Figure("bits", "bits chosen per layer (bars) and the layer's MACs (line)", plots.layer_bits(mp["assignment"], mp.get("macs"), "bits per layer"))]
        if mp.get("isolated_sensitivity"):
            blocks.append(Figure("sensitivity", "per-layer sensitivity: each layer alone at each width (red box: the width chosen)",
                                 plots.sensitivity_map(mp["isolated_sensitivity"], mp["assignment"], "isolated sensitivity per layer")))
        if mp.get("path"):  # a greedy search ran (not a --bits-from assignment)
            blocks.append(Figure("pareto", f"the greedy walk ({mp.get('sensitivity')}): measured KL against average bits, and top-1 agreement",
                                 plots.pareto(mp["path"], mp.get("target_bits") or 0, f"{report.get('model', {}).get('arch')} greedy mixed precision")))
        out.append(Section("Mixed precision (MPTQ)", blocks))
    qh = quant.get("qhyvit")
    if qh:
        qh_blocks: list[Block] = []
        rounds = {k.replace("_per_round", "").replace("_", " "): v for k, v in qh.items() if k.endswith("_per_round") and v}
        if rounds:
            qh_blocks.append(Figure("qhyvit-rounds", "Q-HyViT search, per round (ringed: the round kept)",
                                 plots.series(rounds, "round / step", "value", "Q-HyViT search", log=True, mark=qh.get("best_round"))))
        steps = qh.get("post_search_steps") or {}
        if steps:
            qh_blocks.append(Table(["post-search step", "kept", "KL before", "KL after", "judged on"],
                                [[k, _f(v.get("kept")), _f(v.get("kl_before"), 5), _f(v.get("kl_after"), 5), _f(v.get("judged_on"))] for k, v in steps.items()]))
        choices = qh.get("choices") or {}
        if choices:
            qh_blocks.append(Table(["layer", "weights", "activations"], [[k, v.get("weights", ""), v.get("activations", "")] for k, v in choices.items()]))
        out.append(Section("Q-HyViT choices", qh_blocks))
    return out


def _prune(report: dict) -> list[Section]:
    acc, lat, pr = report.get("accuracy") or {}, report.get("latency") or {}, report.get("pruning") or {}
    rows = [["method", report.get("method")], ["structure", pr.get("label")],
            ["MACs dense / pruned", f"{pr.get('macs_dense')} / {pr.get('macs_pruned')} ({_f(pr.get('macs_reduction'))}x fewer)"],
            ["top-1 drop after recovery", _f(acc.get("drop_after_recovery"), unit=" pp")],
            ["speedup vs float", _f(lat.get("speedup"), unit="x")]]
    sections = [Section("Result", [Table(["", "value"], rows)])]
    if acc.get("fp32"):
        values = {"float": acc["fp32"]["top1"]}
        values.update({k.replace("_", " "): acc[k]["top1"] for k in ("before_recovery", "after_recovery") if acc.get(k)})
        sections[0].blocks.append(Figure("accuracy", f"top-1 on {acc.get('images')} images ({acc.get('measured_on')})", plots.bars(values, "top-1 %", "accuracy")))
    if lat:
        names = {"fp32": "float", "pruned": "pruned"}
        sections.append(Section("Latency", [Table(_LATENCY_HEADER, _latency_rows(lat, names)), _latency_figure(lat, names, "latency, batch 1")]))
    its = report.get("iterations") or []
    if its:
        target = (report.get("target") or {}).get("speedup")
        blocks: list[Block] = [Table(["iteration", "MACs reduction", "float ms", "pruned ms", "speedup", "meets target", "note"],
                                     [[str(i["iteration"]), _f(i.get("macs_factor")), _f(i.get("fp32_ms"), 3), _f(i.get("pruned_ms"), 3),
                                       _f(i.get("measured_speedup")), _f(i.get("meets_target")), i.get("note", "")] for i in its])]
        if all("measured_speedup" in i for i in its):
            blocks.append(Figure("speed-search", "each MACs reduction tried and the speedup measured for it (green: meets the target)",
                                 plots.speed_search(its, target, "measured-speed search")))
        sections.append(Section("Measured-speed search" if target else "Search rounds", blocks))
    rounds = (pr.get("allocation") or {}).get("rounds")
    if rounds:
        alloc = pr["allocation"]
        sections.append(Section("OFB search", [
            f"{alloc['search_steps']} steps in {alloc['search_seconds']:.0f} s over {len(rounds)} round(s); "
            f"chosen widths: " + ", ".join(f"{k} {v}" for k, v in alloc["widths"].items()),
            Figure("ofb-search", "distillation loss, expected MACs reduction and mean entropy of the width distributions per step",
                   plots.search_trace([t for r in rounds for t in r["trace"]], "OFB search"))]))
    if pr.get("layout") and pr.get("units_dense"):
        sections.append(Section("Kept structure", [Figure("kept-units", "units kept per group", plots.kept_units(pr["layout"], pr["units_dense"], "kept units"))]))
    return sections


def _check(report: dict) -> list[Section]:
    gate = report.get("gate") or {}
    verdict = "PASS" if report.get("passed") else "FAIL"
    blocks: list[Block] = [f"**{verdict}**: {report.get('artifact')} against {report.get('baseline')} on {report.get('images')} images "
                           f"({report.get('runtime', {}).get('name')} {report.get('runtime', {}).get('version')})."]
    blocks.append(Table(["threshold", "measured", "budget", "result"],
                        [[o["label"] + f" ({o['option']})", f"{_f(o['value'])} {o['unit']}", f"{_f(o['budget'])} {o['unit']}",
                          "pass" if o["passed"] else "FAIL"] for o in gate.values()]))
    acc_a, acc_b = report.get("artifact_accuracy") or {}, report.get("baseline_accuracy") or {}
    if acc_a.get("top1") is not None:
        blocks.append(Figure("accuracy", f"top-1 on {report.get('images')} images of {report.get('eval_dir')}",
                             plots.bars({"baseline": acc_b["top1"], "artifact": acc_a["top1"]}, "top-1 %", "accuracy")))
    sections = [Section("Gate", blocks)]
    if report.get("latency"):
        names = {"baseline": "baseline", "artifact": "artifact"}
        sections.append(Section("Latency", [Table(_LATENCY_HEADER, _latency_rows(report["latency"], names)),
                                            _latency_figure(report["latency"], names, "latency, batch 1")]))
    return sections


def _compare(result: dict) -> list[Section]:
    verdict = "PASS" if result.get("passed") else "FAIL"
    blocks: list[Block] = [f"**{verdict}**: B = {result.get('b')} against A = {result.get('a')} ({result.get('mode')} compared)."]
    blocks.append(Table(["metric", "A", "B", "change", "allowed worse by", "status"],
                        [[f"{r['label']} ({r['unit']})", _f(r["a"]), _f(r["b"]), _f(r["change"]), _f(r["allowed"]),
                          r["status"] + (f": {r['why']}" if r.get("why") else "")] for r in result.get("rows", [])]))
    blocks += list(result.get("notes") or [])
    return [Section("Comparison", blocks)]


BUILDERS: dict[str, Callable[[dict], list[Section]]] = {"quantize": _quantize, "prune": _prune, "check": _check, "compare": _compare}


def document(report: dict, title: str | None = None) -> Document:
    """The document of one report.json (any command with a builder)."""
    kind = report.get("command")
    build = BUILDERS.get(kind)
    if build is None:
        from ..errors import VitcompressError

        raise VitcompressError(f"no report layout for a '{kind}' report (choose from {', '.join(BUILDERS)})")
    arch = (report.get("model") or {}).get("arch")
    head = title or f"vitcompress {kind}" + (f": {arch}" if arch else "")
    return Document(head, [*build(report), _environment(report)], list(report.get("timing_fields") or []))


def run_document(manifest: dict, step_reports: dict[str, dict]) -> Document:
    """The document of a recipe run: the steps' table, then each step's sections under its folder's name."""
    steps = manifest.get("steps") or []
    overview = Section("Run", [
        f"Recipe {manifest.get('recipe', {}).get('path')} (sha256 {str(manifest.get('recipe', {}).get('sha256'))[:12]}), seed {manifest.get('seed')}; "
        f"command `{' '.join(manifest.get('command') or [])}`.",
        Table(["step", "kind", "status", "folder"], [[str(s["index"]), s["kind"], s.get("status", ""), s["folder"]] for s in steps])])
    sections = [overview]
    timing: list[str] = []
    for s in steps:
        report = step_reports.get(s["folder"])
        if report is None:
            continue
        doc = document(report)
        for sec in doc.sections:
            sections.append(Section(f"{s['folder']}: {sec.title}", sec.blocks))
        timing += [f"{s['folder']}/report.json: {t}" for t in doc.timing_fields]
    return Document(f"vitcompress run: {Path(str(manifest.get('recipe', {}).get('path'))).name}", sections, timing)
