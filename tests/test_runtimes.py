"""Runtimes: the same QDQ file on onnxruntime and OpenVINO, their versions in every report, and a
missing optional runtime as one line."""
import copy
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vitcompress.cli import app
from vitcompress.data import load_tensor, sample, scan_images
from vitcompress.errors import VitcompressError
from vitcompress.export.runtime import CpuMismatchWarning, op_class, op_times
from vitcompress.export import RUNTIMES, compare_latency, export_float, export_qdq, int8_coverage, open_session
from vitcompress.quant import QuantConfig, quantize_
from vitcompress.quant.placement import CANDIDATES, DEFAULT_RULES, default_placement_order, get_placement
from tests.conftest import VAL


@pytest.fixture(scope="module")
def artifacts(loaded, calib_batches, tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    meta = {"preprocessing": loaded.preprocessing.to_dict(), "num_classes": 10}
    for name, reduce_range in (("q.onnx", True), ("full_range.onnx", False)):  # portable, and vnni (full-range weights)
        m = copy.deepcopy(loaded.model)
        quantize_(m, QuantConfig(placement="speed", reduce_range=reduce_range), calib_batches)
        export_qdq(m, loaded.preprocessing.input_size, d / name, meta)
    export_float(loaded.model, loaded.preprocessing.input_size, d / "f.onnx", meta)
    return d


def test_openvino_runs_the_same_qdq_file_as_onnxruntime(loaded, artifacts):
    x = load_tensor(sample(scan_images(VAL), 200, 0), loaded.preprocessing).numpy()
    ort_q, ov_q = open_session(artifacts / "q.onnx", "onnxruntime")(x), open_session(artifacts / "q.onnx", "openvino")(x)
    assert (ort_q.argmax(1) == ov_q.argmax(1)).mean() >= 0.97
    ort_f, ov_f = open_session(artifacts / "f.onnx", "onnxruntime")(x), open_session(artifacts / "f.onnx", "openvino")(x)
    np.testing.assert_allclose(ov_f, ort_f, atol=1e-3)  # fp32 means fp32 on OpenVINO too (no bf16 on bf16 CPUs)


def test_coverage_and_latency_name_their_runtime(artifacts):
    cov = int8_coverage(artifacts / "q.onnx", "openvino")
    assert cov["runtime"]["name"] == "openvino" and cov["integer_mac_share"] > 0.5
    assert cov["integer_kernels"].get("FullyConnected", 0) > 0
    lat = compare_latency({"fp32_ort": artifacts / "f.onnx", "int8_ov": (artifacts / "q.onnx", "openvino")}, (1, 3, 32, 32), rounds=3, warmup=1)
    assert lat["fp32_ort"]["runtime"]["name"] == "onnxruntime" and lat["int8_ov"]["runtime"]["name"] == "openvino"
    assert all(v["runtime"]["version"] for v in lat.values())


def test_op_times_split_each_run_into_the_operators_that_ran(artifacts):
    prof = op_times({"fp32": artifacts / "f.onnx", "int8": artifacts / "q.onnx"}, (1, 3, 32, 32), rounds=4, warmup=2)
    classes = {name: {op_class(op) for op in p["ops"]} for name, p in prof.items()}
    assert "integer products" not in classes["fp32"] and "float products" in classes["fp32"]
    assert {"integer products", "quantize/dequantize"} <= classes["int8"]  # the speed placement's int8 kernels, measured
    for p in prof.values():
        assert 0 < sum(p["ops"].values()) <= p["run_ms"] * 1.05  # node times fit inside the runs (warm-ups left out)
        assert set(p["nodes"]) == set(p["ops"]) and all(n >= 1 for n in p["nodes"].values())


def test_openvino_op_times_split_each_run_into_the_layers_that_ran(artifacts):
    from vitcompress.export import openvino_runtime

    prof = openvino_runtime.op_times({"fp32": artifacts / "f.onnx", "int8": artifacts / "q.onnx"}, (1, 3, 32, 32), rounds=4, warmup=2)
    classes = {name: {openvino_runtime.op_class(k) for k, ms in p["ops"].items() if ms > 0} for name, p in prof.items()}
    assert "integer products" not in classes["fp32"] and "float products" in classes["fp32"]
    assert "integer products" in classes["int8"]  # OpenVINO's u8/i8 kernels, read from its own counters
    for p in prof.values():  # the counters cover most of each run (on a 1-ms model a layer's may even exceed the run's mean)
        assert sum(p["ops"].values()) > 0.3 * p["run_ms"] > 0
    assert openvino_runtime.op_class("Subgraph:f32") == "everything else"  # fused elementwise work, not a product
    assert openvino_runtime.op_class("FakeQuantize:f32") == "quantize/dequantize"


def test_openvino_coverage_follows_layers_renamed_by_its_low_precision_passes(loaded, calib_batches, tmp_path):
    """matmul-int8 on OpenVINO: every Linear and both attention products run in integer kernels. The
    plugin renames the output projection's layer after its moved dequantization ("Multiply_…"), so
    the layer is found by its weight; the attention products run in one fused snippet ("Subgraph")."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    m = copy.deepcopy(loaded.model)
    candidate = CANDIDATES["matmul-int8"]
    quantize_(m, QuantConfig(placement=candidate.placement, act_symmetric=candidate.act_symmetric), calib_batches)
    export_qdq(m, loaded.preprocessing.input_size, tmp_path / "mm.onnx", {"num_classes": 10}, signed_matmul_operands=True)
    cov = int8_coverage(tmp_path / "mm.onnx", "openvino")
    assert [i["node"] for i in cov["float_islands"]] == [] and cov["integer_mac_share"] == 1.0
    assert cov["integer_kernels"]["FullyConnected"] == 4 * len(loaded.model.blocks) + 1  # qkv, proj, fc1, fc2 per block; the head


def test_a_missing_runtime_is_one_line_naming_the_install(monkeypatch, artifacts):
    monkeypatch.setattr(type(RUNTIMES["openvino"]), "available", lambda self: False)
    with pytest.raises(VitcompressError, match=r"runtime 'openvino' is not installed: pip install 'vitcompress\[openvino\]'"):
        open_session(artifacts / "q.onnx", "openvino")
    with pytest.raises(VitcompressError, match="unknown runtime 'tensorrt'"):
        open_session(artifacts / "q.onnx", "tensorrt")


def test_check_on_openvino_reports_runtime_and_cpu(artifacts, tmp_path):
    runner = CliRunner()
    args = ["check", str(artifacts / "q.onnx"), "--baseline", str(artifacts / "f.onnx"), "--eval", str(VAL), "--eval-size", "50",
            "--max-drop", "5", "--json", str(tmp_path / "r.json"), "--force"]
    r = runner.invoke(app, args + ["--runtime", "openvino"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runtime"]["name"] == "openvino" and report["cpu_compatibility"]["exact"] is True  # a portable artifact
    r = runner.invoke(app, args + ["--runtime", "nope"])
    assert r.exit_code == 2 and "unknown runtime 'nope'" in r.output
    r = runner.invoke(app, args[:-5] + ["--max-drop", "nan"])
    assert r.exit_code == 2 and "--max-drop: must be a number >= 0" in r.output and "got nan" in r.output


def test_default_placement_rules_are_data_that_resolve_for_every_runtime():
    for runtime in RUNTIMES:
        rule = default_placement_order(runtime, "MobileViT v2", "avx2")
        assert rule.runtime == runtime and rule.reason and rule.order
        assert all(get_placement(CANDIDATES[c].placement) for c in rule.order)
    assert default_placement_order("onnxruntime", "DeiT", "avx512_vnni").order[0] == "speed"
    assert {r.runtime for r in DEFAULT_RULES} == set(RUNTIMES)


@pytest.mark.parametrize("isa_flags", ["vnni", "avx2"])
def test_the_automatic_placement_keeps_only_artifacts_the_target_promises(isa_flags):
    """A built candidate whose integer kernels need int32 accumulation (signed activation operands:
    MobileViT v2's eltwise on AVX2 did) is refused for a portable target, kept for a vnni one."""
    from vitcompress.api import _held_to_target
    from vitcompress.cpu import resolve_target
    from tests.test_cpu import AVX2_FLAGS, VNNI_FLAGS

    target = resolve_target("auto", VNNI_FLAGS if isa_flags == "vnni" else AVX2_FLAGS)
    for needs in ("portable", "vnni"):
        report = {"export": {"numerics": {"target": needs}}}
        kept, why = _held_to_target(report, target)
        if needs == "portable" or target["resolved"] == "vnni":
            assert kept is report and why is None
        else:
            assert kept is None and "needs a vnni target" in why and "this one is portable" in why


def test_check_of_a_vnni_artifact_on_a_cpu_without_int32_dot_products_says_so(artifacts, tmp_path, monkeypatch):
    """The gate still measures (and stands on what it measured), and the mismatch is one line and in the report."""
    import vitcompress.cpu

    monkeypatch.setattr(vitcompress.cpu, "cpu_flags", lambda: {"avx2", "fma"})  # what an AVX2-only machine reports
    runner = CliRunner()
    args = ["check", str(artifacts / "full_range.onnx"), "--baseline", str(artifacts / "f.onnx"), "--eval", str(VAL),
            "--eval-size", "50", "--max-drop", "5", "--json", str(tmp_path / "r.json"), "--force"]
    with pytest.warns(CpuMismatchWarning, match="full_range.onnx"):  # every session opened on it says so too
        r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "rebuild it with --target-cpu portable" in " ".join(r.output.split())
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["cpu_compatibility"]["exact"] is False and report["cpu_compatibility"]["cpu"]["isa"] == "avx2"
    r = runner.invoke(app, ["check", str(artifacts / "q.onnx"), *args[2:]])  # the portable artifact: nothing to say
    assert r.exit_code == 0 and "warning:" not in r.output


def test_signed_activations_make_a_vnni_artifact(loaded, calib_batches, tmp_path):
    """Symmetric (int8) activations multiply int8 by int8: the file says it needs int32 accumulation."""
    m = copy.deepcopy(loaded.model)
    quantize_(m, QuantConfig(placement="partial+matmul", act_symmetric=True, reduce_range=True), calib_batches)
    info = export_qdq(m, loaded.preprocessing.input_size, tmp_path / "s.onnx", {})
    assert info["numerics"]["signed_activations"] > 0 and info["numerics"]["max_weight_code"] <= 64
    assert info["numerics"]["target"] == "vnni"


def test_latency_of_fast_models_runs_long_enough_to_be_a_stable_ratio(artifacts):
    quick = compare_latency({"f": artifacts / "f.onnx", "q": artifacts / "q.onnx"}, (1, 3, 32, 32), rounds=3, warmup=2)
    assert quick["f"]["rounds"] == 3
    lat = compare_latency({"f": artifacts / "f.onnx", "q": artifacts / "q.onnx"}, (1, 3, 32, 32), rounds=3, warmup=2,
                          min_seconds=0.3)
    per_round_ms = lat["f"]["median_ms"] + lat["q"]["median_ms"]
    assert lat["f"]["rounds"] == lat["q"]["rounds"] > 3
    assert lat["f"]["rounds"] * per_round_ms >= 0.3 * 1e3 * 0.5  # about min_seconds of timed runs (estimate from one warm-up)
