"""Kernels (decolla.ops) against the numpy reference and torch.nn.functional."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decolla import kernels, ops, reference

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-5


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(got, want):
    """Error relative to the magnitude of the expected tensor (fp32 vs fp64 reference)."""
    want = np.asarray(want, dtype=np.float64)
    tol = RTOL * max(1.0, float(np.abs(want).max(initial=0.0)))
    assert got.shape == want.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def act(y, relu6):
    return np.clip(y, 0, 6) if relu6 else y


@st.composite
def conv_case(draw, depthwise: bool):
    h = draw(st.integers(1, 11))
    w = draw(st.integers(1, 11))
    stride = draw(st.sampled_from([1, 2]))
    cin = draw(st.integers(1, 19)) if depthwise else draw(st.integers(1, 5))
    cout = cin if depthwise else draw(st.integers(1, 13))
    ho = (h - 1) // stride + 1
    c0 = draw(st.integers(0, cout))
    c1 = draw(st.integers(c0, cout))
    r0 = draw(st.integers(0, ho))
    r1 = draw(st.integers(r0, ho))
    extra = draw(st.integers(0, 2))  # window rows beyond the minimum
    return dict(h=h, w=w, stride=stride, cin=cin, cout=cout, c0=c0, c1=c1, r0=r0, r1=r1,
                relu6=draw(st.booleans()), residual=draw(st.booleans()), extra=extra,
                seed=draw(st.integers(0, 2**31 - 1)))


def _window(kind, case, x):
    lo, hi = ops.input_rows_needed(kind, case["stride"], case["r0"], case["r1"], case["h"])
    lo = max(0, lo - case["extra"])
    hi = min(case["h"], hi + case["extra"])
    if lo >= hi:  # empty chunk: any (possibly empty) window will do
        lo, hi = 0, case["h"]
    return np.ascontiguousarray(x[lo:hi]), lo


@SETTINGS
@given(conv_case(depthwise=True))
def test_dwconv_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    x = rand(rng, case["h"], case["w"], case["cin"])
    w, b = rand(rng, 3, 3, case["cin"]), rand(rng, case["cin"])
    full = act(reference.dwconv3x3(x, w, b, case["stride"]), case["relu6"])
    res = rand(rng, *full.shape) if case["residual"] else None
    if res is not None:
        full = full + res
    want = full[case["r0"]:case["r1"], :, case["c0"]:case["c1"]]
    win, lo = _window("dwconv3x3", case, x)
    got = ops.dwconv3x3(win, w, b, case["stride"], relu6=case["relu6"], residual=res,
                        c0=case["c0"], c1=case["c1"], r0=case["r0"], r1=case["r1"],
                        in_row0=lo, in_height=case["h"])
    close(got, want)
    # the same chunk from an input that holds only the chunk's channels
    chan = np.ascontiguousarray(win[..., case["c0"]:case["c1"]])
    if case["c1"] > case["c0"] and chan.shape[2] != case["cin"]:
        got2 = ops.dwconv3x3(chan, w, b, case["stride"], relu6=case["relu6"], residual=res,
                             c0=case["c0"], c1=case["c1"], r0=case["r0"], r1=case["r1"],
                             in_row0=lo, in_height=case["h"])
        np.testing.assert_array_equal(got2, got)


@SETTINGS
@given(conv_case(depthwise=False))
def test_conv3x3_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    x = rand(rng, case["h"], case["w"], case["cin"])
    w, b = rand(rng, 3, 3, case["cin"], case["cout"]), rand(rng, case["cout"])
    full = act(reference.conv3x3(x, w, b, case["stride"]), case["relu6"])
    res = rand(rng, *full.shape) if case["residual"] else None
    if res is not None:
        full = full + res
    want = full[case["r0"]:case["r1"], :, case["c0"]:case["c1"]]
    win, lo = _window("conv3x3", case, x)
    got = ops.conv3x3(win, w, b, case["stride"], relu6=case["relu6"], residual=res,
                      c0=case["c0"], c1=case["c1"], r0=case["r0"], r1=case["r1"],
                      in_row0=lo, in_height=case["h"])
    close(got, want)


@SETTINGS
@given(h=st.integers(1, 9), w=st.integers(1, 9), cin=st.integers(1, 40),
       cout=st.integers(1, 40), data=st.data())
def test_pwconv_matches_reference(h, w, cin, cout, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    c0 = data.draw(st.integers(0, cout))
    c1 = data.draw(st.integers(c0, cout))
    r0 = data.draw(st.integers(0, h))
    r1 = data.draw(st.integers(r0, h))
    relu6 = data.draw(st.booleans())
    x, wt, b = rand(rng, h, w, cin), rand(rng, cin, cout), rand(rng, cout)
    full = act(reference.pwconv(x, wt, b), relu6)
    res = None
    if data.draw(st.booleans()):
        res = rand(rng, h, w, cout)
        full = full + res
        if data.draw(st.booleans()):  # the chunk of the residual instead of all of it
            res = np.ascontiguousarray(res[r0:r1, :, c0:c1])
    lo = data.draw(st.integers(0, r0))
    hi = data.draw(st.integers(r1, h))
    got = ops.pwconv(np.ascontiguousarray(x[lo:hi]), wt, b, relu6=relu6, residual=res, c0=c0,
                     c1=c1, r0=r0, r1=r1, in_row0=lo, in_height=h)
    close(got, full[r0:r1, :, c0:c1])


@SETTINGS
@given(h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 50), data=st.data())
def test_gap_matches_reference(h, w, c, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    c0 = data.draw(st.integers(0, c))
    c1 = data.draw(st.integers(c0, c))
    x = rand(rng, h, w, c)
    close(ops.gap(x, c0=c0, c1=c1), reference.gap(x)[c0:c1])


@SETTINGS
@given(cin=st.integers(1, 300), cout=st.integers(1, 60), relu6=st.booleans(), data=st.data())
def test_linear_matches_reference(cin, cout, relu6, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    c0 = data.draw(st.integers(0, cout))
    c1 = data.draw(st.integers(c0, cout))
    x, w, b = rand(rng, cin), rand(rng, cin, cout), rand(rng, cout)
    close(ops.linear(x, w, b, relu6=relu6, c0=c0, c1=c1),
          act(reference.linear(x, w, b), relu6)[c0:c1])


# --------------------------------------------------------------------------- vs torch

try:
    import torch
    F = torch.nn.functional
except ImportError:  # pragma: no cover - torch is an optional extra
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


def _t(x):
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def _np(y):
    return y[0].permute(1, 2, 0).numpy()


@needs_torch
@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), c=st.integers(1, 70),
       stride=st.sampled_from([1, 2]), seed=st.integers(0, 2**31 - 1))
def test_dwconv_matches_torch(h, w, c, stride, seed):
    rng = np.random.default_rng(seed)
    x, wt, b = rand(rng, h, w, c), rand(rng, 3, 3, c), rand(rng, c)
    want = F.hardtanh(F.conv2d(_t(x), torch.from_numpy(wt.transpose(2, 0, 1)[:, None].copy()),
                               torch.from_numpy(b), stride, 1, 1, c), 0, 6)
    close(ops.dwconv3x3(x, wt, b, stride, relu6=True), _np(want))


@needs_torch
@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), cin=st.integers(1, 8),
       cout=st.integers(1, 40), stride=st.sampled_from([1, 2]), seed=st.integers(0, 2**31 - 1))
def test_conv3x3_matches_torch(h, w, cin, cout, stride, seed):
    rng = np.random.default_rng(seed)
    x, wt, b = rand(rng, h, w, cin), rand(rng, 3, 3, cin, cout), rand(rng, cout)
    want = F.conv2d(_t(x), torch.from_numpy(wt.transpose(3, 2, 0, 1).copy()),
                    torch.from_numpy(b), stride, 1)
    close(ops.conv3x3(x, wt, b, stride), _np(want))


@needs_torch
@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), cin=st.integers(1, 64),
       cout=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_pwconv_gap_linear_match_torch(h, w, cin, cout, seed):
    rng = np.random.default_rng(seed)
    x, wt, b, r = rand(rng, h, w, cin), rand(rng, cin, cout), rand(rng, cout), rand(rng, h, w, cout)
    want = F.conv2d(_t(x), torch.from_numpy(wt.T.copy())[:, :, None, None], torch.from_numpy(b))
    close(ops.pwconv(x, wt, b, residual=r), _np(want) + r)
    close(ops.gap(x), _t(x).mean((2, 3))[0].numpy())
    v = rand(rng, cin)
    close(ops.linear(v, wt, b), F.linear(torch.from_numpy(v), torch.from_numpy(wt.T.copy()),
                                         torch.from_numpy(b)).numpy())


# --------------------------------------------------------------------------- ISA builds, threads

def _variant(name):
    try:
        return importlib.import_module(f"decolla.kernels.{name}")
    except ImportError:
        pytest.skip(f"kernel build {name} not present")


@pytest.mark.parametrize("suffix", ["", "_v3", "_v4", "_neon"])
def test_every_isa_build_matches_reference(suffix):
    isa = suffix[1:] or "baseline"
    if not kernels.supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} build")
    dw, conv, gemm = (_variant(n + suffix) for n in ("dwconv", "conv", "gemm"))
    rng = np.random.default_rng(3)
    x, wd, bd = rand(rng, 9, 7, 37), rand(rng, 3, 3, 37), rand(rng, 37)
    for stride in (1, 2):
        out = np.empty(((9 - 1) // stride + 1, (7 - 1) // stride + 1, 37), np.float32)
        dw.dwconv3x3(x, wd, bd, out, stride, 0, 0, 0, 0, 9, True, 1)
        close(out, np.clip(reference.dwconv3x3(x, wd, bd, stride), 0, 6))
    xs, wc, bc = rand(rng, 9, 7, 3), rand(rng, 3, 3, 3, 20), rand(rng, 20)
    out = np.empty((5, 4, 20), np.float32)
    conv.conv3x3(xs, wc, bc, out, 2, 0, 0, 0, 9, False)
    close(out, reference.conv3x3(xs, wc, bc, 2))
    wp, bp = rand(rng, 37, 50), rand(rng, 50)
    out = np.empty((9, 7, 50), np.float32)
    gemm.pwconv(x, wp, bp, out, 0, 0, False)
    close(out, reference.pwconv(x, wp, bp))
    wpk = np.empty(((50 - 3 + gemm.PACK_NR - 1) // gemm.PACK_NR, 37, gemm.PACK_NR), np.float32)
    gemm.pack_pw(wp, 3, 50, wpk)
    out = np.empty((9, 7, 47), np.float32)
    gemm.pwconv_packed(x, wpk, bp, out, 3, 0, True)
    close(out, np.clip(reference.pwconv(x, wp, bp), 0, 6)[..., 3:])


def test_threads_give_the_same_result():
    rng = np.random.default_rng(4)
    x, w, b = rand(rng, 30, 30, 64), rand(rng, 3, 3, 64), rand(rng, 64)
    wp, bp = rand(rng, 64, 96), rand(rng, 96)
    one = ops.dwconv3x3(x, w, b, 1, relu6=True, threads=1)
    two = ops.dwconv3x3(x, w, b, 1, relu6=True, threads=2)
    np.testing.assert_array_equal(one, two)
    close(ops.pwconv(x, wp, bp, relu6=True, threads=2), ops.pwconv(x, wp, bp, relu6=True))
    assert ops.get_threads() == 1  # a per-call thread count does not change the default
    ops.set_threads(2)
    try:
        assert ops.get_threads() == 2
        np.testing.assert_array_equal(ops.dwconv3x3(x, w, b, 1, relu6=True), one)
    finally:
        ops.set_threads(1)
    with pytest.raises(ValueError, match="threads"):
        ops.set_threads(0)
    with pytest.raises(ValueError, match="threads"):
        ops.dwconv3x3(x, w, b, threads=-1)


def test_out_buffer_is_filled_in_place():
    rng = np.random.default_rng(5)
    x, w, b = rand(rng, 6, 6, 8), rand(rng, 8, 4), rand(rng, 4)
    out = np.full((6, 6, 4), np.nan, np.float32)
    y = ops.pwconv(x, w, b, out=out)
    assert y is out
    close(out, reference.pwconv(x, w, b))


# --------------------------------------------------------------------------- errors

def _dw_args(rng):
    return rand(rng, 8, 8, 4), rand(rng, 3, 3, 4), rand(rng, 4)


@pytest.mark.parametrize("mutate, exc, msg", [
    (lambda a: (a[0].astype(np.float64), a[1], a[2]), TypeError, "x must be float32"),
    (lambda a: (a[0].tolist(), a[1], a[2]), TypeError, "x must be a numpy array"),
    (lambda a: (a[0][0], a[1], a[2]), ValueError, "x must have 3 dimensions"),
    (lambda a: (a[0][:, ::2], a[1], a[2]), ValueError, "C-contiguous"),
    (lambda a: (a[0], a[1][:2].copy(), a[2]), ValueError, r"\(3, 3, C\)"),
    (lambda a: (a[0], a[1], a[2][:3].copy()), ValueError, "bias has 3 values"),
    (lambda a: (a[0][..., :3].copy(), a[1], a[2]), ValueError, "x has 3 channels"),
])
def test_dwconv_bad_arrays(mutate, exc, msg):
    x, w, b = mutate(_dw_args(np.random.default_rng(0)))
    with pytest.raises(exc, match=msg):
        ops.dwconv3x3(x, w, b)


@pytest.mark.parametrize("kw, msg", [
    (dict(stride=3), "stride must be 1 or 2"),
    (dict(c0=2, c1=1), r"channel range \[2, 1\)"),
    (dict(c1=5), r"channel range \[0, 5\)"),
    (dict(c0=-1), "channel range"),
    (dict(r1=9), r"row range \[0, 9\)"),
    (dict(r0=1.5), "r0 must be an int"),
    (dict(in_row0=2, in_height=9), "do not fit"),
    (dict(in_row0=2), r"need input rows \[0, 10\)"),
    (dict(in_height=20, r0=0, r1=10), "need input rows"),
    (dict(out=np.empty((8, 8, 3), np.float32)), "out has shape"),
    (dict(residual=np.empty((8, 7, 4), np.float32)), "residual has shape"),
])
def test_dwconv_bad_arguments(kw, msg):
    x, w, b = _dw_args(np.random.default_rng(0))
    with pytest.raises((ValueError, TypeError), match=msg):
        ops.dwconv3x3(x, w, b, **kw)


def test_window_that_misses_halo_rows_is_refused():
    rng = np.random.default_rng(0)
    x, w, b = _dw_args(rng)
    # output rows [2, 4) need input rows [1, 5); rows [2, 5) miss the top halo row
    with pytest.raises(ValueError, match=r"need input rows \[1, 5\)"):
        ops.dwconv3x3(x[2:5].copy(), w, b, r0=2, r1=4, in_row0=2, in_height=8)
    got = ops.dwconv3x3(x[1:5].copy(), w, b, r0=2, r1=4, in_row0=1, in_height=8)
    close(got, reference.dwconv3x3(x, w, b, 1)[2:4])


def test_out_overlapping_input_is_refused():
    x = np.zeros((4, 4, 8), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        ops.pwconv(x, np.zeros((8, 8), np.float32), np.zeros(8, np.float32), out=x)


def test_shape_mismatches_between_operands():
    z = np.zeros
    with pytest.raises(ValueError, match="x has 3 channels but the weight expects 4"):
        ops.pwconv(z((2, 2, 3), np.float32), z((4, 5), np.float32), z(5, np.float32))
    with pytest.raises(ValueError, match="weight expects 2"):
        ops.conv3x3(z((2, 2, 3), np.float32), z((3, 3, 2, 5), np.float32), z(5, np.float32))
    with pytest.raises(ValueError, match="features but the weight expects"):
        ops.linear(z(3, np.float32), z((4, 5), np.float32), z(5, np.float32))
    with pytest.raises(ValueError, match="x must have 1 dimensions"):
        ops.linear(z((1, 4), np.float32), z((4, 5), np.float32), z(5, np.float32))


def test_input_rows_needed():
    assert ops.input_rows_needed("dwconv3x3", 1, 0, 4, 8) == (0, 5)
    assert ops.input_rows_needed("dwconv3x3", 1, 4, 8, 8) == (3, 8)
    assert ops.input_rows_needed("conv3x3", 2, 0, 56, 112) == (0, 112)
    assert ops.input_rows_needed("conv3x3", 2, 10, 20, 112) == (19, 40)
    assert ops.input_rows_needed("pwconv", 1, 3, 7, 10) == (3, 7)
    assert ops.input_rows_needed("gap", 1, 0, 1, 7) == (0, 7)
    with pytest.raises(ValueError, match="row range"):
        ops.input_rows_needed("dwconv3x3", 2, 0, 5, 8)
    with pytest.raises(ValueError, match="unknown layer kind"):
        ops.input_rows_needed("maxpool", 1, 0, 1, 4)


def test_degenerate_inputs_are_refused():
    z = np.zeros
    with pytest.raises(ValueError, match="no pixels"):
        ops.gap(z((0, 4, 3), np.float32))
    with pytest.raises(ValueError, match="at least one input channel"):
        ops.conv3x3(z((4, 4, 0), np.float32), z((3, 3, 0, 2), np.float32), z(2, np.float32))
    r = z((4, 4, 8), np.float32)
    with pytest.raises(ValueError, match="overlap the residual"):
        ops.pwconv(z((4, 4, 8), np.float32), z((8, 8), np.float32), z(8, np.float32),
                   residual=r, out=r)
    # empty chunks are fine and give empty outputs
    assert ops.pwconv(z((4, 4, 8), np.float32), z((8, 8), np.float32), z(8, np.float32),
                      c0=3, c1=3).shape == (4, 4, 0)
    assert ops.dwconv3x3(z((4, 4, 8), np.float32), z((3, 3, 8), np.float32), z(8, np.float32),
                         r0=2, r1=2).shape == (0, 4, 8)


@pytest.mark.parametrize("stride", [1, 2])
def test_dwconv_four_pixel_path_equals_one_pixel_path(stride):
    rng = np.random.default_rng(stride)
    x, w, b = rand(rng, 7, 23, 20), rand(rng, 3, 3, 20), rand(rng, 20)
    wo = (23 - 1) // stride + 1
    rows = 5 if stride == 1 else 3
    quad, single = (np.empty((rows, wo, 12), np.float32) for _ in range(2))
    for out, use_quad in ((quad, True), (single, False)):
        # output rows [1, 1 + rows), channels [5, 17), of an input of height 7
        ops._dw.dwconv3x3(x, w, b, out, stride, 5, 5, 1, 0, 7, True, 1, use_quad)
    close(quad, np.clip(reference.dwconv3x3(x, w, b, stride), 0, 6)[1:1 + rows, :, 5:17])
    np.testing.assert_array_equal(quad, single)


@pytest.mark.parametrize("block, threads", [(5, 1), (7, 2), (0, 2), (1000, 2)])
def test_pwconv_tiling(block, threads):
    rng = np.random.default_rng(block)
    x, w, b, r = rand(rng, 9, 6, 24), rand(rng, 24, 70), rand(rng, 70), rand(rng, 9, 6, 70)
    out = np.empty((9, 6, 50), np.float32)
    ops._gemm.pwconv(x, w, b, out, 10, 0, True, r, 0, 10, threads, block)
    close(out, (np.clip(reference.pwconv(x, w, b), 0, 6) + r)[..., 10:60])


# --------------------------------------------------------------------------- packed pwconv

@SETTINGS
@given(rows=st.integers(1, 10), w=st.integers(1, 8), cin=st.integers(0, 70),
       cout=st.integers(1, 60), data=st.data())
def test_packed_pwconv_matches_blas(rows, w, cin, cout, data):
    """The packed-weight kernel against the BLAS one: every epilogue, channel windows,
    input row offsets and residual offsets, M = 1..80 pixels."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    c0 = data.draw(st.integers(0, cout - 1))
    c1 = data.draw(st.integers(c0 + 1, cout))
    xr0 = data.draw(st.integers(0, 2))
    relu6 = data.draw(st.booleans())
    threads = data.draw(st.sampled_from([1, 2]))
    x, wt, b = rand(rng, rows + xr0 + 1, w, cin), rand(rng, cin, cout), rand(rng, cout)
    res, rr0, rc0 = None, 0, 0
    if data.draw(st.booleans()):
        rr0, rc0 = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5))
        res = rand(rng, rows + rr0 + 1, w, c1 - c0 + rc0 + 2)
    want = np.empty((rows, w, c1 - c0), np.float32)
    ops._gemm.pwconv(x, wt, b, want, c0, xr0, relu6, res, rr0, rc0, 1)
    got = np.full_like(want, np.nan)
    ops._gemm.pwconv_packed(x, ops.packed_weight(wt, c0, c1), b, got, c0, xr0, relu6, res,
                            rr0, rc0, threads)
    close(got, want)


@pytest.mark.parametrize("limit", [0, 10**9])  # BLAS only, packed only
@pytest.mark.parametrize("rows", [1, 2, 7, 10, 28])
@pytest.mark.parametrize("cin, cout", [(64, 384), (960, 160), (24, 144), (144, 24), (37, 50)])
def test_pwconv_both_paths_match_reference(limit, rows, cin, cout, monkeypatch):
    """ops.pwconv through either kernel (7-pixel rows: M = 7..196)."""
    monkeypatch.setattr(ops, "PACKED_MAX_PIXELS", limit)
    monkeypatch.setattr(ops, "PACKED_MAX_WEIGHTS", limit)
    rng = np.random.default_rng(rows * cin + cout)
    x, wt, b, r = rand(rng, rows, 7, cin), rand(rng, cin, cout), rand(rng, cout), \
        rand(rng, rows, 7, cout)
    want = reference.pwconv(x, wt, b) + r
    close(ops.pwconv(x, wt, b, residual=r), want)
    close(ops.pwconv(x, wt, b, residual=r, c0=3, c1=cout - 1), want[..., 3:cout - 1])


def test_packed_weights_are_cached_per_array():
    rng = np.random.default_rng(6)
    x, w, b = rand(rng, 2, 7, 40), rand(rng, 40, 50), rand(rng, 50)
    first = ops.packed_weight(w, 0, 50)
    assert ops.packed_weight(w, 0, 50) is first          # packed once
    assert ops.packed_weight(w, 16, 50) is not first     # each channel window its own
    assert ops.packed_weight(w.copy(), 0, 50) is not first
    close(ops.pwconv(x, w, b), reference.pwconv(x, w, b))
    # a replaced weight array (even one that reuses the freed id) is packed anew
    for _ in range(5):
        w = rand(rng, 40, 50)
        close(ops.pwconv(x, w, b), reference.pwconv(x, w, b))
    # entries go away with their array
    del first
    w = rand(rng, 40, 50)
    ops.packed_weight(w, 0, 50)
    n = len(ops._packed)
    del w
    assert len(ops._packed) == n - 1
