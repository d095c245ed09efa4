# cython: language_level=3
"""Depthwise 3x3 convolution, pad 1, stride 1 or 2, NHWC fp32, fused bias + ReLU6.

Low-level kernel: no validation here (decolla.ops validates). Computes output rows
[r0, r0 + out.shape[0]) and channels [c0, c0 + out.shape[2]) from an input row
window x = rows [in_row0, in_row0 + x.shape[0]) of an input of height in_height.
"""
from cython.parallel cimport prange

include "_common.pxi"

include "_dw_rows.pxi"


def dwconv3x3(const float[:, :, ::1] x, const float[:, :, ::1] w, const float[::1] b,
              float[:, :, ::1] out, int stride, Py_ssize_t xc0, Py_ssize_t c0,
              Py_ssize_t r0, Py_ssize_t in_row0, Py_ssize_t in_height, bint relu6,
              int threads=1, bint quad=True):
    """Rows/channels of a depthwise 3x3 conv into `out` (see module docstring).

    quad=False computes every pixel on the one-pixel path (for tests and A/B timing).
    """
    cdef Py_ssize_t rows = out.shape[0], Wo = out.shape[1], n = out.shape[2]
    cdef Py_ssize_t W = x.shape[1], cx = x.shape[2], wc = w.shape[2]
    cdef Py_ssize_t i
    if rows == 0 or Wo == 0 or n == 0:
        return
    cdef const float* xp = &x[0, 0, 0] + xc0
    cdef const float* wp = &w[0, 0, 0] + c0
    cdef const float* bp = &b[0] + c0
    cdef float* op = &out[0, 0, 0]
    cdef float* zero = <float*>calloc(9 * cx, sizeof(float))
    if zero == NULL:
        raise MemoryError()
    try:
        for i in prange(rows, nogil=True, num_threads=threads, schedule="static"):
            _row(op + i * Wo * n, xp, zero, r0 + i, stride, in_row0, in_height, W, Wo, cx,
                 wp, wc, bp, n, relu6, quad)
    finally:
        free(zero)


AVX512 = bool(DW_AVX512)   # interior pixels on the AVX-512 path (dw5_run)
NEON = bool(DW_NEON)       # interior pixels on the NEON path (dwn_run, aarch64)
