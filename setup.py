"""Build DeColla's Cython kernels into decolla.kernels.* extension modules.

Environment switches:
  DECOLLA_OPENMP=auto|1|0   auto (default): use OpenMP when the compiler has it;
                            1: require it and fail loudly when missing; 0: never.
  DECOLLA_NATIVE=1          add -march=native (only for builds made on the device itself).
  DECOLLA_X86_V3=0          on x86-64, skip the AVX2/FMA build of every kernel.
  DECOLLA_X86_V4=0          on x86-64, skip the AVX-512 build of every kernel.
  DECOLLA_ARM_NEON=0        on aarch64, skip the NEON build of every kernel.

On x86-64 every kernel is built three times: `<name>` for the baseline ISA (SSE2, runs
anywhere), `<name>_v3` with -march=x86-64-v3 (AVX2 + FMA, 2-4x faster loops) and
`<name>_v4` with -march=x86-64-v4 -mprefer-vector-width=512 (AVX-512 F/BW/CD/DQ/VL:
16-float vectors, 32 vector registers). decolla.kernels picks the best build at import
time that the CPU has the features for, so no build ever raises SIGILL on an older CPU.

On aarch64 every kernel is built twice: `<name>` (generic ARMv8-A C, what gcc vectorises
by itself) and `<name>_neon`, tuned for the Cortex-A72 (Raspberry Pi 4), with the NEON
intrinsic kernels of kernels/*_neon.h (-DDECOLLA_NEON): ARMv8.0 only, no SVE and no
ARMv8.2 fp16 arithmetic, so it runs on every aarch64 CPU.
"""
import platform
import re
import shutil
import os
import subprocess
import sys
import tempfile
from glob import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _compiler_has_openmp() -> bool:
    """Try to compile and link a tiny OpenMP program with the default C compiler."""
    cc = os.environ.get("CC", "cc")
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.c")
        with open(path, "w") as fh:
            fh.write(src)
        result = subprocess.run([cc, "-fopenmp", path, "-o", os.path.join(tmp, "t")],
                                capture_output=True)
        return result.returncode == 0


def _openmp_flags() -> list[str]:
    wanted = os.environ.get("DECOLLA_OPENMP", "auto").lower()
    if wanted in ("0", "no", "off") or sys.platform != "linux":
        if wanted in ("1", "yes", "on"):
            raise SystemExit("DECOLLA_OPENMP=1 but OpenMP is only supported on Linux builds")
        return []
    if _compiler_has_openmp():
        return ["-fopenmp"]
    if wanted in ("1", "yes", "on"):
        raise SystemExit("DECOLLA_OPENMP=1 but the C compiler cannot build OpenMP code "
                         "(install libgomp / a compiler with -fopenmp)")
    print("warning: building DeColla kernels without OpenMP (compiler lacks -fopenmp)",
          file=sys.stderr)
    return []


def _x86_variant_wanted(level: str) -> bool:
    if os.environ.get(f"DECOLLA_X86_{level}", "1").lower() in ("0", "no", "off"):
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform == "linux"


def _neon_variant_wanted() -> bool:
    if os.environ.get("DECOLLA_ARM_NEON", "1").lower() in ("0", "no", "off"):
        return False
    return platform.machine().lower() in ("aarch64", "arm64") and sys.platform == "linux"


# The NEON build's flags beside the common ones (tools/neon_asm_check.py compiles the
# NEON headers with the same).
NEON_FLAGS = ["-march=armv8-a", "-mtune=cortex-a72", "-DDECOLLA_NEON=1"]


def _variant_source(pyx: str, name: str) -> str:
    """A copy of `pyx` under another module name (Cython names PyInit_ after the file)."""
    os.makedirs(os.path.join("build", "kernels_v3"), exist_ok=True)
    dst = os.path.join("build", "kernels_v3", name + ".pyx")   # every variant's copy
    if not os.path.exists(dst) or open(dst).read() != open(pyx).read():
        shutil.copyfile(pyx, dst)
    return dst


def _headers(pyx: str) -> list[str]:
    """The kernels/*.h that `pyx` and the .pxi files it includes name: a change to one
    rebuilds the modules that include it, and only those."""
    text = open(pyx).read()
    for pxi in re.findall(r'^include "(\w+\.pxi)"', text, re.M):
        text += open(os.path.join("kernels", pxi)).read()
    return sorted(h for h in glob("kernels/*.h") if f'"{os.path.basename(h)}"' in text)


def _extensions():
    omp = _openmp_flags()
    compile_args = ["-O3", "-ffast-math" if os.environ.get("DECOLLA_FAST_MATH") else "-fno-math-errno"]
    compile_args += omp
    if os.environ.get("DECOLLA_NATIVE") == "1":
        compile_args.append("-march=native")
    variants = [("", compile_args)]
    if _x86_variant_wanted("V3"):
        variants.append(("_v3", compile_args + ["-march=x86-64-v3"]))
    if _x86_variant_wanted("V4"):
        # gcc's x86-64-v4 tuning prefers 256-bit vectors; the kernels' channel loops
        # (multiples of 16 channels) want zmm.
        variants.append(("_v4", compile_args + ["-march=x86-64-v4",
                                                "-mprefer-vector-width=512"]))
    if _neon_variant_wanted():
        variants.append(("_neon", compile_args + NEON_FLAGS))
    exts = []
    for pyx in sorted(glob("kernels/*.pyx")):
        mod = os.path.splitext(os.path.basename(pyx))[0]
        for suffix, args in variants:
            src = pyx if not suffix else _variant_source(pyx, mod + suffix)
            exts.append(Extension(
                f"decolla.kernels.{mod}{suffix}", [src],
                include_dirs=[numpy.get_include(), "kernels"],
                depends=_headers(pyx),
                extra_compile_args=args,
                extra_link_args=list(omp),
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            ))
    return cythonize(exts, language_level=3, include_path=["kernels"], compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
        "initializedcheck": False,
    })


setup(
    ext_modules=_extensions(),
    package_dir={"decolla.policy": "policy"},
)
