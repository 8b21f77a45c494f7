"""`vitcompress run RECIPE`: steps in folders of their own, re-runs that do no work, a gate that fails."""
import json
import xml.etree.ElementTree as ET

from typer.testing import CliRunner

from vitcompress.cli import app
from tests.conftest import BUNDLED_CKPT, CALIB, VAL

runner = CliRunner()


def _recipe(tmp_path, check: str = "max_drop: 2.0") -> str:
    p = tmp_path / "r.yaml"
    p.write_text(f"""schema: vitcompress-recipe/1
model:
  checkpoint: {BUNDLED_CKPT}
data:
  calib: {CALIB}
  eval: {VAL}
  eval_size: 200
seed: 0
steps:
  - quantize:
      placement: speed
      target_cpu: portable
      calib_size: 32
  - check:
      {check}
""")
    return str(p)


def _run(*args):
    r = runner.invoke(app, ["run", *map(str, args)])
    return r.exit_code, r.output


def test_run_then_rerun_reuses_every_step_with_the_same_hashes(tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    code, text = _run(recipe, "--out", out)
    assert code == 0, text
    first = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in first["steps"]] == ["ran", "ran"] and first["passed"]
    assert first["final_artifact"] == "01-quantize/model.int8.onnx"
    assert "01-quantize/model.int8.onnx" in first["steps"][0]["artifacts"] and first["seed"] == 0
    assert first["versions"]["onnxruntime"] and first["recipe"]["sha256"]
    check = json.loads((out / "02-check" / "report.json").read_text())
    assert check["passed"] and check["baseline"].endswith("01-quantize/model.fp32.onnx")
    assert check["gate"]["max_drop"]["passed"] and (out / "02-check" / "report.html").exists()
    assert "## 01-quantize: Latency" in (out / "report.md").read_text() and (out / "report.html").exists()
    code, text = _run(recipe, "--out", out)
    assert code == 0, text
    second = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in second["steps"]] == ["reused", "reused"]
    assert [s["artifacts"] for s in second["steps"]] == [s["artifacts"] for s in first["steps"]]
    # a changed option redoes its step and those after it
    code, text = _run(recipe, "--out", out, "--set", "check.max_drop=3")
    assert code == 0, text
    third = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in third["steps"]] == ["reused", "ran"]


def test_a_failing_gate_exits_1_and_a_broken_recipe_exits_2(tmp_path):
    out = tmp_path / "out"
    code, text = _run(_recipe(tmp_path, "max_drop: 0\n      min_agreement: 100"), "--out", out, "--junit", tmp_path / "j.xml",
                      "--summary", tmp_path / "s.md")
    assert code == 1 and "FAIL" in text, text
    assert json.loads((out / "manifest.json").read_text())["passed"] is False
    failing = [c.get("name") for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert failing and set(failing) <= {"max_drop: top-1 drop", "min_agreement: top-1 agreement"}
    assert "## 02-check: Gate" in (tmp_path / "s.md").read_text()
    code, text = _run(_recipe(tmp_path, "max_dorp: 1"), "--out", tmp_path / "o2")
    assert code == 2 and text.count("\n") == 1 and "steps[2].check.max_dorp: unknown field" in text, text
    assert "Traceback" not in text
    # a folder holding something else is never overwritten without --force
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, text = _run(_recipe(tmp_path), "--out", other)
    assert code == 2 and "--force" in text and (other / "keep.txt").read_text() == "mine"
