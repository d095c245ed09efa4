"""Build DeColla's Cython kernels into decolla.kernels.* extension modules.

Environment switches:
  DECOLLA_OPENMP=auto|1|0   auto (default): use OpenMP when the compiler has it;
                            1: require it and fail loudly when missing; 0: never.
  DECOLLA_NATIVE=1          add -march=native (only for builds made on the device itself).
"""
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


def _extensions():
    omp = _openmp_flags()
    compile_args = ["-O3", "-ffast-math" if os.environ.get("DECOLLA_FAST_MATH") else "-fno-math-errno"]
    compile_args += omp
    if os.environ.get("DECOLLA_NATIVE") == "1":
        compile_args.append("-march=native")
    exts = []
    for pyx in sorted(glob("kernels/*.pyx")):
        mod = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(Extension(
            f"decolla.kernels.{mod}", [pyx],
            include_dirs=[numpy.get_include()],
            extra_compile_args=compile_args,
            extra_link_args=list(omp),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        ))
    return cythonize(exts, language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
        "initializedcheck": False,
    })


setup(
    ext_modules=_extensions(),
    package_dir={"decolla.policy": "policy"},
)
