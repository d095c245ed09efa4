"""Run a process as on an AVX2-only host: AVX-512 and AMX hidden from CPUID.

bench/cpuid_mask.c, loaded with LD_PRELOAD, turns on Linux's CPUID faulting (x86-64 CPUs
with the `cpuid_fault` flag) and answers every CPUID with the AVX-512/AMX bits cleared,
so onnxruntime (MLAS), OpenBLAS and torch (oneDNN, ATen) pick their AVX2 kernels, as on
a CPU without AVX-512. `env()` is the environment of such a process; the shim is built
with the system C compiler, once per source version, into a cache directory.

Not hidden: /proc/cpuinfo (decolla.kernels still sees AVX-512: force DECOLLA_KERNELS)
and glibc's own string functions, chosen before any LD_PRELOAD constructor runs.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpuid_mask.c")
LABEL = "AVX-512 hidden by CPUID faulting"
# Also tell each library directly, where it has a switch for it.
_PINS = {"OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2",
         "ONEDNN_MAX_CPU_ISA": "AVX2"}


def unavailable() -> str | None:
    """Why the shim cannot run here, or None."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return "CPUID faulting needs Linux on x86-64"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "cpuid_fault" not in flags:
        return "this CPU (or hypervisor) has no cpuid_fault"
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        return "no C compiler to build the shim"
    return None


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "decolla")


def build() -> str:
    """Path of the compiled shim (built on first use; RuntimeError if it cannot run)."""
    why = unavailable()
    if why:
        raise RuntimeError(f"cannot hide AVX-512: {why}")
    with open(SOURCE, "rb") as fh:
        tag = hashlib.sha256(fh.read()).hexdigest()[:12]
    path = os.path.join(_cache_dir(), f"cpuid_mask-{tag}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-shared", "-fPIC", "-o", tmp,
                        SOURCE, "-ldl"], check=True)
        os.replace(tmp, path)   # atomic: concurrent builders each leave a whole file
    return path


def env(base: dict | None = None) -> dict:
    """`base` (default os.environ) with the shim preloaded and the AVX2 pins set."""
    e = dict(os.environ if base is None else base)
    pre = e.get("LD_PRELOAD", "")
    e["LD_PRELOAD"] = f"{build()} {pre}".strip()
    e.update(_PINS)
    return e


def active() -> bool:
    """Whether this process runs under the shim."""
    return any(os.path.basename(p).startswith("cpuid_mask-")
               for p in os.environ.get("LD_PRELOAD", "").split())
