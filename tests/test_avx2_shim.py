"""bench.avx2_shim: a process under bench/cpuid_mask.c reads no AVX-512 from CPUID, still
computes correctly, and still crashes on a real segmentation fault."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from bench import avx2_shim
from bench import kernels as bk

pytestmark = pytest.mark.skipif(avx2_shim.unavailable() is not None,
                                reason=f"shim unavailable: {avx2_shim.unavailable()}")

PROBE = r"""
#include <cpuid.h>
#include <stdio.h>
int main(void) {
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    printf("%u %u %u\n", (b >> 16) & 1, (d >> 24) & 1, (b >> 5) & 1);  /* AVX512F AMX-TILE AVX2 */
    return 0;
}
"""


def _cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as fh:
        return set(next(line for line in fh if line.startswith("flags")).split(":", 1)[1].split())


def _python(code: str, env: dict, *opts: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *opts, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(PROBE)
    subprocess.run(["gcc", "-O2", "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    return str(d / "probe")


def test_cpuid_read_under_the_shim_has_no_avx512(probe):
    flags = _cpuinfo_flags()
    plain = subprocess.run([probe], capture_output=True, text=True, check=True).stdout.split()
    assert plain == [str(int("avx512f" in flags)), str(int("amx_tile" in flags)),
                     str(int("avx2" in flags))]
    shim = subprocess.run([probe], env=avx2_shim.env(), capture_output=True, text=True,
                          check=True).stdout.split()
    assert shim == ["0", "0", plain[2]]            # AVX2 stays


def test_numpy_is_correct_under_the_shim_and_openblas_leaves_avx512():
    code = ("import numpy as np, threadpoolctl\n"
            "rng = np.random.default_rng(0)\n"
            "a = rng.standard_normal((300, 200)).astype(np.float32)\n"
            "b = rng.standard_normal((200, 100)).astype(np.float32)\n"
            "ref = a.astype(np.float64) @ b.astype(np.float64)\n"
            "print(float(np.abs(a @ b - ref).max() / np.abs(ref).max()))\n"
            "print(' '.join(d['architecture'] for d in threadpoolctl.threadpool_info()\n"
            "               if d['internal_api'] == 'openblas'))\n")
    env = avx2_shim.env()
    env.pop("OPENBLAS_CORETYPE")        # OpenBLAS must see the masked CPUID by itself
    out = _python(code, env)
    assert out.returncode == 0, out.stderr
    err, archs = out.stdout.splitlines()
    assert float(err) < 1e-5
    avx512_cores = {"SkylakeX", "Cooperlake", "SapphireRapids"}
    assert archs and not set(archs.split()) & avx512_cores, archs


@pytest.mark.parametrize("opts,code", [
    ((), "import ctypes; ctypes.string_at(0)"),                       # a real fault
    ((), "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"),  # a sent signal
    (("-X", "faulthandler"), "import ctypes; ctypes.string_at(0)"),   # the program's handler
])
def test_other_segfaults_still_crash(opts, code):
    out = _python(code + "\nprint('survived')", avx2_shim.env(), *opts)
    assert out.returncode == -signal.SIGSEGV, (out.returncode, out.stderr)
    assert "survived" not in out.stdout
    if opts:
        assert "Segmentation fault" in out.stderr      # faulthandler was chained to


def test_bench_reruns_v3_under_the_shim_only_where_avx512_would_leak(monkeypatch):
    assert not bk.wants_avx2_baselines("off")
    monkeypatch.setattr(bk, "ISA", "v3")
    assert bk.wants_avx2_baselines("auto") == ("v4" in bk.SUPPORTED)
    monkeypatch.setattr(bk, "ISA", "v4")
    assert not bk.wants_avx2_baselines("auto") and bk.wants_avx2_baselines("on")
    monkeypatch.setenv("LD_PRELOAD", avx2_shim.build())    # already under it: no re-run
    assert not bk.wants_avx2_baselines("on")
