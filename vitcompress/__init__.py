"""vitcompress: post-training compression of vision transformers for CPU and edge runtimes.

    from vitcompress import load, quantize_, QuantConfig
    loaded = load("deit", checkpoint="deit.pth")
    quantize_(loaded.model, QuantConfig(wbits=8, abits=8), calibration_batches)
"""
from ._version import __version__  # noqa: F401

from .api import QuantizeJob, export, load, quantize  # noqa: E402
from .check import check  # noqa: E402
from .gate import Gate  # noqa: E402
from .errors import VitcompressError  # noqa: E402
from .quant import QuantConfig, quantize_  # noqa: E402

__all__ = ["Gate", "QuantConfig", "QuantizeJob", "VitcompressError", "check", "export", "load", "quantize", "quantize_"]
