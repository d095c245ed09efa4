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

cdef extern from *:
    """
    #include <math.h>
    #include <stddef.h>
    typedef float mp_v16 __attribute__((vector_size(64)));
    typedef float mp_v16u __attribute__((vector_size(64), aligned(4), may_alias));
    typedef int mp_i16 __attribute__((vector_size(64)));
    /* o > x ? o : x lane by lane (as _max_into: a NaN in o gives x) */
    static inline mp_v16 mp_max(mp_v16 o, mp_v16 x) {
        mp_i16 m = o > x;
        return (mp_v16)(((mp_i16)o & m) | ((mp_i16)x & ~m));
    }
    /* Channels [0, C - C % 16) of one output row, 16 at a time: the running max of each
       block of one pixel stays in a register over its taps (not stored and re-read per
       tap), and a block goes over the whole row before the next (its input columns
       stay in L1). Returns C - C % 16; _row does the rest. */
    static ptrdiff_t mp_row16(float* o, const float* x, ptrdiff_t r, ptrdiff_t x0,
                              ptrdiff_t H, ptrdiff_t W, ptrdiff_t Wo, ptrdiff_t C, int kh,
                              int kw, int sh, int sw, int pt, int pl, int dh, int dw) {
        const ptrdiff_t cend = C - C % 16;
        for (ptrdiff_t ox = 0; ox < Wo; ox++)
            for (ptrdiff_t c0 = 0; c0 < cend; c0 += 16) {
                mp_v16 acc = (mp_v16){0} - INFINITY;
                for (ptrdiff_t i = 0; i < kh; i++) {
                    ptrdiff_t iy = r * sh - pt + i * dh;
                    if (iy < 0 || iy >= H) continue;
                    const float* xr = x + (iy - x0) * W * C + c0;
                    for (ptrdiff_t j = 0; j < kw; j++) {
                        ptrdiff_t ix = ox * sw - pl + j * dw;
                        if (ix >= 0 && ix < W)
                            acc = mp_max(acc, *(const mp_v16u*)(xr + ix * C));
                    }
                }
                *(mp_v16u*)(o + ox * C + c0) = acc;
            }
        return cend;
    }
    """
    Py_ssize_t mp_row16(float* o, const float* x, Py_ssize_t r, Py_ssize_t x0, Py_ssize_t H,
                        Py_ssize_t W, Py_ssize_t Wo, Py_ssize_t C, int kh, int kw, int sh,
                        int sw, int pt, int pl, int dh, int dw) nogil


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
    cdef Py_ssize_t c0 = mp_row16(o, x, r, x0, H, W, Wo, C, kh, kw, sh, sw, pt, pl, dh, dw)
    if c0 == C:
        return
    for ox in range(Wo):
        _fill(o + ox * C + c0, -INFINITY, C - c0)
        for i in range(kh):
            iy = r * sh - pt + i * dh
            if iy < 0 or iy >= H:
                continue
            for j in range(kw):
                ix = ox * sw - pl + j * dw
                if 0 <= ix < W:
                    _max_into(o + ox * C + c0, x + ((iy - x0) * W + ix) * C + c0, C - c0)


cdef inline void _max_into(float_rp o, cfloat_rp x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        o[c] = o[c] if o[c] > x[c] else x[c]
