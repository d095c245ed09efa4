# cython: language_level=3
"""Depthwise convolution of any kernel size, stride and dilation, NHWC fp32, on an input
already padded (rows and columns), with bias and optional ReLU6.

Low-level kernel: no validation here (decolla.graph.ops prepares the padded window).
Output pixel (r, x) reads xp[r*sh + i*dh, x*sw + j*dw] for every tap (i, j); the loop
over channels is the vector loop.
"""
from cython.parallel cimport prange

include "_common.pxi"


cdef inline void _pixel(float_rp o, const float* xp, Py_ssize_t row_stride,
                        Py_ssize_t col_stride, const float* w, cfloat_rp b, Py_ssize_t kh,
                        Py_ssize_t kw, Py_ssize_t C, bint relu6) noexcept nogil:
    cdef Py_ssize_t i, j, c
    cdef cfloat_rp xr
    cdef cfloat_rp wr
    cdef float s
    for c in range(C):
        o[c] = b[c]
    for i in range(kh):
        for j in range(kw):
            xr = xp + i * row_stride + j * col_stride
            wr = w + (i * kw + j) * C
            for c in range(C):
                o[c] += xr[c] * wr[c]
    if relu6:
        for c in range(C):
            s = o[c]
            s = s if s > <float>0.0 else <float>0.0
            o[c] = s if s < <float>6.0 else <float>6.0


def dwconv(const float[:, :, ::1] xp, const float[:, :, ::1] w, const float[::1] b,
           float[:, :, ::1] out, int sh, int sw, int dh, int dw, bint relu6, int threads=1):
    """out[r, x, c] = b[c] + sum over taps of xp[r*sh + i*dh, x*sw + j*dw, c] * w[i, j, c]."""
    cdef Py_ssize_t rows = out.shape[0], Wo = out.shape[1], C = out.shape[2]
    cdef Py_ssize_t Wp = xp.shape[1], kh = w.shape[0], kw = w.shape[1]
    cdef Py_ssize_t r, x
    if rows == 0 or Wo == 0 or C == 0:
        return
    cdef const float* xb = &xp[0, 0, 0]
    cdef const float* wp = &w[0, 0, 0]
    cdef const float* bp = &b[0]
    cdef float* op = &out[0, 0, 0]
    for r in prange(rows, nogil=True, num_threads=threads, schedule="static"):
        for x in range(Wo):
            _pixel(op + (r * Wo + x) * C, xb + ((r * sh) * Wp + x * sw) * C, dh * Wp * C,
                   dw * C, wp, bp, kh, kw, C, relu6)
