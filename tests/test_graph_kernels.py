"""The imported graphs' kernels in every ISA build: activations (act.pyx), depthwise
convolution of any size, stride, padding and dilation on a row window (dwconvk.pyx), max
pooling (pool.pyx) and, in the AVX-512 build, the dense convolution read straight from its
input (gemm.conv_packed), against numpy in float64."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decolla.graph.ops import padded
from tests.test_kernels_isa import SETTINGS, close, per_build, build

ACTS = {
    "RELU": lambda v, a, b: np.maximum(v, 0),
    "CLIP": lambda v, a, b: np.clip(v, a, b),
    "SIGMOID": lambda v, a, b: 1 / (1 + np.exp(-v)),
    "HARDSIGMOID": lambda v, a, b: np.clip(v * a + b, 0, 1),
    "HARDSWISH": lambda v, a, b: v * np.clip(v / 6 + 0.5, 0, 1),
    "SILU": lambda v, a, b: v / (1 + np.exp(-v)),
}


@per_build
@SETTINGS
@given(n=st.integers(0, 70000), fn=st.sampled_from(sorted(ACTS)), scale=st.sampled_from([1, 10, 100]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**31))
def test_activations_match_numpy(isa, suffix, n, fn, scale, threads, seed):
    act = build(isa, suffix, "act")
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    a, b = (-1.5, 6.0) if fn == "CLIP" else (1 / 6, 0.5)
    y = x.copy()
    act.apply(y, getattr(act, fn), a, b, threads)
    want = ACTS[fn](x.astype(np.float64), a, b)
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=1e-30 + 2e-6 * float(np.abs(want).max(initial=0)))


def _windows(x, kh, kw, sh, sw, pads, dh, dw, fill=0.0):
    """(i, j, the input pixels tap (i, j) of every output reads) over x (H, W, C) padded
    with `fill`, float64; None when there is no output."""
    pt, pl, pb, pr = pads
    xp = np.pad(x.astype(np.float64), ((pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    ho = (xp.shape[0] - (kh - 1) * dh - 1) // sh + 1
    wo = (xp.shape[1] - (kw - 1) * dw - 1) // sw + 1
    if ho < 1 or wo < 1:
        return None
    return [(i, j, xp[i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw])
            for i in range(kh) for j in range(kw)]


def _dw_reference(x, w, b, sh, sw, pads, dh, dw):
    """Depthwise conv of the whole map x (H, W, C), float64."""
    taps = _windows(x, w.shape[0], w.shape[1], sh, sw, pads, dh, dw)
    if taps is None:
        return np.zeros((0, 0, x.shape[2]))
    return sum(v * w[i, j] for i, j, v in taps) + b


@per_build
@SETTINGS
@given(h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 100), k=st.sampled_from([1, 2, 3, 5, 7]),
       s=st.sampled_from([1, 2, 3]), d=st.sampled_from([1, 2]), relu6=st.booleans(),
       act=st.sampled_from([None, "HARDSWISH", "SILU", "HARDSIGMOID"]), data=st.data())
def test_depthwise_any_size_on_a_row_window_matches_numpy(isa, suffix, h, w, c, k, s, d, relu6,
                                                          act, data):
    dwk = build(isa, suffix, "dwconvk")
    pads = tuple(data.draw(st.integers(0, k)) for _ in range(4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x = rng.standard_normal((h, w, c)).astype(np.float32)
    wt = rng.standard_normal((k, k, c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    full = _dw_reference(x, wt, b, s, s, pads, d, d)
    if full.shape[0] < 1 or full.shape[1] < 1:
        return
    if relu6:
        full = np.clip(full, 0, 6)
    elif act:
        full = ACTS[act](full, 1 / 6, 0.5)
    r0 = data.draw(st.integers(0, full.shape[0] - 1))
    r1 = data.draw(st.integers(r0 + 1, full.shape[0]))
    lo = max(0, r0 * s - pads[0])                          # the input rows the strip reads
    hi = min(h, (r1 - 1) * s - pads[0] + (k - 1) * d + 1)
    window = np.ascontiguousarray(x[lo:max(lo, hi)])
    out = np.empty((r1 - r0,) + full.shape[1:], np.float32)
    code = -1 if relu6 or not act else getattr(build(isa, suffix, "act"), act)
    dwk.dwconv(window, wt, b, out, r0, lo, h, s, s, pads[0], pads[1], d, d, relu6,
               data.draw(st.sampled_from([1, 2])), code, 1 / 6, 0.5)
    close(out, full[r0:r1])


def _row_strip(data, full, h, s, pt, span):
    """A strip of output rows [r0, r1) of `full` and the input rows [lo, hi) it reads."""
    r0 = data.draw(st.integers(0, full.shape[0] - 1))
    r1 = data.draw(st.integers(r0 + 1, full.shape[0]))
    return r0, r1, max(0, r0 * s - pt), min(h, (r1 - 1) * s - pt + span)


@per_build
@SETTINGS
@given(h=st.integers(1, 30), w=st.integers(1, 30), c=st.integers(1, 40),
       n=st.integers(1, 70), k=st.sampled_from([(1, 1), (3, 3), (5, 5), (7, 7), (2, 3)]),
       s=st.sampled_from([1, 2, 3]), d=st.sampled_from([1, 2]), act=st.sampled_from([0, 1, 2, 3, 4]),
       data=st.data())
def test_dense_conv_on_the_packed_kernel_matches_numpy(isa, suffix, h, w, c, n, k, s, d, act,
                                                       data):
    """gemm.conv_packed (read in place in the AVX-512 build, by patches elsewhere): any
    kernel, stride, padding, dilation, a strip of output rows from its input window padded
    as decolla.graph.ops pads it, a window of output channels, no activation, ReLU6 or
    (where the build fuses them) ReLU, hard-swish, SiLU, 1 or 2 threads."""
    gemm = build(isa, suffix, "gemm")
    if act > gemm.ACT_RELU6 and not gemm.RELU_FUSED:
        act = gemm.ACT_NONE
    (kh, kw) = k
    pads = tuple(data.draw(st.integers(0, 3)) for _ in range(4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x = rng.standard_normal((h, w, c)).astype(np.float32)
    wt = rng.standard_normal((kh, kw, c, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    taps = _windows(x, kh, kw, s, s, pads, d, d)
    if taps is None:
        return
    full = sum(v @ wt[i, j].astype(np.float64) for i, j, v in taps) + b
    full = {0: full, 1: np.clip(full, 0, 6), 2: np.maximum(full, 0),
            3: ACTS["HARDSWISH"](full, 0, 0), 4: ACTS["SILU"](full, 0, 0)}[act]
    c0 = data.draw(st.integers(0, n - 1))
    c1 = data.draw(st.integers(c0 + 1, n))
    r0, r1, lo, hi = _row_strip(data, full, h, s, pads[0], (kh - 1) * d + 1)
    xp = np.ascontiguousarray(padded(np.ascontiguousarray(x[lo:max(lo, hi)]), lo, h,
                                     r0 * s - pads[0], (r1 - 1) * s - pads[0] + (kh - 1) * d + 1,
                                     pads[1], pads[3], 0.0))
    nr = gemm.PACK_NR
    wpk = np.empty(((c1 - c0 + nr - 1) // nr, kh * kw * c, nr), np.float32)
    gemm.pack_pw(wt.reshape(-1, n), c0, c1, wpk)
    out = np.empty((r1 - r0, full.shape[1], c1 - c0), np.float32)
    gemm.conv_packed(xp, wpk, b[c0:c1].copy(), out, kh, kw, s, s, d, d, act,
                     data.draw(st.sampled_from([1, 2])))
    close(out, full[r0:r1, :, c0:c1])


@per_build
@SETTINGS
@given(h=st.integers(1, 14), w=st.integers(1, 14), c=st.integers(1, 40), k=st.sampled_from([1, 2, 3, 5]),
       s=st.sampled_from([1, 2, 3]), d=st.sampled_from([1, 2]), data=st.data())
def test_maxpool_on_a_row_window_matches_numpy(isa, suffix, h, w, c, k, s, d, data):
    """Padding (less than the kernel, as ONNX allows, plus ceil-mode's extra end rows and
    columns), a strip of output rows from its input window, 1 or 2 threads."""
    pool = build(isa, suffix, "pool")
    pads = tuple(data.draw(st.integers(0, k - 1)) for _ in range(2)) + \
        tuple(data.draw(st.integers(0, k)) for _ in range(2))
    x = np.random.default_rng(data.draw(st.integers(0, 2**31))).standard_normal((h, w, c))
    x = x.astype(np.float32)
    taps = _windows(x, k, k, s, s, pads, d, d, fill=-np.inf)
    if taps is None:
        return
    full = np.max([v for _, _, v in taps], axis=0)
    r0, r1, lo, hi = _row_strip(data, full, h, s, pads[0], (k - 1) * d + 1)
    out = np.empty((r1 - r0,) + full.shape[1:], np.float32)
    pool.maxpool(np.ascontiguousarray(x[lo:max(lo, hi)]), out, r0, lo, h, k, k, s, s, pads[0],
                 pads[1], d, d, data.draw(st.sampled_from([1, 2])))
    assert np.array_equal(out, full[r0:r1])


@per_build
def test_packed_pwconv_relu_epilogue_where_the_build_has_it(isa, suffix):
    """ACT_RELU in the AVX-512 packed kernel's epilogue; the other builds refuse it (and
    hard-swish and SiLU, which tests above check in the epilogue)."""
    gemm = build(isa, suffix, "gemm")
    rng = np.random.default_rng(3)
    x, wt = rng.standard_normal((5, 7, 19)).astype(np.float32), rng.standard_normal((19, 45)).astype(np.float32)
    b = rng.standard_normal(45).astype(np.float32)
    nr = gemm.PACK_NR
    wpk = np.empty(((45 + nr - 1) // nr, 19, nr), np.float32)
    gemm.pack_pw(wt, 0, 45, wpk)
    out = np.empty((5, 7, 45), np.float32)
    if not gemm.RELU_FUSED:
        with pytest.raises(ValueError, match="activation code 2"):
            gemm.pwconv_packed(x, wpk, b, out, 0, 0, gemm.ACT_RELU)
        return
    gemm.pwconv_packed(x, wpk, b, out, 0, 0, gemm.ACT_RELU)
    close(out, np.maximum(x.astype(np.float64) @ wt + b, 0))


def _act64(fn, v, a, b):
    return v if fn == "NONE" else ACTS[fn](v, a, b)


@per_build
@SETTINGS
@given(h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 70), r=st.integers(1, 20),
       fn1=st.sampled_from(["NONE", "RELU", "SILU", "HARDSWISH"]),
       fn2=st.sampled_from(["NONE", "SIGMOID", "HARDSIGMOID"]), seed=st.integers(0, 2**31),
       data=st.data())
def test_squeeze_excitation_gate_and_scale_match_numpy(isa, suffix, h, w, c, r, fn1, fn2,
                                                       seed, data):
    se = build(isa, suffix, "se")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((h, w, c)).astype(np.float32)
    w1, b1 = rng.standard_normal((c, r)).astype(np.float32), rng.standard_normal(r).astype(np.float32)
    w2, b2 = rng.standard_normal((r, c)).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    p1, p2 = (0.0, 0.0), (1 / 6, 0.5)
    code = lambda fn: se.NONE if fn == "NONE" else getattr(se, fn)  # noqa: E731
    g = np.empty(c, np.float32)
    se.gate(x, w1, b1, code(fn1), *p1, w2, b2, code(fn2), *p2, g, np.empty(c + r, np.float32))
    x64 = x.astype(np.float64)
    hid = _act64(fn1, x64.mean(axis=(0, 1)) @ w1 + b1, *p1)
    want = _act64(fn2, hid @ w2 + b2, *p2)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))
    r0 = data.draw(st.integers(0, h - 1))
    r1 = data.draw(st.integers(r0, h))
    out = np.empty((r1 - r0, w, c), np.float32)
    se.scale(x, r0, g, out)
    close(out, x64[r0:r1] * g)
    se.scale(out, 0, g, out)                      # in place
    close(out, x64[r0:r1] * g.astype(np.float64) ** 2)
    with pytest.raises(ValueError, match="do not fit"):
        se.scale(x, h - r1 + r0 + 1, g, np.empty((r1 - r0 + 1, w, c), np.float32))


@per_build
@SETTINGS
@given(h=st.integers(1, 9), w=st.integers(1, 30), c=st.integers(1, 40), n=st.integers(1, 70),
       left=st.integers(0, 9), right=st.integers(0, 9), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31))
def test_convs_write_a_channel_window_of_a_wider_tensor(isa, suffix, h, w, c, n, left, right,
                                                        threads, seed):
    """pwconv (BLAS), pwconv_packed and conv_packed into out[:, :, left:left+n] of a
    (h, w, left + n + right) tensor (a concat's branch): its channels as into a tensor of
    their own, the others untouched; rows that are not W pixels apart are refused."""
    gemm = build(isa, suffix, "gemm")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((h, w, c)).astype(np.float32)
    wt = rng.standard_normal((c, n)).astype(np.float32)
    w3 = rng.standard_normal((3, 3, c, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    nr = gemm.PACK_NR
    wpk = np.empty(((n + nr - 1) // nr, c, nr), np.float32)
    wpk3 = np.empty(((n + nr - 1) // nr, 9 * c, nr), np.float32)
    gemm.pack_pw(wt, 0, n, wpk)
    gemm.pack_pw(w3.reshape(-1, n), 0, n, wpk3)
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    calls = [lambda o: gemm.pwconv(x, wt, b, o, 0, 0, True, None, 0, 0, threads),
             lambda o: gemm.pwconv_packed(x, wpk, b, o, 0, 0, True, None, 0, 0, threads),
             lambda o: gemm.conv_packed(xp, wpk3, b, o, 3, 3, 1, 1, 1, 1, gemm.ACT_RELU6,
                                        threads)]
    for call in calls:
        alone = np.empty((h, w, n), np.float32)
        call(alone)
        wide = np.full((h, w, left + n + right), 7.0, np.float32)
        call(wide[:, :, left:left + n])
        assert np.array_equal(wide[:, :, left:left + n], alone)
        assert (wide[:, :, :left] == 7).all() and (wide[:, :, left + n:] == 7).all()
        if h > 1 and w > 1:
            with pytest.raises(ValueError, match="neither C-contiguous nor a channel window"):
                call(np.empty((2 * h, w, n), np.float32)[::2])
