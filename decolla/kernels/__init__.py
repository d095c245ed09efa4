"""Compiled Cython kernels (built from kernels/*.pyx), with run-time ISA dispatch.

On x86-64 every kernel exists three times: `<name>` (baseline SSE2), `<name>_v3`
(x86-64-v3: AVX2 + FMA) and `<name>_v4` (x86-64-v4: AVX-512 F/BW/CD/DQ/VL). On aarch64
twice: `<name>` (generic ARMv8-A) and `<name>_neon` (the NEON intrinsic kernels, ARMv8.0
with Advanced SIMD, tuned for the Cortex-A72). `load(name)` returns the best build the
CPU supports (v4, else v3, else baseline; neon, else baseline).
DECOLLA_KERNELS=baseline|v3|v4|neon|auto (default auto) overrides the choice; forcing a
level the CPU lacks is an ImportError.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import platform

from decolla import emulation

# x86-64-v3 features as /proc/cpuinfo names them (lzcnt is reported as abm).
_V3_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"}
# x86-64-v4 adds AVX-512 F, BW, CD, DQ and VL.
_V4_FLAGS = _V3_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# aarch64 Linux AT_HWCAP bits: FP and Advanced SIMD (NEON).
_AT_HWCAP, _HWCAP_FP, _HWCAP_ASIMD = 16, 1 << 0, 1 << 1

# Each architecture's levels from the most capable down; each level's module suffix.
_X86, _ARM = ("v4", "v3", "baseline"), ("neon", "baseline")
_SUFFIX = {"v4": "_v4", "v3": "_v3", "neon": "_neon", "baseline": ""}
_WHAT = {"v3": "AVX2/FMA (x86-64-v3)", "v4": "AVX-512 (x86-64-v4)",
         "neon": "aarch64 Advanced SIMD (NEON)"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _arm_has_neon() -> bool:
    """FP and Advanced SIMD in the kernel's hardware capabilities (the auxiliary vector,
    which qemu-user fills for the CPU it emulates, unlike /proc/cpuinfo)."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return False
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    need = _HWCAP_FP | _HWCAP_ASIMD
    return getauxval(_AT_HWCAP) & need == need


def _levels() -> tuple[str, ...]:
    """This architecture's levels, most capable first."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return _X86
    if machine in ("aarch64", "arm64"):
        return _ARM
    return ("baseline",)


def _supported() -> tuple[str, ...]:
    """The ISA levels this CPU can run, most capable first."""
    levels = _levels()
    if levels == _X86:
        flags = _cpu_flags()
        need = {"v4": _V4_FLAGS, "v3": _V3_FLAGS}
        return tuple(lvl for lvl in levels if lvl == "baseline" or need[lvl] <= flags)
    if levels == _ARM:
        return levels if _arm_has_neon() else ("baseline",)
    return levels


SUPPORTED = _supported()


def supports(isa: str) -> bool:
    """Whether this CPU can run the `isa` build (baseline, v3, v4 or neon)."""
    return isa in SUPPORTED


def _wanted() -> str:
    wanted = os.environ.get("DECOLLA_KERNELS", "auto").lower()
    if wanted not in ("auto",) + tuple(_SUFFIX):
        raise ImportError(f"DECOLLA_KERNELS={wanted!r}: use auto, baseline, v3, v4 or neon")
    return wanted


def _choose_isa() -> str:
    wanted = _wanted()
    if wanted == "auto":
        return SUPPORTED[0]
    if wanted not in SUPPORTED:
        raise ImportError(f"DECOLLA_KERNELS={wanted} but this CPU lacks {_WHAT[wanted]}")
    return wanted


ISA = _choose_isa()


def load(name: str):
    """The compiled kernel module `name` for this CPU: the build of level ISA, or (when
    that build is missing and the level was not forced) the next level down; under time
    dilation (decolla.emulation) a copy whose calls are dilated."""
    return emulation.wrap_module(_load(name))


def _load(name: str):
    forced = _wanted() != "auto"
    levels = SUPPORTED[SUPPORTED.index(ISA):]
    for lvl in levels[:-1]:
        try:
            return importlib.import_module(f"decolla.kernels.{name}{_SUFFIX[lvl]}")
        except ImportError:
            if forced:
                raise
    try:
        return importlib.import_module(f"decolla.kernels.{name}")
    except ImportError as exc:
        raise ImportError(f"DeColla kernel module {name!r} is not built: run "
                          f"`pip install --no-build-isolation -e .` ({exc})") from exc
