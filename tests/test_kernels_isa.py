"""Every ISA build of the kernels (baseline, x86-64-v3, x86-64-v4, aarch64 NEON) against
the numpy reference, called directly (decolla.ops uses only the build picked for this CPU), and
the build choice at import (DECOLLA_KERNELS)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decolla import kernels, reference

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-5
BUILDS = [("baseline", ""), ("v3", "_v3"), ("v4", "_v4"), ("neon", "_neon")]
SUFFIX = dict(BUILDS)


def close(got, want):
    """Error relative to the magnitude of the expected tensor (fp32 vs fp64 reference)."""
    want = np.asarray(want, dtype=np.float64)
    tol = RTOL * max(1.0, float(np.abs(want).max(initial=0.0)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def build(isa: str, suffix: str, name: str):
    if not kernels.supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} build")
    try:
        return importlib.import_module(f"decolla.kernels.{name}{suffix}")
    except ImportError:
        if isa == "baseline" or sys.platform != "linux":
            pytest.skip(f"kernel build {name}{suffix} not present")
        raise   # a Linux build makes every variant of its CPU's family: a missing one is a bug


per_build = pytest.mark.parametrize("isa, suffix", BUILDS, ids=[b[0] for b in BUILDS])


# --------------------------------------------------------------------------- packed pwconv

@per_build
@SETTINGS
@given(rows=st.integers(1, 9), w=st.integers(1, 9), cin=st.integers(0, 70),
       cout=st.integers(1, 100), data=st.data())
def test_packed_pwconv_matches_reference(isa, suffix, rows, w, cin, cout, data):
    """Block heights 1..12 and their tails (M = 1..81 pixels), panels of 16 and 32
    channels and their tails, channel windows, input row offsets, residual offsets."""
    gemm = build(isa, suffix, "gemm")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    c0 = data.draw(st.integers(0, cout - 1))
    c1 = data.draw(st.integers(c0 + 1, cout))
    xr0 = data.draw(st.integers(0, 2))
    relu6 = data.draw(st.booleans())
    threads = data.draw(st.sampled_from([1, 2]))
    x, wt, b = rand(rng, rows + xr0 + 1, w, cin), rand(rng, cin, cout), rand(rng, cout)
    want = reference.pwconv(x[xr0:xr0 + rows], wt, b)[..., c0:c1]
    if relu6:
        want = np.clip(want, 0, 6)
    res, rr0, rc0 = None, 0, 0
    if data.draw(st.booleans()):
        rr0, rc0 = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5))
        # exactly as many residual channels as needed: masked loads must stop at its end
        res = rand(rng, rows + rr0, w, c1 - c0 + rc0)
        want = want + res[rr0:rr0 + rows, :, rc0:]
    nr = gemm.PACK_NR
    wpk = np.empty(((c1 - c0 + nr - 1) // nr, cin, nr), np.float32)
    gemm.pack_pw(wt, c0, c1, wpk)
    got = np.full((rows, w, c1 - c0), np.nan, np.float32)
    gemm.pwconv_packed(x, wpk, b, got, c0, xr0, relu6, res, rr0, rc0, threads)
    close(got, want)
    # the BLAS path of the same build agrees
    blas = np.full_like(got, np.nan)
    gemm.pwconv(x, wt, b, blas, c0, xr0, relu6, res, rr0, rc0, threads)
    close(blas, want)


@per_build
def test_packed_pwconv_layer_shapes(isa, suffix):
    """MobileNetV2-like shapes: many full 12 x 32 blocks, K up to 960."""
    gemm = build(isa, suffix, "gemm")
    rng = np.random.default_rng(11)
    for h, w, cin, cout in [(14, 14, 96, 576), (7, 7, 960, 160), (28, 28, 24, 144),
                            (7, 7, 320, 1280), (56, 56, 16, 24)]:
        x, wt, b, r = rand(rng, h, w, cin), rand(rng, cin, cout), rand(rng, cout), \
            rand(rng, h, w, cout)
        nr = gemm.PACK_NR
        wpk = np.empty(((cout + nr - 1) // nr, cin, nr), np.float32)
        gemm.pack_pw(wt, 0, cout, wpk)
        got = np.empty((h, w, cout), np.float32)
        gemm.pwconv_packed(x, wpk, b, got, 0, 0, False, r, 0, 0, 1)
        close(got, reference.pwconv(x, wt, b) + r)


def test_v4_builds_use_the_avx512_kernels():
    gemm = build("v4", "_v4", "gemm")
    assert gemm.AVX512 and gemm.PACK_NR == 32 and gemm.PACK_MR == 12
    assert build("v4", "_v4", "dwconv").AVX512
    v3 = build("v3", "_v3", "gemm")
    assert not v3.AVX512 and v3.PACK_NR == 16
    assert not build("v3", "_v3", "dwconv").AVX512


def test_neon_builds_use_the_neon_kernels():
    gemm = build("neon", "_neon", "gemm")
    assert gemm.NEON and not gemm.AVX512 and gemm.PACK_NR == 8 and gemm.PACK_MR == 8
    assert build("neon", "_neon", "dwconv").NEON
    half = build("neon", "_neon", "half")
    assert half.NEON and half.HARDWARE and not half.F16C
    plain = build("baseline", "", "gemm")
    assert not plain.NEON and not build("baseline", "", "dwconv").NEON


# --------------------------------------------------------------------------- depthwise

@per_build
@SETTINGS
@given(h=st.integers(1, 12), w=st.integers(1, 30), c=st.integers(1, 70),
       stride=st.sampled_from([1, 2]), data=st.data())
def test_dwconv_matches_reference(isa, suffix, h, w, c, stride, data):
    """Row and channel windows of the input and output (rows of zero padding, channel
    tails of 1..15); the 4-pixel path (AVX-512: the run of interior pixels) equals the
    one-pixel path bit for bit."""
    dw = build(isa, suffix, "dwconv")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    x, wt, b = rand(rng, h, w, c), rand(rng, 3, 3, c), rand(rng, c)
    relu6 = data.draw(st.booleans())
    full = reference.dwconv3x3(x, wt, b, stride)
    if relu6:
        full = np.clip(full, 0, 6)
    ho, wo = full.shape[:2]
    r0 = data.draw(st.integers(0, ho - 1))
    r1 = data.draw(st.integers(r0 + 1, ho))
    c0 = data.draw(st.integers(0, c - 1))
    c1 = data.draw(st.integers(c0 + 1, c))
    lo = max(0, r0 * stride - 1)
    hi = min(h, (r1 - 1) * stride + 2)
    win = np.ascontiguousarray(x[lo:hi])
    threads = data.draw(st.sampled_from([1, 2]))
    outs = []
    for quad in (True, False):
        out = np.full((r1 - r0, wo, c1 - c0), np.nan, np.float32)
        dw.dwconv3x3(win, wt, b, out, stride, c0, c0, r0, lo, h, relu6, threads, quad)
        outs.append(out)
    close(outs[0], full[r0:r1, :, c0:c1])
    np.testing.assert_array_equal(outs[0], outs[1])


# --------------------------------------------------------------------------- the choice

def _isa_with(env_value: str | None):
    env = dict(os.environ)
    env.pop("DECOLLA_KERNELS", None)
    if env_value is not None:
        env["DECOLLA_KERNELS"] = env_value
    code = ("from decolla import kernels, ops; "
            "print(kernels.ISA, ops._gemm.__name__.rsplit('.', 1)[1], ops.PACKED_MAX_PIXELS)")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def test_default_is_the_best_supported_build():
    out = _isa_with(None)
    assert out.returncode == 0, out.stderr
    isa, mod, packed = out.stdout.split()
    assert isa == kernels.SUPPORTED[0]
    assert mod == "gemm" + SUFFIX[isa]
    assert (int(packed) > 0) == (isa != "baseline")   # the packed kernel in v3, v4, neon


@pytest.mark.parametrize("level", ["baseline", "v3", "v4", "neon"])
def test_forcing_a_build(level):
    out = _isa_with(level)
    if kernels.supports(level):
        assert out.returncode == 0, out.stderr
        isa, mod, _ = out.stdout.split()
        assert isa == level
        assert mod == "gemm" + SUFFIX[level]
    else:
        assert out.returncode != 0
        assert f"DECOLLA_KERNELS={level} but this CPU lacks" in out.stderr


def test_unknown_build_is_refused():
    out = _isa_with("v5")
    assert out.returncode != 0
    assert "use auto, baseline, v3, v4 or neon" in out.stderr
