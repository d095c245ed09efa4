"""Wire codec: round trips over shapes and dtypes; every corruption is detected."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from decolla.runtime import wire

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)
floats32 = st.floats(-1e4, 1e4, width=32, allow_nan=False)


@given(hnp.arrays(np.float32, shapes, elements=floats32), st.booleans())
@settings(max_examples=80, deadline=None)
def test_fp32_roundtrip_is_exact(arr, compress):
    out = wire.decode(wire.encode(arr, "float32", compress=compress))
    assert out.dtype == np.float32 and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@given(hnp.arrays(st.sampled_from([np.float64, np.float16, np.int32]), shapes,
                  elements=st.integers(-500, 500)))
@settings(max_examples=40, deadline=None)
def test_other_input_dtypes_decode_as_float32(arr):
    out = wire.decode(wire.encode(arr))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr.astype(np.float32))


@given(hnp.arrays(np.float32, shapes, elements=st.floats(-6, 6, width=32)))
@settings(max_examples=40, deadline=None)
def test_fp16_roundtrip_within_half_precision(arr):
    out = wire.decode(wire.encode(arr, "float16"))
    assert out.dtype == np.float32 and out.shape == arr.shape
    np.testing.assert_allclose(out, arr, rtol=1e-3, atol=1e-3)


def test_fp16_is_smaller_than_fp32():
    x = np.random.default_rng(0).standard_normal((32, 32, 16)).astype(np.float32)
    assert len(wire.encode(x, "float16")) < 0.6 * len(wire.encode(x, "float32"))


def test_zeros_compress():
    x = np.zeros((56, 56, 24), np.float32)
    assert len(wire.encode(x)) < x.nbytes / 50


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_any_single_byte_corruption_is_detected(data):
    sparse = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    x = rng.standard_normal((7, 5, 6)).astype(np.float32)
    if sparse:
        x[x < 0.5] = 0      # compressible: exercises the lz4 path
    blob = bytearray(wire.encode(x))
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(wire.WireError):
        wire.decode(bytes(blob))


@pytest.mark.parametrize("blob", [b"", b"DCW1", b"x" * 40, None, "text"])
def test_garbage_is_rejected(blob):
    with pytest.raises(wire.WireError):
        wire.decode(blob)


def test_truncation_is_detected():
    blob = wire.encode(np.ones((10, 10), np.float32))
    for cut in (1, 5, len(blob) // 2):
        with pytest.raises(wire.WireError):
            wire.decode(blob[:-cut])


def test_unknown_wire_dtype_is_refused():
    with pytest.raises(ValueError, match="wire dtype"):
        wire.encode(np.ones(3, np.float32), "int4")


def _half_build(build: str):
    """The half module `build`, skipping when this CPU cannot run it or it is not built."""
    import importlib
    from decolla import kernels
    for isa in ("v3", "neon"):
        if build.endswith("_" + isa) and not kernels.supports(isa):
            pytest.skip(f"this CPU has no {isa} build")
    try:
        return importlib.import_module(f"decolla.kernels.{build}")
    except ImportError:
        pytest.skip(f"{build} is not built on this platform")


# One test per build, outside @given: a skip inside it would skip every build.
@pytest.mark.parametrize("build", ["half", "half_v3", "half_neon"])
@given(hnp.arrays(np.float32, st.integers(0, 3000),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
@settings(max_examples=60, deadline=None)
def test_half_kernels_convert_exactly_as_numpy(build, arr):
    """Bit for bit, NaN, infinities, overflow and subnormals included (the wire uses the
    F16C or NEON build for >= 256 values; the plain build only where neither is)."""
    half = _half_build(build)
    with np.errstate(over="ignore"):
        want = arr.astype(np.float16)
    np.testing.assert_array_equal(half.to_half(arr).view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(half.from_half(want.tobytes(), arr.shape),
                                  want.astype(np.float32))


def test_fp16_wire_equals_numpys_conversion_through_the_kernel_too():
    arr = np.random.default_rng(0).standard_normal((3, 40, 9)).astype(np.float32) * 1e3
    with np.errstate(over="ignore"):
        want = arr.astype(np.float16).astype(np.float32)
    assert arr.size >= wire._HALF_MIN
    np.testing.assert_array_equal(wire.decode(wire.encode(arr, "float16")), want)


def test_decoding_copies_nothing_it_need_not():
    x = np.maximum(np.random.default_rng(1).standard_normal((9, 8, 16)), 0).astype(np.float32)
    blob = wire.encode(x, "float32", compress=False, checksum=False)
    y = wire.decode(blob)
    assert not y.flags.writeable and not y.flags.owndata   # a view of the received bytes
    for dtype in ("float16", "int8"):
        y = wire.decode(wire.encode(x, dtype))
        assert y.dtype == np.float32 and y.shape == x.shape


def test_lz4_pays_only_on_links_slower_than_it_is():
    per_byte_s, saved = wire.lz4_costs()
    assert per_byte_s > 0 and 0 < saved < 1
    breakeven = saved / per_byte_s          # bytes/s where saving equals the cost
    assert wire.compress_pays(breakeven / 2)
    assert not wire.compress_pays(breakeven * 2)
    assert not wire.compress_pays(0.0)


def test_the_crc_is_left_out_only_when_asked():
    x = np.random.default_rng(2).standard_normal((6, 7, 8)).astype(np.float32)
    for compress in (False, True):
        sealed, checked = wire.encode(x, compress=compress, checksum=False), wire.encode(x, compress=compress)
        assert len(checked) == len(sealed) + 4
        np.testing.assert_array_equal(wire.decode(sealed), x)
        np.testing.assert_array_equal(wire.decode(checked), x)
        with pytest.raises(wire.WireError):      # truncation is caught without a crc too
            wire.decode(sealed[:-3])
