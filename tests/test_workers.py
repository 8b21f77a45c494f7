"""Scale-out on Ray: sharded evaluation gives the numbers of one process, a dead worker's shard is
run again, and what cannot run fails in one line."""
import json
import os
import sys

import pytest
from typer.testing import CliRunner

from vitcompress import VitcompressError
from vitcompress.cli import app
from vitcompress.workers import Workers, open_pool
from tests.conftest import VAL

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'vitcompress[ray]')")
runner = CliRunner()

METRICS = ("artifact_accuracy", "baseline_accuracy", "drop", "top1_agreement", "kl", "images", "skipped")


def _check(out, json_file, *extra):
    result = runner.invoke(app, [str(a) for a in ("check", out / "model.int8.onnx", "--baseline", out / "model.fp32.onnx", "--eval", VAL,
                                                  "--max-drop", 5, "--json", json_file, *extra)])
    assert result.exit_code == 0, result.output
    return json.loads(json_file.read_text())


def test_two_workers_give_the_numbers_of_one_process(quantize_run, tmp_path):
    out = quantize_run[0]
    one = _check(out, tmp_path / "one.json")
    two = _check(out, tmp_path / "two.json", "--workers", 2)
    assert one["workers"]["backend"] == "in-process" and two["workers"]["backend"] == "ray" and two["workers"]["workers"] == 2
    assert two["workers"]["startup_seconds"] > 0
    for key in METRICS:
        assert one[key] == two[key], key  # byte-identical: the same shards meet the same models


def _fails_once(marker: str):
    def shard(i: int) -> int:
        if i == 1 and os.path.exists(marker):
            os.remove(marker)
            os._exit(1)  # the worker process dies mid-run
        return i * i
    return shard


def _always_dies(i: int) -> int:
    os._exit(1)


def test_a_killed_worker_is_replaced_and_the_result_is_still_right(tmp_path):
    marker = tmp_path / "kill-once"
    marker.write_text("")
    with open_pool(Workers(count=2)) as pool:
        assert pool.map(_fails_once(str(marker)), [(i,) for i in range(4)]) == [0, 1, 4, 9]
        assert not marker.exists()  # the worker really died once
        with pytest.raises(VitcompressError, match=r"shard \d of 2 failed on a Ray worker after 2 retries"):
            pool.map(_always_dies, [(0,), (1,)])


def test_without_ray_or_with_an_unreachable_cluster_it_fails_in_one_line(quantize_run, tmp_path, monkeypatch):
    out = quantize_run[0]
    args = ["check", str(out / "model.int8.onnx"), "--baseline", str(out / "model.fp32.onnx"), "--eval", str(VAL), "--max-drop", "5"]
    result = runner.invoke(app, args + ["--ray-address", "127.0.0.1:1"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "cannot reach Ray at 127.0.0.1:1" in result.output, result.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    result = runner.invoke(app, args + ["--workers", "2"])
    assert result.exit_code == 2 and "pip install 'vitcompress[ray]'" in result.output, result.output
    result = runner.invoke(app, args + ["--workers", "1"])  # one worker needs no Ray
    assert result.exit_code == 0, result.output
    with pytest.raises(VitcompressError, match="at least 1"):
        Workers(count=0)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_sharded_calibration_gives_the_same_scales(loaded, observer):
    import copy

    import torch

    from vitcompress import QuantConfig
    from vitcompress.data import load_tensor, sample, scan_images
    from vitcompress.quant import quantize_
    from tests.conftest import CALIB

    images = load_tensor(sample(scan_images(CALIB), 96, 0), loaded.preprocessing).split(16)
    here, sharded = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    config = QuantConfig(placement="speed", act_observer=observer)
    quantize_(here, config, images)
    with open_pool(Workers(count=2)) as pool:
        result = quantize_(sharded, config, images, map_shards=pool.map)
    assert result.method_info["calibration_shards"] == 3  # 6 batches, 2 per shard, on 2 workers
    mine, theirs = here.state_dict(), sharded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_prune_evaluates_on_workers_with_the_same_numbers(tmp_path):
    from tests.conftest import BUNDLED_CKPT, CALIB

    reports = []
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        out = tmp_path / name
        result = runner.invoke(app, [str(a) for a in ("prune", "--checkpoint", BUNDLED_CKPT, "--calib", CALIB, "--calib-size", 32,
                                                      "--eval", VAL, "--eval-size", 600, "--target-flops", 2, "--out", out, *extra)])
        assert result.exit_code == 0, result.output
        reports.append(json.loads((out / "report.json").read_text()))
    assert reports[1]["workers"]["backend"] == "ray" and reports[0]["accuracy"] == reports[1]["accuracy"]


def test_greedy_mixed_precision_probes_on_workers_choose_the_same_bits(loaded):
    import copy

    import torch

    from vitcompress import QuantConfig
    from vitcompress.data import load_tensor, sample, scan_images
    from vitcompress.quant import quantize_
    from tests.conftest import CALIB

    images = load_tensor(sample(scan_images(CALIB), 32, 0), loaded.preprocessing).split(16)
    config = QuantConfig(method="mptq", method_options={"target_bits": 6, "bit_choices": [4, 8], "parts": []})
    here, there = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    mine = quantize_(here, config, images).method_info["mixed_precision"]
    with open_pool(Workers(count=2)) as pool:
        theirs = quantize_(there, config, images, map_shards=pool.map).method_info["mixed_precision"]
    assert mine["isolated_sensitivity"] == theirs["isolated_sensitivity"] and mine["assignment"] == theirs["assignment"]
    a, b = here.state_dict(), there.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_placement_candidates_build_on_workers_with_the_numbers_of_one_process(tmp_path):
    from vitcompress import QuantConfig, QuantizeJob, quantize
    from tests.conftest import BUNDLED_CKPT, CALIB

    def run(name: str, workers: Workers) -> dict:
        return quantize(QuantizeJob(out=tmp_path / name, checkpoint=BUNDLED_CKPT, config=QuantConfig(placement="auto"),
                                    calib_dir=CALIB, calib_size=32, eval_dir=VAL, eval_size=100, latency_rounds=5,
                                    workers=workers))

    one, two = run("one", Workers()), run("two", Workers(count=2))
    assert two["workers"]["backend"] == "ray" and one["workers"]["backend"] == "in-process"
    numbers = ("placement", "drop", "top1_agreement", "within_budget")
    assert [{k: c.get(k) for k in numbers} for c in one["placement_auto"]["candidates"]] == \
           [{k: c.get(k) for k in numbers} for c in two["placement_auto"]["candidates"]]
    within = [c for c in two["placement_auto"]["candidates"] if c.get("within_budget")]
    assert two["placement_auto"]["chosen"] == max(within, key=lambda c: c["speedup"])["placement"]
    assert two["latency"]["quantized"]["rounds"] >= 5 and (tmp_path / "two" / "model.fp32.onnx").exists()


def test_gptq_input_statistics_on_workers_give_the_same_rounding(loaded, calib_batches):
    import copy

    import torch

    from vitcompress.quant import QuantConfig, quantize_
    from vitcompress.quant.gptq import gptq_layers

    quantized = copy.deepcopy(loaded.model)
    quantize_(quantized, QuantConfig(wbits=4, abits=8), calib_batches)
    names = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.5.mlp.fc2"]
    here, sharded = copy.deepcopy(quantized), copy.deepcopy(quantized)
    batches = [b for batch in calib_batches for b in batch.split(8)]  # 8 batches: 4 shards
    assert gptq_layers(here, names, batches, loaded.model) == names
    with open_pool(Workers(count=2)) as pool:
        assert gptq_layers(sharded, names, batches, loaded.model, map_shards=pool.map) == names
    for name in names:
        before, mine, theirs = (m.get_submodule(name).weight for m in (quantized, here, sharded))
        assert not torch.equal(before, mine)  # GPTQ moved the weights
        assert torch.equal(mine, theirs), name


def _square(i: int) -> int:
    return i * i


def test_the_driver_works_while_ray_starts_and_the_results_keep_their_order():
    ran_here = []

    def here(i: int) -> int:
        ran_here.append(i)
        return i * i

    with open_pool(Workers(count=2)) as pool:
        assert pool.info["startup_seconds"] is None  # Ray starts on the first map, not when the pool is made
        assert pool.map(_square, [(i,) for i in range(12)], here=here) == [i * i for i in range(12)]
        assert pool.info["startup_seconds"] > 0
    # the driver took shards from the back while Ray started (a start takes seconds, a shard microseconds)
    assert ran_here and ran_here == sorted(ran_here, reverse=True) and ran_here[0] == 11


def test_a_shard_that_fails_in_the_driver_ends_the_map_with_its_error():
    def here(i: int) -> int:
        raise VitcompressError(f"image folder of shard {i} is unreadable")

    with open_pool(Workers(count=2)) as pool:
        with pytest.raises(VitcompressError, match="image folder of shard 3 is unreadable"):
            pool.map(_square, [(i,) for i in range(4)], here=here)


def test_fisher_diagonals_on_workers_are_those_of_one_process(loaded, calib_batches):
    import torch

    from vitcompress.quant.fisher import output_fisher

    images = torch.cat(list(calib_batches))[:40]  # 5 batches of 8: shards of 2, 2 and 1 batches
    outputs_of = {"block1": loaded.model.blocks[1], "norm": loaded.model.norm}
    here = output_fisher(loaded.model, images, outputs_of, 8, max_exact=4, seed=3)  # 10 classes > 4: sampled labels
    with open_pool(Workers(count=2)) as pool:
        sharded = output_fisher(loaded.model, images, outputs_of, 8, max_exact=4, seed=3, map_shards=pool.map)
    assert list(here) == list(sharded) == ["block1", "norm"]
    for key in here:
        assert here[key].shape[0] == 40 and here[key].abs().sum() > 0
        assert torch.equal(here[key], sharded[key]), key


def test_qhyvit_on_workers_gives_the_model_of_one_process(loaded):
    """End to end through the method: min-max start, Fisher diagonals, GPTQ statistics and the
    reconstruction's Fisher sharded on workers give the same quantized model."""
    import copy

    import torch

    from vitcompress.data import load_tensor, sample, scan_images
    from vitcompress.quant import QuantConfig, quantize_
    from tests.conftest import CALIB

    batches = load_tensor(sample(scan_images(CALIB), 16, 0), loaded.preprocessing).split(4)
    config = QuantConfig(method="qhyvit", wbits=6, abits=6,
                         method_options={"rounds": 1, "alphas": 10, "scale_tuning_steps": 5, "reconstruction_steps": 3})
    here, sharded = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    torch.manual_seed(0)
    quantize_(here, config, batches)
    with open_pool(Workers(count=2)) as pool:
        torch.manual_seed(0)
        quantize_(sharded, config, batches, map_shards=pool.map)
    mine, theirs = here.state_dict(), sharded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
