"""Compiled Cython kernels (built from kernels/*.pyx), with run-time ISA dispatch.

On x86-64 every kernel exists three times: `<name>` (baseline SSE2), `<name>_v3`
(x86-64-v3: AVX2 + FMA) and `<name>_v4` (x86-64-v4: AVX-512 F/BW/CD/DQ/VL). `load(name)`
returns the best build the CPU supports (v4, else v3, else baseline).
DECOLLA_KERNELS=baseline|v3|v4|auto (default auto) overrides the choice; forcing a
level the CPU lacks is an ImportError.
"""
from __future__ import annotations

import importlib
import os
import platform

from decolla import emulation

# x86-64-v3 features as /proc/cpuinfo names them (lzcnt is reported as abm).
_V3_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"}
# x86-64-v4 adds AVX-512 F, BW, CD, DQ and VL.
_V4_FLAGS = _V3_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

# Levels from the most capable down; each one's module suffix.
_LEVELS = ("v4", "v3", "baseline")
_SUFFIX = {"v4": "_v4", "v3": "_v3", "baseline": ""}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _supported() -> tuple[str, ...]:
    """The ISA levels this CPU can run, most capable first."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("baseline",)
    flags = _cpu_flags()
    have = [lvl for lvl, need in (("v4", _V4_FLAGS), ("v3", _V3_FLAGS)) if need <= flags]
    return tuple(have) + ("baseline",)


SUPPORTED = _supported()


def supports(isa: str) -> bool:
    """Whether this CPU can run the `isa` build (baseline, v3 or v4)."""
    return isa in SUPPORTED


def _wanted() -> str:
    wanted = os.environ.get("DECOLLA_KERNELS", "auto").lower()
    if wanted not in ("auto",) + _LEVELS:
        raise ImportError(f"DECOLLA_KERNELS={wanted!r}: use auto, baseline, v3 or v4")
    return wanted


def _choose_isa() -> str:
    wanted = _wanted()
    if wanted == "auto":
        return SUPPORTED[0]
    if wanted not in SUPPORTED:
        what = {"v3": "AVX2/FMA (x86-64-v3)", "v4": "AVX-512 (x86-64-v4)"}[wanted]
        raise ImportError(f"DECOLLA_KERNELS={wanted} but this CPU lacks {what}")
    return wanted


ISA = _choose_isa()


def load(name: str):
    """The compiled kernel module `name` for this CPU: the build of level ISA, or (when
    that build is missing and the level was not forced) the next level down; under time
    dilation (decolla.emulation) a copy whose calls are dilated."""
    return emulation.wrap_module(_load(name))


def _load(name: str):
    forced = _wanted() != "auto"
    levels = _LEVELS[_LEVELS.index(ISA):]
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
