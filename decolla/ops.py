"""Layer operations on chunks: the validating API over the Cython kernels.

Every function computes one chunk of a layer: output channels [c0, c1) and output
rows [r0, r1), from an input row window `x` holding rows [in_row0, in_row0 + len(x))
of an input of height `in_height` (default: `x` is the whole input). Tensors are
NHWC single images (H, W, C), float32, C-contiguous; weights as in decolla.model.
Bad arguments raise TypeError/ValueError naming what is wrong. Finiteness of the
data is not checked here (decolla.forward checks the image; models are validated
when built or loaded).

Threads: `set_threads(n)` (or DECOLLA_THREADS, or `threads=` per call) sets the
OpenMP threads of the kernels; BLAS is called from inside those threads and is
kept single-threaded, so there is one thread pool and no oversubscription.
"""
from __future__ import annotations

import os
import weakref

import numpy as np

from decolla.kernels import load as _load
from decolla.model import Layer

_dw = _load("dwconv")
_conv = _load("conv")
_gemm = _load("gemm")

_THREADS = 1


# --------------------------------------------------------------------------- threads

def _limit_blas_to_one_thread() -> None:
    """The kernels parallelise with OpenMP and call BLAS from inside their own
    threads: a second (BLAS) thread pool would only oversubscribe the cores."""
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS so threadpoolctl sees it)
    from threadpoolctl import ThreadpoolController
    libs = ThreadpoolController().select(user_api="blas")
    scipy_dir = os.path.dirname(os.path.dirname(scipy.linalg.__file__))
    mine = [lib for lib in libs.lib_controllers
            if "scipy.libs" in lib.filepath or lib.filepath.startswith(scipy_dir)]
    for lib in mine or libs.lib_controllers:
        lib.set_num_threads(1)


def _check_threads(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    return int(n)


def set_threads(n: int) -> None:
    """Default number of OpenMP threads of every kernel (BLAS stays at one thread)."""
    global _THREADS
    _THREADS = _check_threads(n)


def get_threads() -> int:
    """The current default thread count."""
    return _THREADS


def _nthreads(threads) -> int:
    return _THREADS if threads is None else _check_threads(threads)


def _env_threads() -> int:
    raw = os.environ.get("DECOLLA_THREADS", "1")
    try:
        return _check_threads(int(raw))
    except ValueError:
        raise ValueError(f"DECOLLA_THREADS={raw!r} is not a positive integer") from None


_limit_blas_to_one_thread()
set_threads(_env_threads())


# --------------------------------------------------------------------------- validation

def _array(a, what: str, ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{what} must be float32, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (use np.ascontiguousarray)")
    return a


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {v!r}")
    return int(v)


def _range(lo, hi, size: int, what: str) -> tuple[int, int]:
    letter = what[0]  # "row" -> r0/r1, "channel" -> c0/c1
    hi = size if hi is None else _int(hi, f"{letter}1")
    lo = _int(lo, f"{letter}0")
    if not 0 <= lo <= hi <= size:
        raise ValueError(f"{what} range [{lo}, {hi}) is out of bounds for size {size}")
    return lo, hi


def _weights(weight, bias, wshape_what: str, ndim: int, cout_axis: int):
    w = _array(weight, "weight", ndim)
    b = _array(bias, "bias", 1)
    if b.shape[0] != w.shape[cout_axis]:
        raise ValueError(f"bias has {b.shape[0]} values but {wshape_what} weight {w.shape} "
                         f"has {w.shape[cout_axis]} output channels")
    return w, b


def _stride(stride) -> int:
    stride = _int(stride, "stride")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    return stride


def _rows(x: np.ndarray, in_row0, in_height) -> tuple[int, int]:
    in_row0 = _int(in_row0, "in_row0")
    in_height = in_row0 + x.shape[0] if in_height is None else _int(in_height, "in_height")
    if in_row0 < 0 or in_row0 + x.shape[0] > in_height:
        raise ValueError(f"input window rows [{in_row0}, {in_row0 + x.shape[0]}) do not fit "
                         f"in an input of height {in_height}")
    return in_row0, in_height


def input_rows_needed(layer_or_kind, stride, r0: int, r1: int, in_height: int) -> tuple[int, int]:
    """Input rows [lo, hi) that output rows [r0, r1) of a layer read (halo included,
    clipped to the input). `layer_or_kind` is a Layer or a kind name; stride None
    takes the layer's."""
    kind = layer_or_kind.kind if isinstance(layer_or_kind, Layer) else layer_or_kind
    if stride is None:
        if not isinstance(layer_or_kind, Layer):
            raise ValueError("stride is required when a kind name is given")
        stride = layer_or_kind.stride
    r0, r1, in_height = _int(r0, "r0"), _int(r1, "r1"), _int(in_height, "in_height")
    if kind in ("conv3x3", "dwconv3x3"):
        stride = _stride(stride)
        out_h = (in_height - 1) // stride + 1 if in_height > 0 else 0
        _range(r0, r1, out_h, "row")
        if r0 == r1:
            lo = min(in_height, r0 * stride)
            return lo, lo
        return max(0, r0 * stride - 1), min(in_height, (r1 - 1) * stride + 2)
    if kind == "pwconv":
        return _range(r0, r1, in_height, "row")
    if kind in ("gap", "linear"):
        return 0, in_height
    raise ValueError(f"unknown layer kind {kind!r}")


def _check_window(kind, stride, r0, r1, in_row0, rows, in_height):
    lo, hi = input_rows_needed(kind, stride, r0, r1, in_height)
    if lo < hi and (in_row0 > lo or in_row0 + rows < hi):
        raise ValueError(f"output rows [{r0}, {r1}) need input rows [{lo}, {hi}) but x holds "
                         f"rows [{in_row0}, {in_row0 + rows})")


def _output(out, shape: tuple[int, ...], x: np.ndarray, residual=None) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    out = _array(out, "out", len(shape))
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    if np.may_share_memory(out, x):
        raise ValueError("out must not overlap the input x")
    if residual is not None and np.may_share_memory(out, residual):
        raise ValueError("out must not overlap the residual")
    return out


def _residual(residual, chunk: tuple[int, ...], full: tuple[int, ...], offsets: tuple[int, ...]):
    """Residual as (array, row offset, channel offset): either the chunk's own shape or
    the layer's full output shape (then the chunk is cut out of it)."""
    if residual is None:
        return None, 0, 0
    res = _array(residual, "residual", len(chunk))
    if res.shape == chunk:
        return res, 0, 0
    if res.shape == full:
        return res, offsets[0], offsets[-1]
    raise ValueError(f"residual has shape {res.shape}; expected the chunk shape {chunk} "
                     f"or the full output shape {full}")


# --------------------------------------------------------------------------- layer ops

def dwconv3x3(x, weight, bias, stride: int = 1, *, relu6: bool = False, residual=None,
              c0: int = 0, c1: int | None = None, r0: int = 0, r1: int | None = None,
              in_row0: int = 0, in_height: int | None = None, out=None,
              threads: int | None = None) -> np.ndarray:
    """Depthwise 3x3 conv (pad 1). x has all C channels or only channels [c0, c1)."""
    x = _array(x, "x", 3)
    w, b = _weights(weight, bias, "dwconv3x3", 3, 2)
    if w.shape[:2] != (3, 3):
        raise ValueError(f"dwconv3x3 weight must have shape (3, 3, C), got {w.shape}")
    stride = _stride(stride)
    C = w.shape[2]
    c0, c1 = _range(c0, c1, C, "channel")
    if x.shape[2] == C:
        xc0 = c0
    elif x.shape[2] == c1 - c0:
        xc0 = 0
    else:
        raise ValueError(f"x has {x.shape[2]} channels; expected {C} (all) or {c1 - c0} "
                         f"(channels [{c0}, {c1}))")
    in_row0, in_height = _rows(x, in_row0, in_height)
    ho, wo = (in_height - 1) // stride + 1, (x.shape[1] - 1) // stride + 1
    r0, r1 = _range(r0, r1, ho, "row")
    _check_window("dwconv3x3", stride, r0, r1, in_row0, x.shape[0], in_height)
    shape = (r1 - r0, wo, c1 - c0)
    res, rr0, rc0 = _residual(residual, shape, (ho, wo, C), (r0, c0))
    y = _output(out, shape, x, res)
    _dw.dwconv3x3(x, w, b, y, stride, xc0, c0, r0, in_row0, in_height, bool(relu6),
                  _nthreads(threads))
    if res is not None:
        _gemm.add_residual(y, res, rr0, rc0)
    return y


def conv3x3(x, weight, bias, stride: int = 1, *, relu6: bool = False, residual=None,
            c0: int = 0, c1: int | None = None, r0: int = 0, r1: int | None = None,
            in_row0: int = 0, in_height: int | None = None, out=None,
            threads: int | None = None) -> np.ndarray:
    """Full 3x3 conv (pad 1), weight (3, 3, Cin, Cout)."""
    x = _array(x, "x", 3)
    w, b = _weights(weight, bias, "conv3x3", 4, 3)
    if w.shape[:2] != (3, 3):
        raise ValueError(f"conv3x3 weight must have shape (3, 3, Cin, Cout), got {w.shape}")
    if x.shape[2] != w.shape[2]:
        raise ValueError(f"x has {x.shape[2]} channels but the weight expects {w.shape[2]}")
    stride = _stride(stride)
    cout = w.shape[3]
    c0, c1 = _range(c0, c1, cout, "channel")
    in_row0, in_height = _rows(x, in_row0, in_height)
    ho, wo = (in_height - 1) // stride + 1, (x.shape[1] - 1) // stride + 1
    r0, r1 = _range(r0, r1, ho, "row")
    _check_window("conv3x3", stride, r0, r1, in_row0, x.shape[0], in_height)
    shape = (r1 - r0, wo, c1 - c0)
    res, rr0, rc0 = _residual(residual, shape, (ho, wo, cout), (r0, c0))
    y = _output(out, shape, x, res)
    _conv.conv3x3(x, w, b, y, stride, c0, r0, in_row0, in_height, bool(relu6), res, rr0, rc0,
                  _nthreads(threads))
    return y


def pwconv(x, weight, bias, *, relu6: bool = False, residual=None, c0: int = 0,
           c1: int | None = None, r0: int = 0, r1: int | None = None, in_row0: int = 0,
           in_height: int | None = None, out=None, threads: int | None = None) -> np.ndarray:
    """Pointwise 1x1 conv, weight (Cin, Cout)."""
    x = _array(x, "x", 3)
    w, b = _weights(weight, bias, "pwconv", 2, 1)
    if x.shape[2] != w.shape[0]:
        raise ValueError(f"x has {x.shape[2]} channels but the weight expects {w.shape[0]}")
    cout = w.shape[1]
    c0, c1 = _range(c0, c1, cout, "channel")
    in_row0, in_height = _rows(x, in_row0, in_height)
    r0, r1 = _range(r0, r1, in_height, "row")
    _check_window("pwconv", 1, r0, r1, in_row0, x.shape[0], in_height)
    shape = (r1 - r0, x.shape[1], c1 - c0)
    res, rr0, rc0 = _residual(residual, shape, (in_height, x.shape[1], cout), (r0, c0))
    y = _output(out, shape, x, res)
    pwconv_kernel(x, w, b, y, c0, r0 - in_row0, bool(relu6), res, rr0, rc0, _nthreads(threads))
    return y


# With fewer pixels than this, or a weight window of fewer floats than this, pwconv
# multiplies by a weight packed once per layer: BLAS repacks the whole weight on every
# call, which dominates a strip of a few rows (2-3x slower at 14-28 pixels). Above
# both, the two tie. Only the AVX2/FMA and AVX-512 builds are measured faster: the
# baseline x86 (SSE2) build keeps BLAS. The NEON build (aarch64, its kernel sized for
# NEON's registers) uses it too, by the same argument, unmeasured on a real Cortex-A72.
_FAST_PACKED = _gemm.__name__.endswith(("_v3", "_v4", "_neon"))
PACKED_MAX_PIXELS = 512 if _FAST_PACKED else 0
PACKED_MAX_WEIGHTS = 32768 if _FAST_PACKED else 0   # 128 KiB: 10-35% faster at any size

_packed: dict[tuple[int, int, int], tuple[weakref.ref, np.ndarray]] = {}


def packed_weight(w: np.ndarray, c0: int, c1: int) -> np.ndarray:
    """w[:, c0:c1] in the panel layout of the packed pwconv kernel, cached while w lives
    (keyed on the array object: a replaced weight array is packed anew)."""
    key = (id(w), c0, c1)
    hit = _packed.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    nr = _gemm.PACK_NR
    wpk = _aligned(((c1 - c0 + nr - 1) // nr, w.shape[0], nr))
    _gemm.pack_pw(w, c0, c1, wpk)
    _packed[key] = (weakref.ref(w, lambda ref: _forget(key, ref)), wpk)
    return wpk


def _aligned(shape: tuple[int, ...]) -> np.ndarray:
    """An empty float32 array starting on a 64-byte boundary: each 16-float weight vector
    of a panel row is then one cache line (15-20% faster on a large-K convolution)."""
    size = int(np.prod(shape))
    buf = np.empty(size + 16, np.float32)
    start = (-buf.ctypes.data % 64) // 4
    return buf[start:start + size].reshape(shape)


def _forget(key, ref) -> None:
    hit = _packed.get(key)
    if hit is not None and hit[0] is ref:
        del _packed[key]


def uses_packed(pixels: int, cin: int, n: int) -> bool:
    """Whether pwconv multiplies `pixels` pixels by `n` output channels of a weight with
    `cin` rows through the packed-weight kernel (else BLAS)."""
    return pixels > 0 and n > 0 and (pixels < PACKED_MAX_PIXELS or cin * n < PACKED_MAX_WEIGHTS)


def pwconv_kernel(x, w, b, out, c0, xr0, relu6, res, rr0, rc0, threads) -> None:
    """The Cython pwconv (arguments as decolla.kernels gemm.pwconv, already validated):
    the packed-weight kernel for few pixels or small weights, BLAS otherwise."""
    n = out.shape[2]
    if uses_packed(out.shape[0] * out.shape[1], w.shape[0], n):
        wpk = packed_weight(w, c0, c0 + n)
        _gemm.pwconv_packed(x, wpk, b, out, c0, xr0, relu6, res, rr0, rc0, threads)
    else:
        _gemm.pwconv(x, w, b, out, c0, xr0, relu6, res, rr0, rc0, threads)


def gap(x, *, c0: int = 0, c1: int | None = None, out=None,
        threads: int | None = None) -> np.ndarray:
    """Global average pool (H, W, C) -> channels [c0, c1) of (C,)."""
    x = _array(x, "x", 3)
    if x.shape[0] * x.shape[1] == 0:
        raise ValueError(f"x has no pixels (shape {x.shape}): the mean is undefined")
    c0, c1 = _range(c0, c1, x.shape[2], "channel")
    y = _output(out, (c1 - c0,), x)
    _nthreads(threads)
    _gemm.gap(x, y, c0)
    return y


def linear(x, weight, bias, *, relu6: bool = False, residual=None, c0: int = 0,
           c1: int | None = None, out=None, threads: int | None = None) -> np.ndarray:
    """x (Cin,) @ weight (Cin, Cout) + bias, outputs [c0, c1)."""
    x = _array(x, "x", 1)
    w, b = _weights(weight, bias, "linear", 2, 1)
    if x.shape[0] != w.shape[0]:
        raise ValueError(f"x has {x.shape[0]} features but the weight expects {w.shape[0]}")
    c0, c1 = _range(c0, c1, w.shape[1], "channel")
    res, _, rc0 = _residual(residual, (c1 - c0,), (w.shape[1],), (c0,))
    y = _output(out, (c1 - c0,), x, res)
    _nthreads(threads)
    _gemm.linear(x, w, b, y, c0, bool(relu6))
    if res is not None:
        y += res[rc0:rc0 + c1 - c0]
    return y


def run_layer(layer: Layer, x: np.ndarray, residual: np.ndarray | None = None,
              c0: int = 0, c1: int | None = None, r0: int = 0, r1: int | None = None,
              in_row0: int = 0, in_height: int | None = None, out=None,
              threads: int | None = None) -> np.ndarray:
    """Output channels [c0, c1) and rows [r0, r1) of `layer` (see the module docstring).

    `residual` is required exactly when the layer has one: the residual tensor's
    chunk (rows [r0, r1), channels [c0, c1)) or the whole tensor. For depthwise
    layers `x` may hold only channels [c0, c1). Returns C-contiguous float32.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"layer must be a decolla.model.Layer, got {type(layer).__name__}")
    if layer.residual is not None and residual is None:
        raise ValueError(f"layer {layer.name} adds the residual {layer.residual!r}: pass it")
    if layer.residual is None and residual is not None:
        raise ValueError(f"layer {layer.name} has no residual input, but one was given")
    kind = layer.kind
    if kind in ("graph", "graph-global"):   # decolla.graph.segments.GraphLayer
        if kind == "graph-global" and (r0 != 0 or r1 is not None or in_row0 != 0):
            raise ValueError(f"layer {layer.name} ({kind}) cannot be split by rows")
        return layer.run(x, c0, c1, r0, r1, in_row0, out, threads)
    if kind in ("gap", "linear"):
        if r0 != 0 or r1 is not None or in_row0 != 0:
            raise ValueError(f"layer {layer.name} ({kind}) cannot be split by rows")
        _check_shape(layer, x, full_rows=True)
        if kind == "gap":
            return gap(x, c0=c0, c1=c1, out=out, threads=threads)
        return linear(x, layer.weight, layer.bias, relu6=layer.relu6, residual=residual,
                      c0=c0, c1=c1, out=out, threads=threads)
    height = layer.in_shape[0] if in_height is None else in_height
    if height != layer.in_shape[0]:
        raise ValueError(f"layer {layer.name}: in_height {height} differs from the layer's "
                         f"input height {layer.in_shape[0]}")
    _check_shape(layer, x, full_rows=False)
    kw = dict(relu6=layer.relu6, residual=residual, c0=c0, c1=c1, r0=r0, r1=r1,
              in_row0=in_row0, in_height=height, out=out, threads=threads)
    if kind == "conv3x3":
        return conv3x3(x, layer.weight, layer.bias, layer.stride, **kw)
    if kind == "dwconv3x3":
        return dwconv3x3(x, layer.weight, layer.bias, layer.stride, **kw)
    if kind == "pwconv":
        return pwconv(x, layer.weight, layer.bias, **kw)
    raise ValueError(f"layer {layer.name}: unknown kind {kind!r}")


def _check_shape(layer: Layer, x, full_rows: bool) -> None:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
    want = tuple(layer.in_shape)
    if full_rows:
        ok = x.shape == want
    else:
        ok = x.ndim == 3 and x.shape[1] == want[1] and (
            x.shape[2] == want[2] or layer.kind == "dwconv3x3")
    if not ok:
        raise ValueError(f"layer {layer.name}: input shape {x.shape} does not match the "
                         f"layer input {want}" + ("" if full_rows else " (any row count)"))
