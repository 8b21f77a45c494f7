"""Which int8 kernels a CPU has, which numerics an artifact needs, and whether the two agree.

Rules as data, each with its reason (the figures live in docs/quantization.md):

- ``ISAS``: the int8 instruction sets onnxruntime and OpenVINO dispatch on, best first. What
  matters for exactness is how u8·s8 products are summed. VNNI (AVX-512 VNNI, AVX-VNNI), AMX and
  ARM's dot-product instructions accumulate them straight into int32. AVX2 and AVX-512 without
  VNNI add *pairs* of u8·s8 products into int16 first (vpmaddubsw), which saturates when both
  operands use their full range: 255·127·2 > 32767.
- ``TARGETS``: what ``--target-cpu`` asks of the artifact. ``portable`` keeps every weight on 7
  bits (−64..63: 255·64·2 = 32640 fits int16) and attention products' operands uint8, so it is
  exact on every CPU; ``vnni`` keeps all 8 bits of the weights and exports attention products'
  second operand as int8 (u8·s8 kernels, faster), which is exact only where products accumulate
  in int32. ``avx2`` is the older name of ``portable``.
- What an artifact needs is read from the artifact itself (``artifact_numerics``: its largest
  weight code and its int8 activation operands), so a hand-made or re-exported file is judged by
  what it holds, not by what it claims.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from .registry import lookup

# Largest |weight code| whose u8·s8 pair sums fit int16: 255 · (64 + 64) = 32640 <= 32767.
PAIR_SAFE_WEIGHT_CODE = 64


@dataclass(frozen=True)
class Isa:
    """One int8 instruction set: the /proc/cpuinfo flags that reveal it, and whether u8·s8
    products accumulate in int32 (``int32_dot``: full-range operands are exact)."""

    name: str
    flags: tuple[str, ...]
    int32_dot: bool
    reason: str


ISAS: tuple[Isa, ...] = (
    Isa("amx", ("amx_int8",), True, "AMX tiles accumulate int8 products in int32"),
    Isa("avx512_vnni", ("avx512_vnni",), True, "vpdpbusd accumulates u8·s8 products in int32"),
    Isa("avx_vnni", ("avx_vnni",), True, "vpdpbusd (VEX) accumulates u8·s8 products in int32"),
    Isa("avx512", ("avx512bw",), False, "vpmaddubsw adds u8·s8 pairs in int16: full-range operands can saturate"),
    Isa("avx2", ("avx2",), False, "vpmaddubsw adds u8·s8 pairs in int16: full-range operands can saturate"),
    Isa("arm_dotprod", ("asimddp",), True, "sdot/udot accumulate int8 products in int32"),
    Isa("arm_neon", ("asimd", "neon"), True, "widening multiplies accumulate in int32"),
    Isa("x86_sse", ("sse4_1", "ssse3", "sse2"), True, "products widened to int16 then pmaddwd into int32"),
)
UNKNOWN_ISA = Isa("unknown", (), False, "CPU flags unreadable: assume pair sums in int16")


@dataclass(frozen=True)
class Target:
    """What ``--target-cpu`` asks of the weights and of attention products' operands."""

    name: str
    reduce_range: bool  # weights on 7 bits of the int8 grid
    signed_matmul_operands: bool  # attention products' second operand int8 (u8·s8 kernels)
    reason: str


TARGETS: dict[str, Target] = {
    "portable": Target("portable", True, False,
                       "7-bit weights and uint8 attention operands: exact on every CPU, VNNI or not"),
    "vnni": Target("vnni", False, True,
                   "full-range int8 weights, int8 second operands of attention products: exact only on CPUs "
                   "whose int8 products accumulate in int32 (VNNI, AMX, ARM dot product)"),
}
TARGET_ALIASES = {"avx2": "portable"}
TARGET_CHOICES = ("auto", *TARGETS, *TARGET_ALIASES)


# /proc/cpuinfo flags that numpy's CPU dispatch also reads from CPUID (its feature names): what
# this process can execute, which is what onnxruntime's kernels dispatch on.
CPUID_CHECKED = {"avx": "AVX", "avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This process's CPU feature flags (empty where /proc/cpuinfo is absent).

    /proc/cpuinfo describes the host; an emulator (or a hypervisor masking features) can hide some
    from the process, and the kernels then dispatch on what CPUID says. Where CPUID denies a flag
    /proc/cpuinfo lists, /proc/cpuinfo is not this process's CPU: only the flags CPUID confirms are
    kept (so an AVX2-only view of a VNNI host is AVX2, not VNNI)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return flags_executable(frozenset(line.partition(":")[2].split()), _cpuid_features())


def flags_executable(listed: frozenset[str], cpuid: dict[str, bool]) -> frozenset[str]:
    """The /proc/cpuinfo flags ``listed``, less the vector extensions this process cannot use when
    ``cpuid`` (numpy's CPUID features) denies one that /proc/cpuinfo lists: then only the
    AVX/AMX flags CPUID confirms are kept."""
    if not any(cpuid.get(key) is False for flag, key in CPUID_CHECKED.items() if flag in listed):
        return listed
    return frozenset(f for f in listed if cpuid.get(CPUID_CHECKED.get(f, "")) is True or not f.startswith(("avx", "amx")))


def _cpuid_features() -> dict[str, bool]:
    """numpy's runtime CPU features (CPUID), {} where this numpy does not expose them."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return dict(__cpu_features__)


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name, e.g. 'AMD EPYC (family 26, model 2)' ('' where unknown).

    Virtual machines often report a bare 'AMD EPYC' for CPUs generations apart (AVX-512 run
    double-pumped on one, full width on the next), so the x86 family and model numbers follow it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    fields = dict(ln.partition(":")[::2] for ln in text.split("\n\n")[0].splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or platform.processor()
    if fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def detect_isa(flags: set[str] | None = None) -> Isa:
    """The best int8 instruction set among ``flags`` (this machine's by default)."""
    flags = cpu_flags() if flags is None else flags
    return next((isa for isa in ISAS if any(f in flags for f in isa.flags)), UNKNOWN_ISA)


def this_cpu(flags: set[str] | None = None) -> dict:
    """{"model", "isa", "int32_dot"}: what a report or an artifact records about a CPU."""
    isa = detect_isa(flags)
    return {"model": cpu_model(), "isa": isa.name, "int32_dot": isa.int32_dot}


def signed_matmul_operands(reduce_range: bool) -> bool:
    """Whether attention products get int8 second operands: only with full-range weights, i.e. for
    a ``vnni`` target (a 7-bit target is one meant for CPUs whose pair sums could saturate)."""
    return not reduce_range


def resolve_target(target: str, flags: set[str] | None = None) -> dict:
    """{"target", "resolved", "vnni", "reduce_range", "signed_matmul_operands", "built_on", "why"}
    for ``--target-cpu`` (auto: ``vnni`` where this CPU accumulates int8 products in int32, else
    ``portable``)."""
    lookup(dict.fromkeys(TARGET_CHOICES), target, "--target-cpu")
    built_on = this_cpu(flags)
    if target == "auto":
        isa = detect_isa(flags)
        chosen = TARGETS["vnni" if isa.int32_dot else "portable"]
        why = f"this CPU ({built_on['model'] or 'unknown model'}) has {isa.name}: {isa.reason}"
    else:
        chosen = TARGETS[TARGET_ALIASES.get(target, target)]
        why = f"--target-cpu {target}"
    return {"target": target, "resolved": chosen.name, "vnni": not chosen.reduce_range,
            "reduce_range": chosen.reduce_range, "signed_matmul_operands": chosen.signed_matmul_operands,
            "built_on": built_on, "why": f"{why}; {chosen.reason}"}


def target_of_numerics(max_weight_code: int, signed_operands: int) -> str:
    """The target whose guarantees an artifact holding these numerics meets."""
    return "portable" if max_weight_code <= PAIR_SAFE_WEIGHT_CODE and signed_operands == 0 else "vnni"


def compatibility(numerics: dict | None, flags: set[str] | None = None) -> dict:
    """Whether an artifact with ``numerics`` (see ``artifact_numerics``) computes exactly on this CPU.

    {"exact": bool | None, "cpu": this_cpu(), "note": one line or ""}; exact is None for an
    artifact that records no numerics (a float model, or an old export)."""
    cpu = this_cpu(flags)
    if not numerics:
        return {"exact": None, "cpu": cpu, "note": ""}
    needs_int32 = numerics.get("target") == "vnni"
    exact = cpu["int32_dot"] or not needs_int32
    why = [f"full-range weights (largest code {numerics['max_weight_code']})"] if numerics.get("max_weight_code", 0) > PAIR_SAFE_WEIGHT_CODE else []
    # signed_activations counts every int8 activation (the moved attention operands among them)
    signed = max(numerics.get("signed_matmul_operands", 0), numerics.get("signed_activations", 0))
    why += [f"{signed} int8 activation operands"] if signed else []
    note = "" if exact else (
        f"this artifact needs int32 accumulation of int8 products ({', '.join(why)}) but this CPU "
        f"({cpu['model'] or 'unknown model'}, {cpu['isa']}) adds pairs in int16, which can saturate: results are not exact "
        f"here; rebuild it with --target-cpu portable")
    return {"exact": exact, "cpu": cpu, "note": note}


__all__ = ["ISAS", "TARGETS", "Isa", "Target", "compatibility", "cpu_flags", "cpu_model", "detect_isa",
           "resolve_target", "signed_matmul_operands", "target_of_numerics", "this_cpu"]
