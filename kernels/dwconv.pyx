# cython: language_level=3
"""Depthwise 3x3 convolution, pad 1, stride 1 or 2, NHWC fp32, fused bias + ReLU6.

Low-level kernel: no validation here (decolla.ops validates). Computes output rows
[r0, r0 + out.shape[0]) and channels [c0, c0 + out.shape[2]) from an input row
window x = rows [in_row0, in_row0 + x.shape[0]) of an input of height in_height.
"""
from cython.parallel cimport prange

include "_common.pxi"


cdef inline void _pixel(float_rp o, cfloat_rp p0, cfloat_rp p1, cfloat_rp p2,
                        cfloat_rp p3, cfloat_rp p4, cfloat_rp p5, cfloat_rp p6,
                        cfloat_rp p7, cfloat_rp p8, cfloat_rp w, Py_ssize_t wc,
                        cfloat_rp b, Py_ssize_t n, bint relu6) noexcept nogil:
    cdef Py_ssize_t c
    cdef float s
    if relu6:
        for c in range(n):
            s = (b[c] + p0[c] * w[c] + p1[c] * w[wc + c] + p2[c] * w[2 * wc + c]
                 + p3[c] * w[3 * wc + c] + p4[c] * w[4 * wc + c] + p5[c] * w[5 * wc + c]
                 + p6[c] * w[6 * wc + c] + p7[c] * w[7 * wc + c] + p8[c] * w[8 * wc + c])
            s = s if s > <float>0.0 else <float>0.0
            o[c] = s if s < <float>6.0 else <float>6.0
    else:
        for c in range(n):
            o[c] = (b[c] + p0[c] * w[c] + p1[c] * w[wc + c] + p2[c] * w[2 * wc + c]
                    + p3[c] * w[3 * wc + c] + p4[c] * w[4 * wc + c] + p5[c] * w[5 * wc + c]
                    + p6[c] * w[6 * wc + c] + p7[c] * w[7 * wc + c] + p8[c] * w[8 * wc + c])


cdef inline void _quad_s1(float_rp o, Py_ssize_t on, cfloat_rp r0, cfloat_rp r1,
                         cfloat_rp r2, Py_ssize_t cx, cfloat_rp w, Py_ssize_t wc,
                         cfloat_rp b, Py_ssize_t n, bint relu6) noexcept nogil:
    """4 adjacent output pixels, stride 1; r0..r2 point at the first input column
    they read in each of the 3 input rows. Columns shared by neighbouring pixels are
    loaded once per channel vector and the 9 weights are reused 4 times."""
    cdef Py_ssize_t c
    cdef float s0, s1, s2, s3, w0, w1, w2, w3, w4, w5, w6, w7, w8
    for c in range(n):
        w0 = w[c]; w1 = w[wc + c]; w2 = w[2 * wc + c]
        w3 = w[3 * wc + c]; w4 = w[4 * wc + c]; w5 = w[5 * wc + c]
        w6 = w[6 * wc + c]; w7 = w[7 * wc + c]; w8 = w[8 * wc + c]
        s0 = (b[c]
              + r0[c] * w0 + r0[cx + c] * w1 + r0[2 * cx + c] * w2
              + r1[c] * w3 + r1[cx + c] * w4 + r1[2 * cx + c] * w5
              + r2[c] * w6 + r2[cx + c] * w7 + r2[2 * cx + c] * w8)
        s1 = (b[c]
              + r0[cx + c] * w0 + r0[2 * cx + c] * w1 + r0[3 * cx + c] * w2
              + r1[cx + c] * w3 + r1[2 * cx + c] * w4 + r1[3 * cx + c] * w5
              + r2[cx + c] * w6 + r2[2 * cx + c] * w7 + r2[3 * cx + c] * w8)
        s2 = (b[c]
              + r0[2 * cx + c] * w0 + r0[3 * cx + c] * w1 + r0[4 * cx + c] * w2
              + r1[2 * cx + c] * w3 + r1[3 * cx + c] * w4 + r1[4 * cx + c] * w5
              + r2[2 * cx + c] * w6 + r2[3 * cx + c] * w7 + r2[4 * cx + c] * w8)
        s3 = (b[c]
              + r0[3 * cx + c] * w0 + r0[4 * cx + c] * w1 + r0[5 * cx + c] * w2
              + r1[3 * cx + c] * w3 + r1[4 * cx + c] * w4 + r1[5 * cx + c] * w5
              + r2[3 * cx + c] * w6 + r2[4 * cx + c] * w7 + r2[5 * cx + c] * w8)
        if relu6:
            s0 = s0 if s0 > <float>0.0 else <float>0.0
            s0 = s0 if s0 < <float>6.0 else <float>6.0
            s1 = s1 if s1 > <float>0.0 else <float>0.0
            s1 = s1 if s1 < <float>6.0 else <float>6.0
            s2 = s2 if s2 > <float>0.0 else <float>0.0
            s2 = s2 if s2 < <float>6.0 else <float>6.0
            s3 = s3 if s3 > <float>0.0 else <float>0.0
            s3 = s3 if s3 < <float>6.0 else <float>6.0
        o[c] = s0
        o[on + c] = s1
        o[2 * on + c] = s2
        o[3 * on + c] = s3


cdef inline void _quad_s2(float_rp o, Py_ssize_t on, cfloat_rp r0, cfloat_rp r1,
                         cfloat_rp r2, Py_ssize_t cx, cfloat_rp w, Py_ssize_t wc,
                         cfloat_rp b, Py_ssize_t n, bint relu6) noexcept nogil:
    """4 adjacent output pixels, stride 2; r0..r2 point at the first input column
    they read in each of the 3 input rows. Columns shared by neighbouring pixels are
    loaded once per channel vector and the 9 weights are reused 4 times."""
    cdef Py_ssize_t c
    cdef float s0, s1, s2, s3, w0, w1, w2, w3, w4, w5, w6, w7, w8
    for c in range(n):
        w0 = w[c]; w1 = w[wc + c]; w2 = w[2 * wc + c]
        w3 = w[3 * wc + c]; w4 = w[4 * wc + c]; w5 = w[5 * wc + c]
        w6 = w[6 * wc + c]; w7 = w[7 * wc + c]; w8 = w[8 * wc + c]
        s0 = (b[c]
              + r0[c] * w0 + r0[cx + c] * w1 + r0[2 * cx + c] * w2
              + r1[c] * w3 + r1[cx + c] * w4 + r1[2 * cx + c] * w5
              + r2[c] * w6 + r2[cx + c] * w7 + r2[2 * cx + c] * w8)
        s1 = (b[c]
              + r0[2 * cx + c] * w0 + r0[3 * cx + c] * w1 + r0[4 * cx + c] * w2
              + r1[2 * cx + c] * w3 + r1[3 * cx + c] * w4 + r1[4 * cx + c] * w5
              + r2[2 * cx + c] * w6 + r2[3 * cx + c] * w7 + r2[4 * cx + c] * w8)
        s2 = (b[c]
              + r0[4 * cx + c] * w0 + r0[5 * cx + c] * w1 + r0[6 * cx + c] * w2
              + r1[4 * cx + c] * w3 + r1[5 * cx + c] * w4 + r1[6 * cx + c] * w5
              + r2[4 * cx + c] * w6 + r2[5 * cx + c] * w7 + r2[6 * cx + c] * w8)
        s3 = (b[c]
              + r0[6 * cx + c] * w0 + r0[7 * cx + c] * w1 + r0[8 * cx + c] * w2
              + r1[6 * cx + c] * w3 + r1[7 * cx + c] * w4 + r1[8 * cx + c] * w5
              + r2[6 * cx + c] * w6 + r2[7 * cx + c] * w7 + r2[8 * cx + c] * w8)
        if relu6:
            s0 = s0 if s0 > <float>0.0 else <float>0.0
            s0 = s0 if s0 < <float>6.0 else <float>6.0
            s1 = s1 if s1 > <float>0.0 else <float>0.0
            s1 = s1 if s1 < <float>6.0 else <float>6.0
            s2 = s2 if s2 > <float>0.0 else <float>0.0
            s2 = s2 if s2 < <float>6.0 else <float>6.0
            s3 = s3 if s3 > <float>0.0 else <float>0.0
            s3 = s3 if s3 < <float>6.0 else <float>6.0
        o[c] = s0
        o[on + c] = s1
        o[2 * on + c] = s2
        o[3 * on + c] = s3


cdef void _row(float* orow, const float* x, const float* zero, Py_ssize_t oy,
               Py_ssize_t stride, Py_ssize_t in_row0, Py_ssize_t in_height,
               Py_ssize_t W, Py_ssize_t Wo, Py_ssize_t cx, const float* w, Py_ssize_t wc,
               const float* b, Py_ssize_t n, bint relu6, bint quad) noexcept nogil:
    """One output row: interior pixels four at a time (if quad), the others one by one."""
    cdef const float* rows[3]
    cdef const float* q[3]
    cdef const float* p[9]
    cdef Py_ssize_t dy, dx, iy, ix, ox, ox_hi
    for dy in range(3):
        iy = oy * stride - 1 + dy
        rows[dy] = x + (iy - in_row0) * W * cx if 0 <= iy < in_height else NULL
    # pixels [1, ox_hi) read only in-range columns (ox * stride + 1 < W)
    ox_hi = (W - 2) // stride + 1 if W >= 2 else 0
    if ox_hi > Wo:
        ox_hi = Wo
    ox = 0
    while ox < Wo:
        if quad and ox >= 1 and ox + 4 <= ox_hi:
            for dy in range(3):
                # a missing row reads zeros: `zero` holds 9 * cx of them
                q[dy] = rows[dy] + (ox * stride - 1) * cx if rows[dy] != NULL else zero
            if stride == 1:
                _quad_s1(orow + ox * n, n, q[0], q[1], q[2], cx, w, wc, b, n, relu6)
            else:
                _quad_s2(orow + ox * n, n, q[0], q[1], q[2], cx, w, wc, b, n, relu6)
            ox += 4
            continue
        for dy in range(3):
            for dx in range(3):
                ix = ox * stride - 1 + dx
                if rows[dy] != NULL and 0 <= ix < W:
                    p[dy * 3 + dx] = rows[dy] + ix * cx
                else:
                    p[dy * 3 + dx] = zero
        _pixel(orow + ox * n, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8],
               w, wc, b, n, relu6)
        ox += 1


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
