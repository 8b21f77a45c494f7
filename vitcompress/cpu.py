"""Which int8 kernels the deployment CPU has, and what that asks of the quantized weights.

onnxruntime's x86 int8 GEMMs multiply uint8 activations by int8 weights. With AVX-512 VNNI (or
AVX-VNNI / AMX) the products are accumulated straight into int32. Without VNNI, AVX2 kernels add
pairs of u8·s8 products into int16 first (vpmaddubsw), which saturates when both operands use
their full range: 255·127·2 > 32767. onnxruntime's guidance for such CPUs is ``reduce_range``:
7-bit weights (−64..63 on the int8 grid), which keeps every pair sum in range. We do the same:
``--target-cpu avx2`` (or ``auto`` on a machine without VNNI) quantizes weights on 7 bits of the
int8 grid; ``vnni`` keeps all 8. With VNNI the second operand of an activation-by-activation
product (attention's kᵀ and v) is also exported on the int8 grid, so onnxruntime runs u8·s8
instead of its slower u8·u8 GEMM (``export.onnx_export.sign_activation_matmul_operands``).
"""
from __future__ import annotations

from pathlib import Path

from .errors import VitcompressError

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
TARGETS = ("auto", "vnni", "avx2")


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def signed_matmul_operands(reduce_range: bool) -> bool:
    """Whether attention products get int8 second operands: only with full-range weights, i.e. for
    a VNNI target (a 7-bit target is one whose int16 pair sums could saturate)."""
    return not reduce_range


def resolve_target(target: str, flags: set[str] | None = None) -> dict:
    """{"target", "vnni", "reduce_range", "signed_matmul_operands", "why"} for ``--target-cpu``
    (auto: this machine)."""
    if target not in TARGETS:
        raise VitcompressError(f"unknown --target-cpu '{target}' (choose from {', '.join(TARGETS)})")
    if target == "auto":
        flags = cpu_flags() if flags is None else flags
        found = sorted(f for f in VNNI_FLAGS if f in flags)
        vnni = bool(found)
        why = f"this machine has {', '.join(found)}" if vnni else "this machine has no VNNI flag"
    else:
        vnni = target == "vnni"
        why = f"--target-cpu {target}"
    return {"target": target, "vnni": vnni, "reduce_range": not vnni, "signed_matmul_operands": signed_matmul_operands(not vnni),
            "why": why + ("; full-range int8 weights, int8 second operands of attention products" if vnni
                          else "; 7-bit weights and uint8 attention operands so AVX2's int16 pair sums cannot saturate")}
