"""Compiled Cython kernels (built from kernels/*.pyx), with run-time ISA dispatch.

On x86-64 every kernel exists twice: `<name>` (baseline SSE2) and `<name>_v3`
(AVX2 + FMA). `load(name)` returns the v3 build when the CPU supports it.
DECOLLA_KERNELS=baseline|v3|auto (default auto) overrides the choice.
"""
from __future__ import annotations

import importlib
import os
import platform

# x86-64-v3 features as /proc/cpuinfo names them (lzcnt is reported as abm).
_V3_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _choose_isa() -> str:
    wanted = os.environ.get("DECOLLA_KERNELS", "auto").lower()
    if wanted not in ("auto", "baseline", "v3"):
        raise ImportError(f"DECOLLA_KERNELS={wanted!r}: use auto, baseline or v3")
    if wanted == "baseline":
        return "baseline"
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    has_v3 = is_x86 and _V3_FLAGS <= _cpu_flags()
    if wanted == "v3" and not has_v3:
        raise ImportError("DECOLLA_KERNELS=v3 but this CPU lacks AVX2/FMA (x86-64-v3)")
    return "v3" if has_v3 else "baseline"


ISA = _choose_isa()


def load(name: str):
    """The compiled kernel module `name` for this CPU."""
    if ISA == "v3":
        try:
            return importlib.import_module(f"decolla.kernels.{name}_v3")
        except ImportError:
            if os.environ.get("DECOLLA_KERNELS", "auto").lower() == "v3":
                raise
    try:
        return importlib.import_module(f"decolla.kernels.{name}")
    except ImportError as exc:
        raise ImportError(f"DeColla kernel module {name!r} is not built: run "
                          f"`pip install --no-build-isolation -e .` ({exc})") from exc
