"""The CI gate as a CI job meets it: budgets, JUnit, Markdown summaries, HTML reports, compare,
and artifacts that are byte-identical from one run to the next."""
import base64
import io
import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
from PIL import Image
from typer.testing import CliRunner

from vitcompress import Gate, QuantConfig, QuantizeJob, VitcompressError, quantize
from vitcompress.cli import app
from vitcompress.compare import Tolerances, judge
from tests.conftest import BUNDLED_CKPT, CALIB, VAL

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def three_bit(tmp_path_factory):
    """A regression: the bundled model at W3A3 (minmax), far below what the gate allows."""
    out = tmp_path_factory.mktemp("w3") / "out"
    quantize(QuantizeJob(out=out, checkpoint=BUNDLED_CKPT, config=QuantConfig(wbits=3, abits=3), calib_dir=CALIB, calib_size=32,
                         latency_rounds=3))
    return out


@pytest.mark.parametrize("budgets, field", [
    ({"max_drop": math.nan}, "--max-drop"), ({"max_drop": -0.5}, "--max-drop"), ({"min_agreement": 100.5}, "--min-agreement"),
    ({"min_speedup": 0.0}, "--min-speedup"), ({"min_coverage": -1.0}, "--min-coverage"), ({"max_size_ratio": math.inf}, "--max-size-ratio"),
    ({}, "budget"),
])
def test_invalid_budgets_are_bad_input(budgets, field):
    with pytest.raises(VitcompressError, match=re.escape(field)):
        Gate(**budgets).validate()


def test_gate_judges_each_budget_in_its_direction():
    gate = Gate(max_drop=1.0, min_agreement=95.0, min_speedup=1.5, max_size_ratio=0.5)
    measured = {"drop": 1.2, "top1_agreement": 96.0, "speedup": 1.5, "size_ratio": 0.25}
    outcomes = {o["threshold"]: o for o in gate.judge(measured)}
    assert [k for k, o in outcomes.items() if not o["passed"]] == ["max_drop"]
    assert outcomes["max_drop"]["message"] == "top-1 drop 1.20 pp > budget 1.00 pp (--max-drop)"
    assert outcomes["min_speedup"]["passed"]  # a budget met exactly passes
    assert set(outcomes) == {"max_drop", "min_agreement", "min_speedup", "max_size_ratio"}  # unset budgets are not judged


def test_a_regression_fails_the_gate_with_a_junit_file_naming_threshold_value_and_budget(three_bit, quantize_run, tmp_path):
    base = quantize_run[0] / "model.fp32.onnx"
    junit, summary = tmp_path / "junit.xml", tmp_path / "summary.md"
    code, text = _run("check", three_bit / "model.w3a3.onnx", "--baseline", base, "--eval", VAL, "--eval-size", 200,
                      "--max-drop", 1.0, "--min-agreement", 50, "--junit", junit, "--summary", summary)
    assert code == 1, text
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2"
    failing = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert len(failing) >= 1 and failing[0].get("name").startswith("max_drop")
    message = failing[0].find("failure").get("message")
    drop = re.search(r"top-1 drop ([\d.]+) pp > budget 1.00 pp", message)
    assert drop and float(drop.group(1)) > 1.0, message
    md = summary.read_text()
    assert "**FAIL**" in md and "| top-1 drop (--max-drop) |" in md and "<" not in md  # plain Markdown, no HTML


def test_a_good_artifact_passes_and_a_tight_speed_budget_fails(quantize_run, tmp_path):
    out = quantize_run[0]
    art, base = out / "model.int8.onnx", out / "model.fp32.onnx"
    args = ["check", art, "--baseline", base, "--eval", VAL, "--eval-size", 100]
    code, text = _run(*args, "--max-drop", 5, "--min-coverage", 10, "--max-size-ratio", 0.6, "--junit", tmp_path / "ok.xml",
                      "--json", tmp_path / "ok.json")
    assert code == 0, text
    root = ET.parse(tmp_path / "ok.xml").getroot()
    assert root.get("failures") == "0" and root.get("tests") == "3"
    report = json.loads((tmp_path / "ok.json").read_text())
    assert report["size"]["ratio"] < 0.6 and report["coverage"]["integer_mac_share"] > 0.1 and "latency" not in report
    code, text = _run(*args, "--max-drop", 5, "--min-speedup", 100, "--junit", tmp_path / "slow.xml", "--json", tmp_path / "slow.json")
    assert code == 1, text
    failing = [c.get("name") for c in ET.parse(tmp_path / "slow.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert failing == ["min_speedup: speedup"]
    slow = json.loads((tmp_path / "slow.json").read_text())
    assert slow["latency"]["speedup"] == slow["gate"]["min_speedup"]["value"] < 100
    assert slow["timing_fields"] == ["created", "latency", "gate.min_speedup"]


@pytest.mark.parametrize("budget", [["--max-drop", "nan"], ["--max-drop", "-1"], ["--min-agreement", "101"], ["--min-speedup", "0"], []])
def test_bad_budgets_exit_2_in_one_line(quantize_run, budget):
    out = quantize_run[0]
    code, text = _run("check", out / "model.int8.onnx", "--baseline", out / "model.fp32.onnx", "--eval", VAL, *budget)
    assert code == 2 and text.count("\n") == 1 and "Traceback" not in text, text


def test_gate_outputs_are_not_overwritten_without_force(quantize_run, tmp_path):
    out = quantize_run[0]
    (tmp_path / "junit.xml").write_text("keep")
    args = ["check", out / "model.int8.onnx", "--baseline", out / "model.fp32.onnx", "--eval", VAL, "--eval-size", 50, "--max-drop", 5,
            "--junit", tmp_path / "junit.xml"]
    code, text = _run(*args)
    assert code == 2 and "--force" in text and (tmp_path / "junit.xml").read_text() == "keep"
    code, text = _run(*args, "--force")
    assert code == 0 and ET.parse(tmp_path / "junit.xml").getroot().tag == "testsuites"


def _embedded_images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_quantize_writes_a_self_contained_html_report_and_markdown(quantize_run):
    out = quantize_run[0]
    html = (out / "report.html").read_text()
    images = _embedded_images(html)
    assert len(images) >= 2  # accuracy and latency
    for png in images:
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            assert im.width > 100 and im.height > 100
    assert not re.search(r'src="(?!data:)', html) and "<script" not in html  # nothing fetched from anywhere
    md = (out / "report.md").read_text()
    assert "| top-1 drop |" in md and "## Latency" in md and "- `latency`" in md


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium here (Debian: apt-get install chromium)")
def test_report_html_shows_its_plots_in_a_headless_browser(quantize_run, tmp_path):
    """The browser decodes every embedded image: a probe script records each image's natural size after load."""
    probe = ("<script>addEventListener('load', () => document.body.setAttribute('data-images', JSON.stringify("
             "[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]))));</script></body>")
    page = tmp_path / "report.html"
    page.write_text((quantize_run[0] / "report.html").read_text().replace("</body>", probe))
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, dom[-2000:]
    states = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(states) >= 2 and all(done and w > 100 and h > 100 for done, w, h in states), states


def test_report_command_renders_a_folder(quantize_run, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(quantize_run[0] / "report.json", folder)
    code, text = _run("report", folder)
    assert code == 0 and (folder / "report.html").exists() and (folder / "report.md").exists(), text
    code, text = _run("report", tmp_path / "nothing-here")
    assert code == 2 and text.count("\n") == 1, text


def test_compare_reports_and_artifacts(quantize_run, three_bit, tmp_path):
    out = quantize_run[0]
    code, text = _run("compare", out, out / "report.json")
    assert code == 0 and "PASS" in text, text
    worse = json.loads((out / "report.json").read_text())
    worse["accuracy"]["quantized"]["top1"] -= 2.0
    worse["cpu_compatibility"]["cpu"] = {"model": "Other CPU", "isa": "avx2", "int32_dot": False}
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    code, text = _run("compare", out / "report.json", tmp_path / "worse.json", "--json", tmp_path / "c.json")
    assert code == 1 and "regresses on top1" in text, text
    rows = {r["metric"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert rows["top1"]["status"] == "regressed" and rows["speedup"]["status"] == "not comparable"
    # two artifacts measured side by side: the 3-bit one loses accuracy against the 8-bit one
    code, text = _run("compare", out / "model.int8.onnx", three_bit / "model.w3a3.onnx", "--eval", VAL, "--eval-size", 200)
    assert code == 1 and "top1" in text.split("regresses on")[1], text
    code, text = _run("compare", out / "model.int8.onnx", out / "report.json")
    assert code == 2, text


def test_compare_judges_by_direction_and_tolerance():
    rows = {r["metric"]: r for r in judge({"top1": 70.0, "latency_ms": 1.0, "size_bytes": 100.0},
                                          {"top1": 69.6, "latency_ms": 1.2, "size_bytes": 90.0}, Tolerances(), {})}
    assert rows["top1"]["status"] == "ok"  # 0.4 points lost, 0.5 allowed
    assert rows["latency_ms"]["status"] == "regressed"  # 20% slower, 10% allowed
    assert rows["size_bytes"]["status"] == "improved"
    with pytest.raises(VitcompressError, match="--max-slowdown"):
        Tolerances(max_slowdown=-0.1).validate()


def _without(report: dict, fields: list[str]) -> dict:
    report = json.loads(json.dumps(report))
    for path in fields:
        node, keys = report, path.split(".")
        for k in keys[:-1]:
            node = node.get(k, {})
        node.pop(keys[-1], None)
    return report


def test_same_inputs_and_seed_give_byte_identical_artifacts(tmp_path):
    reports = []
    for name in ("a", "b"):
        job = QuantizeJob(out=tmp_path / name, checkpoint=BUNDLED_CKPT, config=QuantConfig(placement="speed"), calib_dir=CALIB,
                          calib_size=32, eval_dir=VAL, eval_size=100, latency_rounds=3, seed=3)
        reports.append(quantize(job))
    for f in ("model.fp32.onnx", "model.int8.onnx", "model.int8.pth"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    fields = reports[0]["timing_fields"]
    assert "latency" in fields and fields == reports[1]["timing_fields"]
    assert _without(reports[0], fields) == _without(reports[1], fields)


def test_a_model_baseline_is_exported_for_speed_and_size(quantize_run, tmp_path):
    """With --checkpoint as the baseline, latency and size compare ONNX files on the same runtime."""
    out = quantize_run[0]
    code, text = _run("check", out / "model.int8.onnx", "--checkpoint", BUNDLED_CKPT, "--eval", VAL, "--eval-size", 100,
                      "--min-speedup", 0.01, "--max-size-ratio", 0.6, "--json", tmp_path / "r.json")
    assert code == 0, text
    report = json.loads((tmp_path / "r.json").read_text())
    fp32_bytes = (out / "model.fp32.onnx").stat().st_size
    assert abs(report["size"]["baseline_bytes"] - fp32_bytes) < 0.01 * fp32_bytes  # the same float export
    assert report["latency"]["baseline"]["median_ms"] > 0 and report["gate"]["min_speedup"]["passed"]
