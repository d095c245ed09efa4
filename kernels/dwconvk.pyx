# cython: language_level=3
"""Depthwise convolution of any kernel size, stride, padding and dilation, NHWC fp32, with
bias and optional ReLU6, on a window of input rows.

Low-level kernel: no validation here (decolla.graph.ops checks the window). Computes output
rows [r0, r0 + out.shape[0]) from x = rows [x0, x0 + x.shape[0]) of an input of height
H: output pixel (r, c) reads input (r*sh - pt + i*dh, c*sw - pl + j*dw) for every tap
(i, j), taps outside the input being the zero padding. The loop over channels is the
vector loop.
"""
from cython.parallel cimport prange

include "_common.pxi"


cdef inline void _taps(float_rp o, cfloat_rp xr, cfloat_rp wr, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        o[c] += xr[c] * wr[c]


cdef void _row(float* o, const float* x, const float* w, const float* b, Py_ssize_t r,
               Py_ssize_t x0, Py_ssize_t H, Py_ssize_t W, Py_ssize_t Wo, Py_ssize_t C,
               Py_ssize_t kh, Py_ssize_t kw, int sh, int sw, int pt, int pl, int dh,
               int dw, bint relu6) noexcept nogil:
    cdef Py_ssize_t ox, i, j, c, iy, ix
    cdef float s
    cdef float* op
    for ox in range(Wo):
        op = o + ox * C
        for c in range(C):
            op[c] = b[c]
        for i in range(kh):
            iy = r * sh - pt + i * dh
            if iy < 0 or iy >= H:
                continue
            for j in range(kw):
                ix = ox * sw - pl + j * dw
                if ix < 0 or ix >= W:
                    continue
                _taps(op, x + ((iy - x0) * W + ix) * C, w + (i * kw + j) * C, C)
        if relu6:
            for c in range(C):
                s = op[c]
                s = s if s > <float>0.0 else <float>0.0
                op[c] = s if s < <float>6.0 else <float>6.0


def dwconv(const float[:, :, ::1] x, const float[:, :, ::1] w, const float[::1] b,
           float[:, :, ::1] out, Py_ssize_t r0, Py_ssize_t x0, Py_ssize_t H, int sh, int sw,
           int pt, int pl, int dh, int dw, bint relu6, int threads=1):
    """Output rows [r0, r0 + len(out)) of a depthwise convolution (see the module docstring)."""
    cdef Py_ssize_t rows = out.shape[0], Wo = out.shape[1], C = out.shape[2]
    cdef Py_ssize_t W = x.shape[1], kh = w.shape[0], kw = w.shape[1], r
    if rows == 0 or Wo == 0 or C == 0:
        return
    cdef const float* xp = &x[0, 0, 0]
    cdef const float* wp = &w[0, 0, 0]
    cdef const float* bp = &b[0]
    cdef float* op = &out[0, 0, 0]
    for r in prange(rows, nogil=True, num_threads=threads, schedule="static"):
        _row(op + r * Wo * C, xp, wp, bp, r0 + r, x0, H, W, Wo, C, kh, kw, sh, sw, pt, pl,
             dh, dw, relu6)
