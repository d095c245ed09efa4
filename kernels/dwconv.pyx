# cython: language_level=3
"""Depthwise 3x3 convolution, pad 1, stride 1 or 2, NHWC fp32, fused bias + ReLU6.

Low-level kernel: no validation here (decolla.ops validates). Computes output rows
[r0, r0 + out.shape[0]) and channels [c0, c0 + out.shape[2]) from an input row
window x = rows [in_row0, in_row0 + x.shape[0]) of an input of height in_height.
"""
from cython.parallel cimport prange

include "_common.pxi"

cdef extern from *:
    """
    /* _quad is called with a literal stride; gcc folds it into constant offsets (and
       loads each column shared by neighbouring pixels once) only when it inlines it. */
    #undef CYTHON_INLINE
    #define CYTHON_INLINE __inline__ __attribute__((always_inline, unused))
    """


cdef inline float _clamp6(float s) noexcept nogil:
    s = s if s > <float>0.0 else <float>0.0
    return s if s < <float>6.0 else <float>6.0


cdef inline void _pixel(float_rp o, cfloat_rp p0, cfloat_rp p1, cfloat_rp p2,
                        cfloat_rp p3, cfloat_rp p4, cfloat_rp p5, cfloat_rp p6,
                        cfloat_rp p7, cfloat_rp p8, cfloat_rp w, Py_ssize_t wc,
                        cfloat_rp b, Py_ssize_t n, bint relu6) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        o[c] = (b[c] + p0[c] * w[c] + p1[c] * w[wc + c] + p2[c] * w[2 * wc + c]
                + p3[c] * w[3 * wc + c] + p4[c] * w[4 * wc + c] + p5[c] * w[5 * wc + c]
                + p6[c] * w[6 * wc + c] + p7[c] * w[7 * wc + c] + p8[c] * w[8 * wc + c])
    if relu6:
        for c in range(n):
            o[c] = _clamp6(o[c])


cdef inline void _quad(float_rp o, Py_ssize_t on, cfloat_rp r0, cfloat_rp r1,
                       cfloat_rp r2, Py_ssize_t cx, cfloat_rp w, Py_ssize_t wc,
                       cfloat_rp b, Py_ssize_t n, bint relu6,
                       const Py_ssize_t stride) noexcept nogil:
    """4 adjacent output pixels; r0..r2 point at the first input column they read in
    each of the 3 input rows. The 9 weights are loaded once per channel and reused 4
    times. Called with a literal stride, so that after inlining the compiler sees
    constant offsets and loads each column shared by neighbouring pixels once."""
    cdef Py_ssize_t c, a1 = stride * cx, a2 = 2 * stride * cx, a3 = 3 * stride * cx
    cdef float s0, s1, s2, s3, w0, w1, w2, w3, w4, w5, w6, w7, w8
    for c in range(n):
        w0 = w[c]; w1 = w[wc + c]; w2 = w[2 * wc + c]
        w3 = w[3 * wc + c]; w4 = w[4 * wc + c]; w5 = w[5 * wc + c]
        w6 = w[6 * wc + c]; w7 = w[7 * wc + c]; w8 = w[8 * wc + c]
        s0 = (b[c] + r0[c] * w0 + r0[c + cx] * w1 + r0[c + 2 * cx] * w2
              + r1[c] * w3 + r1[c + cx] * w4 + r1[c + 2 * cx] * w5
              + r2[c] * w6 + r2[c + cx] * w7 + r2[c + 2 * cx] * w8)
        s1 = (b[c] + r0[a1 + c] * w0 + r0[a1 + c + cx] * w1 + r0[a1 + c + 2 * cx] * w2
              + r1[a1 + c] * w3 + r1[a1 + c + cx] * w4 + r1[a1 + c + 2 * cx] * w5
              + r2[a1 + c] * w6 + r2[a1 + c + cx] * w7 + r2[a1 + c + 2 * cx] * w8)
        s2 = (b[c] + r0[a2 + c] * w0 + r0[a2 + c + cx] * w1 + r0[a2 + c + 2 * cx] * w2
              + r1[a2 + c] * w3 + r1[a2 + c + cx] * w4 + r1[a2 + c + 2 * cx] * w5
              + r2[a2 + c] * w6 + r2[a2 + c + cx] * w7 + r2[a2 + c + 2 * cx] * w8)
        s3 = (b[c] + r0[a3 + c] * w0 + r0[a3 + c + cx] * w1 + r0[a3 + c + 2 * cx] * w2
              + r1[a3 + c] * w3 + r1[a3 + c + cx] * w4 + r1[a3 + c + 2 * cx] * w5
              + r2[a3 + c] * w6 + r2[a3 + c + cx] * w7 + r2[a3 + c + 2 * cx] * w8)
        if relu6:
            s0 = _clamp6(s0); s1 = _clamp6(s1); s2 = _clamp6(s2); s3 = _clamp6(s3)
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
                _quad(orow + ox * n, n, q[0], q[1], q[2], cx, w, wc, b, n, relu6, 1)
            else:
                _quad(orow + ox * n, n, q[0], q[1], q[2], cx, w, wc, b, n, relu6, 2)
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
