import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_CKPT = ROOT / "calib" / "cifar10_vit_tiny.pth"
CALIB = ROOT / "calib" / "train"
VAL = ROOT / "calib" / "val"


@pytest.fixture(scope="session")
def loaded():
    from vitcompress import load

    return load(checkpoint=BUNDLED_CKPT)


@pytest.fixture(scope="session")
def calib_batches(loaded):
    from vitcompress.data import load_tensor, sample, scan_images

    return load_tensor(sample(scan_images(CALIB), 64, 0), loaded.preprocessing).split(32)


@pytest.fixture(scope="session")
def quantize_run(tmp_path_factory):
    """One real W8A8 run of the pipeline on the bundled model and images, shared by tests."""
    from vitcompress import QuantConfig, QuantizeJob, quantize

    out = tmp_path_factory.mktemp("q8") / "out"
    job = QuantizeJob(out=out, checkpoint=BUNDLED_CKPT, config=QuantConfig(), calib_dir=CALIB, calib_size=128,
                      eval_dir=VAL, eval_size=300, latency_rounds=5)
    return out, quantize(job)


@pytest.fixture
def cpu_target(record_property):
    """What ``--target-cpu auto`` resolves to here. Tests that run an exported artifact's integer
    kernels quantize for it (7-bit weights on CPUs that add int8 pairs in int16), so they hold on
    VNNI and AVX2 machines alike; the report records which branch ran."""
    from vitcompress.cpu import resolve_target

    resolved = resolve_target("auto")
    record_property("target", f"auto -> {resolved['resolved']} on {resolved['built_on']['isa']}")
    return resolved


@pytest.fixture
def small_image_dir(tmp_path):
    """An ImageFolder of 2 classes x 3 images copied from the bundle."""
    d = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (d / cls).mkdir(parents=True)
        for p in sorted((VAL / cls).iterdir())[:3]:
            shutil.copy(p, d / cls / p.name)
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
