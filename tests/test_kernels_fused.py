"""The fused inverted-residual kernel (kernels/fused.pyx) of every ISA build against the
numpy reference, and bit for bit against the same build's separate layer kernels."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decolla import reference
from tests.test_kernels_isa import BUILDS, build, close, per_build, rand

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def packed(gemm, w):
    nr = gemm.PACK_NR
    wpk = np.empty(((w.shape[1] + nr - 1) // nr, w.shape[0], nr), np.float32)
    gemm.pack_pw(w, 0, w.shape[1], wpk)
    return wpk


def run_case(isa, suffix, h, w, cin, ce, cout, stride, residual, expand, seed, tile=0):
    fused, gemm, dw = (build(isa, suffix, n) for n in ("fused", "gemm", "dwconv"))
    rng = np.random.default_rng(seed)
    if not expand:
        ce = cin
    x = rand(rng, h, w, cin)
    we, be = rand(rng, cin, ce), rand(rng, ce)
    wd, bd = rand(rng, 3, 3, ce), rand(rng, ce)
    wp, bp = rand(rng, ce, cout), rand(rng, cout)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    # the reference, layer by layer
    e = np.clip(reference.pwconv(x, we, be), 0, 6).astype(np.float32) if expand else x
    d = np.clip(reference.dwconv3x3(e, wd, bd, stride), 0, 6).astype(np.float32)
    want = reference.pwconv(d, wp, bp) + (x if residual else 0)
    got = np.full((ho, wo, cout), np.nan, np.float32)
    fused.inverted_residual(x, packed(gemm, we) if expand else None, be if expand else None,
                            wd, bd, packed(gemm, wp), bp, got, stride, residual, tile)
    close(got, want)
    # the same build's separate kernels give the same bits
    if expand:
        e = np.empty((h, w, ce), np.float32)
        gemm.pwconv_packed(x, packed(gemm, we), be, e, 0, 0, True)
    d = np.empty((ho, wo, ce), np.float32)
    dw.dwconv3x3(np.ascontiguousarray(e), wd, bd, d, stride, 0, 0, 0, 0, h, True, 1)
    sep = np.empty((ho, wo, cout), np.float32)
    gemm.pwconv_packed(d, packed(gemm, wp), bp, sep, 0, 0, False, x if residual else None)
    np.testing.assert_array_equal(got, sep)


@per_build
@SETTINGS
@given(h=st.integers(1, 12), w=st.integers(1, 20), cin=st.integers(1, 20),
       ce=st.integers(1, 70), cout=st.integers(1, 40), stride=st.sampled_from([1, 2]),
       expand=st.booleans(), residual=st.booleans(), seed=st.integers(0, 2**31 - 1),
       tile=st.integers(0, 6))
def test_fused_block_matches_reference(isa, suffix, h, w, cin, ce, cout, stride, expand,
                                       residual, seed, tile):
    """Any tile of output rows (0: automatic) gives the same bits."""
    if residual:
        stride, cout = 1, cin
    run_case(isa, suffix, h, w, cin, ce, cout, stride, residual, expand, seed, tile)


@per_build
@pytest.mark.parametrize("tile", [0, 1, 3])
@pytest.mark.parametrize("h, cin, ce, cout, stride, residual", [
    (56, 24, 144, 24, 1, True), (56, 24, 144, 32, 2, False), (14, 64, 384, 64, 1, True),
    (7, 160, 960, 160, 1, True), (28, 32, 192, 64, 2, False)])
def test_fused_mobilenet_blocks(isa, suffix, h, cin, ce, cout, stride, residual, tile):
    run_case(isa, suffix, h, h, cin, ce, cout, stride, residual, True, h * ce, tile)


def test_fused_refuses_bad_shapes():
    isa, suffix = BUILDS[0]
    fused, gemm = build(isa, suffix, "fused"), build(isa, suffix, "gemm")
    rng = np.random.default_rng(0)
    x, we, wd, wp = rand(rng, 4, 4, 8), rand(rng, 8, 16), rand(rng, 3, 3, 16), rand(rng, 16, 8)
    b16, b8 = rand(rng, 16), rand(rng, 8)
    args = (x, packed(gemm, we), b16, wd, b16, packed(gemm, wp), b8)
    with pytest.raises(ValueError, match="stride"):
        fused.inverted_residual(*args, np.empty((4, 4, 8), np.float32), 3, False)
    with pytest.raises(ValueError, match="height or width"):
        fused.inverted_residual(*args, np.empty((4, 4, 8), np.float32), 2, False)
    with pytest.raises(ValueError, match="residual"):
        fused.inverted_residual(*args, np.empty((2, 2, 8), np.float32), 2, True)
    with pytest.raises(ValueError, match="expand weight"):
        fused.inverted_residual(x, None, None, wd, b16, packed(gemm, wp), b8,
                                np.empty((4, 4, 8), np.float32), 1, False)
