# cython: language_level=3
"""Max pooling of any kernel, stride, padding and dilation over rows of an NHWC map (the
imported graphs' MaxPool): a tap outside the input is skipped, as if it were padded with
-inf, so no padded copy is made.

Low-level kernel: no validation here (decolla.graph.ops checks the row window).
"""
from cython.parallel cimport prange

include "_common.pxi"

cdef extern from "<math.h>" nogil:
    float INFINITY


def maxpool(const float[:, :, ::1] x, float[:, :, ::1] out, Py_ssize_t r0, Py_ssize_t x0,
            Py_ssize_t H, int kh, int kw, int sh, int sw, int pt, int pl, int dh, int dw,
            int threads=1):
    """Output rows [r0, r0 + len(out)) of a max pool over an input of height H, of which x
    holds rows [x0, x0 + len(x)) (every row the output rows read inside [0, H))."""
    cdef Py_ssize_t rows = out.shape[0], Wo = out.shape[1], C = out.shape[2], r
    if rows == 0 or Wo == 0 or C == 0:
        return
    cdef const float* xp = &x[0, 0, 0]
    cdef float* op = &out[0, 0, 0]
    for r in prange(rows, nogil=True, num_threads=threads, schedule="static"):
        _row(op + r * Wo * C, xp, r0 + r, x0, H, x.shape[1], Wo, C, kh, kw, sh, sw, pt, pl,
             dh, dw)


cdef void _row(float* o, const float* x, Py_ssize_t r, Py_ssize_t x0, Py_ssize_t H,
               Py_ssize_t W, Py_ssize_t Wo, Py_ssize_t C, int kh, int kw, int sh, int sw,
               int pt, int pl, int dh, int dw) noexcept nogil:
    cdef Py_ssize_t ox, i, j, iy, ix
    for ox in range(Wo):
        _fill(o + ox * C, -INFINITY, C)
        for i in range(kh):
            iy = r * sh - pt + i * dh
            if iy < 0 or iy >= H:
                continue
            for j in range(kw):
                ix = ox * sw - pl + j * dw
                if 0 <= ix < W:
                    _max_into(o + ox * C, x + ((iy - x0) * W + ix) * C, C)


cdef inline void _max_into(float_rp o, cfloat_rp x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        o[c] = o[c] if o[c] > x[c] else x[c]
