"""The command line as a user meets it: real runs, exit codes, one-line errors."""
import json
import shutil

import onnx
import pytest
from typer.testing import CliRunner

from vitcompress.api import AUTO_CANDIDATES
from vitcompress.cli import app
from vitcompress.quant.placement import CANDIDATES
from tests.conftest import BUNDLED_CKPT, CALIB, VAL

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_quantize_writes_artifacts_and_a_measured_report(quantize_run):
    out, report = quantize_run
    for name in ("model.fp32.onnx", "model.int8.onnx", "model.int8.pth", "report.json"):
        assert (out / name).is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["schema"] == "vitcompress-report/1"
    acc = saved["accuracy"]
    assert acc["images"] == 300
    assert abs(acc["drop"]) <= 1.5 and acc["top1_agreement"] >= 95
    assert acc["export_vs_torch_agreement"] >= 99
    assert saved["artifacts"]["quantized"]["bytes"] < saved["artifacts"]["fp32"]["bytes"] / 2
    assert saved["latency"]["fp32"]["median_ms"] > 0 and saved["latency"]["quantized"]["median_ms"] > 0
    assert saved["coverage"]["integer_mac_share"] > 0.5


def test_check_gate_passes_and_fails(quantize_run, tmp_path):
    out, _ = quantize_run
    art, base = out / "model.int8.onnx", out / "model.fp32.onnx"
    code, text = _run("check", art, "--baseline", base, "--eval", VAL, "--eval-size", 200, "--max-drop", 5.0,
                      "--json", tmp_path / "r.json")
    assert code == 0, text
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    # a damaged artifact must fail the gate: break the float model's classifier bias
    m = onnx.load(str(base))
    for init in m.graph.initializer:
        if init.name == "head.bias":
            from onnx import numpy_helper

            b = numpy_helper.to_array(init).copy()
            b[0] += 100.0  # every image becomes "airplane"
            init.CopyFrom(numpy_helper.from_array(b, init.name))
    onnx.save(m, str(tmp_path / "broken.onnx"))
    code, text = _run("check", tmp_path / "broken.onnx", "--baseline", base, "--eval", VAL, "--eval-size", 200, "--max-drop", 1.0)
    assert code == 1, text
    assert "FAIL" in text


def test_check_against_torch_model_baseline(quantize_run):
    out, _ = quantize_run
    code, text = _run("check", out / "model.int8.onnx", "--checkpoint", BUNDLED_CKPT, "--eval", VAL, "--eval-size", 100,
                      "--max-drop", 5)
    assert code == 0, text


def test_quantized_checkpoint_reloads_and_exports(quantize_run, tmp_path):
    out, _ = quantize_run
    code, text = _run("export", "--checkpoint", out / "model.int8.pth", "--out", tmp_path / "e")
    assert code == 0, text
    exported = onnx.load(str(tmp_path / "e" / "model.quantized.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in exported.graph.node)


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_vit"], "unknown model"),
    (["--checkpoint", "/nonexistent.pth"], "not found"),
    (["--checkpoint", BUNDLED_CKPT, "--bits", "9"], "between 2 and 8"),
    (["--checkpoint", BUNDLED_CKPT, "--method", "magic"], "unknown method"),
    (["--checkpoint", BUNDLED_CKPT, "--recipe", BUNDLED_CKPT.parent.parent / "recipes" / "w6a6_percentile.yaml", "--bits", "4"], "drop --bits"),
    (["--checkpoint", BUNDLED_CKPT, "--placement", "fastest"], "unknown placement"),
    (["--checkpoint", BUNDLED_CKPT, "--weight-format", "int3"], "unknown weight format"),
    (["--checkpoint", BUNDLED_CKPT, "--weight-format", "int4"], "at most 4 bits"),  # the default --wbits is 8
    (["--checkpoint", BUNDLED_CKPT, "--reconstruct-steps", "100"], "needs a method with block reconstruction"),
    (["--checkpoint", BUNDLED_CKPT, "--method", "qhyvit", "--reconstruct-steps", "-5"], "reconstruction_steps must be"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    code, text = _run("quantize", *args, "--calib", CALIB, "--calib-size", 8, "--out", tmp_path / "o")
    assert code == 2, text
    assert message in text
    assert "Traceback" not in text


def test_empty_and_corrupt_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = _run("quantize", "--checkpoint", BUNDLED_CKPT, "--calib", empty, "--out", tmp_path / "o")
    assert code == 2 and "no images" in text
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"nope")
    code, text = _run("quantize", "--checkpoint", BUNDLED_CKPT, "--calib", junk, "--out", tmp_path / "o2")
    assert code == 2 and "could be read" in text
    assert not (tmp_path / "o2" / "model.int8.onnx").exists()


def test_existing_output_needs_force(quantize_run, tmp_path):
    out, _ = quantize_run
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    before = (target / "report.json").read_bytes()
    code, text = _run("quantize", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 8, "--out", target)
    assert code == 2 and "--force" in text
    assert (target / "report.json").read_bytes() == before


def test_check_rejects_foreign_onnx(tmp_path):
    from onnx import helper, TensorProto

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(tmp_path / "foreign.onnx"))
    code, text = _run("check", tmp_path / "foreign.onnx", "--baseline", tmp_path / "foreign.onnx", "--eval", VAL, "--max-drop", 1)
    assert code == 2 and "metadata" in text


def test_models_lists_aliases():
    code, text = _run("models")
    assert code == 0 and "mobilevitv2_100" in text


def test_same_seed_same_artifact(tmp_path):
    args = ["quantize", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 32]
    for d in ("a", "b"):
        code, text = _run(*args, "--out", tmp_path / d)
        assert code == 0, text
    assert (tmp_path / "a" / "model.int8.onnx").read_bytes() == (tmp_path / "b" / "model.int8.onnx").read_bytes()


def test_hybrid_quantized_checkpoint_roundtrip(tmp_path):
    """A conv+BatchNorm model: quantize (BN folded), reload the checkpoint, re-export, same outputs."""
    import timm
    import torch

    from vitcompress.models import ZOO_FORMAT

    m = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10)
    torch.save({"format": ZOO_FORMAT, "arch": "mobilevit_xxs", "kwargs": {}, "num_classes": 10,
                "classes": sorted(p.name for p in VAL.iterdir()), "input_size": [3, 64, 64],
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "state_dict": m.state_dict()}, tmp_path / "z.pth")
    code, text = _run("quantize", "--checkpoint", tmp_path / "z.pth", "--calib", CALIB, "--calib-size", 16,
                      "--placement", "partial", "--out", tmp_path / "q")
    assert code == 0, text
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["quantization"]["folded_batchnorms"] > 0
    # convs with quantized inputs but float outputs run float in onnxruntime: the label says so
    assert report["coverage"]["simulated_layers"] and "simulated" in report["bits"]["label"]
    code, text = _run("quantize", "--checkpoint", tmp_path / "z.pth", "--calib", CALIB, "--calib-size", 16,
                      "--placement", "speed", "--out", tmp_path / "s")
    assert code == 0, text
    speed = json.loads((tmp_path / "s" / "report.json").read_text())
    assert speed["bits"]["label"] == "int8" and speed["coverage"]["simulated_layers"] == []
    # every conv but the RGB stem runs as QLinearConv, the SiLUs after them as QLinearSigmoid + QLinearMul
    assert speed["coverage"]["integer_mac_share"] > 0.9 and speed["quantization"]["quantized_silu_gates"] > 0
    assert speed["quantization"]["quantized_layers"] == report["quantization"]["quantized_layers"] - 1
    code, text = _run("export", "--checkpoint", tmp_path / "s" / "model.int8.pth", "--out", tmp_path / "se")
    assert code == 0, text  # the gated SiLUs come back from the checkpoint: the same artifact
    code, text = _run("check", tmp_path / "se" / "model.quantized.onnx", "--baseline", tmp_path / "s" / "model.int8.onnx",
                      "--eval", VAL, "--eval-size", 50, "--max-drop", 0, "--json", tmp_path / "sc.json")
    assert code == 0 and json.loads((tmp_path / "sc.json").read_text())["top1_agreement"] == 100.0, text
    code, text = _run("export", "--checkpoint", tmp_path / "q" / "model.int8.pth", "--out", tmp_path / "e")
    assert code == 0, text
    code, text = _run("check", tmp_path / "e" / "model.quantized.onnx", "--baseline", tmp_path / "q" / "model.int8.onnx",
                      "--eval", VAL, "--eval-size", 50, "--max-drop", 0, "--json", tmp_path / "c.json")
    assert code == 0, text
    assert json.loads((tmp_path / "c.json").read_text())["top1_agreement"] == 100.0


def test_placement_auto_picks_the_fastest_within_budget(tmp_path):
    code, text = _run("quantize", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 32, "--eval", VAL,
                      "--eval-size", 100, "--placement", "auto", "--max-drop", "5", "--out", tmp_path / "a")
    assert code == 0, text
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    auto = report["placement_auto"]
    assert [c["placement"] for c in auto["candidates"]] == list(AUTO_CANDIDATES)
    within = [c for c in auto["candidates"] if c.get("within_budget")]
    assert all(c["drop"] <= 5 for c in within)
    assert auto["chosen"] == max(within, key=lambda c: c["speedup"])["placement"]
    assert report["config"]["placement"] == CANDIDATES[auto["chosen"]].placement
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.fp32.onnx", "model.int8.onnx", "model.int8.pth", "report.html", "report.json", "report.md"]
    # without --eval: label-free, agreement with fp32 on calibration-folder images calibration did not see
    code, text = _run("quantize", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 8,
                      "--placement", "auto", "--max-drop", "5", "--out", tmp_path / "b")
    assert code == 0, text
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert "held-out calibration images" in report["placement_auto"]["judged_on"]
    assert report["holdout_fidelity"]["images"] == 256 and "accuracy" not in report
    chosen = next(c for c in report["placement_auto"]["candidates"] if c["placement"] == report["placement_auto"]["chosen"])
    assert chosen["top1_agreement"] >= 95 and chosen["within_budget"]
    # a calibration folder with nothing left to hold out and no --eval: one line, exit 2
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(CALIB.rglob("*.jpg"))[:4]:
        shutil.copy(p, few / p.name)
    code, text = _run("quantize", "--checkpoint", BUNDLED_CKPT, "--calib", few, "--calib-size", 8, "--out", tmp_path / "c")
    assert code == 2 and "needs images to judge accuracy" in text


def test_demo_runs_offline(tmp_path):
    """`make demo`'s command: every quantize option must reach it (it calls the quantize command)."""
    code, text = _run("demo", "--out", tmp_path / "d")
    assert code == 0, text
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["accuracy"]["images"] > 0 and report["bits"]["label"].startswith("int8")


@pytest.mark.parametrize("target, signed", [("vnni", True), ("avx2", False)])
def test_speed_on_vnni_names_the_session_config_its_attention_operands_need(tmp_path, target, signed):
    code, text = _run("quantize", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 16,
                      "--placement", "speed", "--target-cpu", target, "--out", tmp_path / "q")
    assert code == 0, text
    export = json.loads((tmp_path / "q" / "report.json").read_text())["export"]
    assert (export["signed_matmul_operands"] > 0) is signed
    assert ("deploy with onnxruntime session config session.qdqisint8allowed=1" in " ".join(text.split())) is signed
    assert export["onnxruntime_session_config"] == ({"session.qdqisint8allowed": "1"} if signed else {})
