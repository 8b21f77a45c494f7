"""Post-training quantization of vision transformers (fake-quant simulation in torch)."""
from . import qhyvit  # noqa: F401  (registers the "qhyvit" method)
from .api import QuantResult, float_state_dict, quant_state, quantize_, restore_quantized
from .registry import METHODS, register_method
from .config import QuantConfig
from .spec import QuantSpec
from . import mptq as _mptq  # noqa: F401,E402 (registers the "mptq" method)

__all__ = [
    "METHODS", "QuantConfig", "QuantResult", "QuantSpec", "float_state_dict", "quant_state",
    "quantize_", "register_method", "restore_quantized",
]
