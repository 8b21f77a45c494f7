"""examples/ci/github-actions.yml works: its shell steps, run here in order as the runner would
(bash -e, from the checkout, $OUT and $GITHUB_STEP_SUMMARY set). The `uses:` steps are GitHub's own
actions, and the Install step is what `make test` has already done."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "ci" / "github-actions.yml"


def test_the_ci_example_compresses_gates_and_writes_junit_and_a_summary(tmp_path):
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    (job,) = jobs.values()
    steps = [s for s in job["steps"] if "run" in s and s.get("name") != "Install"]
    assert [s["name"] for s in steps] == ["Compress", "Gate", "Job summary"]
    summary = tmp_path / "step-summary.md"
    env = {**os.environ, "OUT": str(tmp_path / "ci-out"), "GITHUB_STEP_SUMMARY": str(summary),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for step in steps:
        done = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{step['name']}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
    out = tmp_path / "ci-out"
    assert (out / "run" / "manifest.json").exists() and (out / "run" / "report.html").exists()
    root = ET.parse(out / "junit.xml").getroot()
    assert root.get("tests") == "4" and root.get("failures") == "0"
    assert "| top-1 drop (--max-drop) |" in summary.read_text() and (out / "gate" / "report.html").exists()
