"""The gate's outcomes as JUnit XML: one testcase per threshold, the failing ones naming the value and the budget."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def junit_xml(*reports: dict) -> str:
    """JUnit XML of check reports, one testsuite each (a run's check steps): CI systems show each
    threshold as a test."""
    suites = ET.Element("testsuites", name="vitcompress check", errors="0")
    total = failed = 0
    for report in reports:
        total_here, failed_here = _suite(suites, report)
        total, failed = total + total_here, failed + failed_here
    suites.set("tests", str(total))
    suites.set("failures", str(failed))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _suite(suites: ET.Element, report: dict) -> tuple[int, int]:
    outcomes = list((report.get("gate") or {}).values())
    failures = sum(not o["passed"] for o in outcomes)
    name = f"vitcompress check {Path(report['artifact']).name}"
    suite = ET.SubElement(suites, "testsuite", name=name, tests=str(len(outcomes)), failures=str(failures), errors="0", skipped="0")
    props = ET.SubElement(suite, "properties")
    runtime = report.get("runtime") or {}
    cpu = (report.get("cpu_compatibility") or {}).get("cpu") or {}
    for key, value in (("artifact", report["artifact"]), ("baseline", report.get("baseline")), ("images", report.get("images")),
                       ("runtime", f"{runtime.get('name')} {runtime.get('version')}"), ("cpu", f"{cpu.get('model')} ({cpu.get('isa')})"),
                       ("numerics_exact_on_this_cpu", (report.get("cpu_compatibility") or {}).get("exact"))):
        ET.SubElement(props, "property", name=key, value=str(value))
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", classname=name, name=f"{o['threshold']}: {o['label']}", time="0")
        if not o["passed"]:
            failure = ET.SubElement(case, "failure", message=o["message"], type="threshold")
            failure.text = f"measured {o['value']:.6g} {o['unit']}, budget {o['budget']:.6g} {o['unit']} ({o['option']})"
        else:
            ET.SubElement(case, "system-out").text = o["message"]
    note = (report.get("cpu_compatibility") or {}).get("note")
    if note:
        ET.SubElement(suite, "system-err").text = f"warning: {note}"
    return len(outcomes), failures
