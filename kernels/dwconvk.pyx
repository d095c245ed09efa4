# cython: language_level=3
"""Depthwise convolution of any kernel size, stride, padding and dilation, NHWC fp32, with
bias and optional ReLU6, on a window of input rows.

Low-level kernel: no validation here (decolla.graph.ops checks the window). Computes output
rows [r0, r0 + out.shape[0]) from x = rows [x0, x0 + x.shape[0]) of an input of height
H: output pixel (r, c) reads input (r*sh - pt + i*dh, c*sw - pl + j*dw) for every tap
(i, j), taps outside the input being the zero padding. The loop over channels is the
vector loop: blocks of 32 channels accumulate in registers (gcc vector types, so every
ISA build gets its own width) over all taps and are stored once; the remaining channels
accumulate in the output row. An activation other than ReLU6 (`act`, act.pyx's codes)
is applied to each output row while it is in cache.
"""
from cython.parallel cimport prange

include "_common.pxi"

include "_act.pxi"

cdef extern from *:
    """
    typedef float dwk_v16 __attribute__((vector_size(64)));
    typedef float dwk_v16u __attribute__((vector_size(64), aligned(4), may_alias));
    /* One output pixel's channels [0, cend) (cend a multiple of 32) over every tap */
    static inline void dwk_pixel32(float* o, const float* x, const float* w, const float* b,
                                   ptrdiff_t iy0, ptrdiff_t ix0, ptrdiff_t x0, ptrdiff_t H,
                                   ptrdiff_t W, ptrdiff_t C, ptrdiff_t kh, ptrdiff_t kw,
                                   int dh, int dw, ptrdiff_t cend) {
        for (ptrdiff_t c0 = 0; c0 < cend; c0 += 32) {
            dwk_v16 a0 = *(const dwk_v16u*)(b + c0), a1 = *(const dwk_v16u*)(b + c0 + 16);
            for (ptrdiff_t i = 0; i < kh; i++) {
                ptrdiff_t iy = iy0 + i * dh;
                if (iy < 0 || iy >= H) continue;
                const float* xr = x + (iy - x0) * W * C + c0;
                const float* wr = w + i * kw * C + c0;
                for (ptrdiff_t j = 0; j < kw; j++) {
                    ptrdiff_t ix = ix0 + j * dw;
                    if (ix < 0 || ix >= W) continue;
                    const float* xp = xr + ix * C;
                    const float* wp = wr + j * C;
                    a0 += *(const dwk_v16u*)xp * *(const dwk_v16u*)wp;
                    a1 += *(const dwk_v16u*)(xp + 16) * *(const dwk_v16u*)(wp + 16);
                }
            }
            *(dwk_v16u*)(o + c0) = a0;
            *(dwk_v16u*)(o + c0 + 16) = a1;
        }
    }
    /* Four output pixels side by side (input columns ix0 + k * sw, every tap inside the
       row): each weight vector loaded once for the four. AVX-512 only: elsewhere the eight
       accumulators do not fit in the registers. */
    #ifdef __AVX512F__
    #define DWK_QUAD 1
    #else
    #define DWK_QUAD 0
    #endif
    static inline void dwk_quad32(float* o, const float* x, const float* w, const float* b,
                                  ptrdiff_t iy0, ptrdiff_t ix0, ptrdiff_t x0, ptrdiff_t H,
                                  ptrdiff_t W, ptrdiff_t C, ptrdiff_t kh, ptrdiff_t kw,
                                  int dh, int dw, int sw, ptrdiff_t cend) {
        const ptrdiff_t ps = (ptrdiff_t)sw * C;
        for (ptrdiff_t c0 = 0; c0 < cend; c0 += 32) {
            dwk_v16 b0 = *(const dwk_v16u*)(b + c0), b1 = *(const dwk_v16u*)(b + c0 + 16);
            dwk_v16 a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0,
                    a31 = b1;
            for (ptrdiff_t i = 0; i < kh; i++) {
                ptrdiff_t iy = iy0 + i * dh;
                if (iy < 0 || iy >= H) continue;
                const float* xr = x + ((iy - x0) * W + ix0) * C + c0;
                const float* wr = w + i * kw * C + c0;
                for (ptrdiff_t j = 0; j < kw; j++) {
                    const float* xp = xr + j * dw * C;
                    dwk_v16 w0 = *(const dwk_v16u*)(wr + j * C);
                    dwk_v16 w1 = *(const dwk_v16u*)(wr + j * C + 16);
                    a00 += *(const dwk_v16u*)xp * w0;
                    a01 += *(const dwk_v16u*)(xp + 16) * w1;
                    a10 += *(const dwk_v16u*)(xp + ps) * w0;
                    a11 += *(const dwk_v16u*)(xp + ps + 16) * w1;
                    a20 += *(const dwk_v16u*)(xp + 2 * ps) * w0;
                    a21 += *(const dwk_v16u*)(xp + 2 * ps + 16) * w1;
                    a30 += *(const dwk_v16u*)(xp + 3 * ps) * w0;
                    a31 += *(const dwk_v16u*)(xp + 3 * ps + 16) * w1;
                }
            }
            *(dwk_v16u*)(o + c0) = a00;
            *(dwk_v16u*)(o + c0 + 16) = a01;
            *(dwk_v16u*)(o + C + c0) = a10;
            *(dwk_v16u*)(o + C + c0 + 16) = a11;
            *(dwk_v16u*)(o + 2 * C + c0) = a20;
            *(dwk_v16u*)(o + 2 * C + c0 + 16) = a21;
            *(dwk_v16u*)(o + 3 * C + c0) = a30;
            *(dwk_v16u*)(o + 3 * C + c0 + 16) = a31;
        }
    }
    """
    int DWK_QUAD
    void dwk_quad32(float* o, const float* x, const float* w, const float* b,
                    Py_ssize_t iy0, Py_ssize_t ix0, Py_ssize_t x0, Py_ssize_t H, Py_ssize_t W,
                    Py_ssize_t C, Py_ssize_t kh, Py_ssize_t kw, int dh, int dw, int sw,
                    Py_ssize_t cend) nogil
    void dwk_pixel32(float* o, const float* x, const float* w, const float* b,
                     Py_ssize_t iy0, Py_ssize_t ix0, Py_ssize_t x0, Py_ssize_t H, Py_ssize_t W,
                     Py_ssize_t C, Py_ssize_t kh, Py_ssize_t kw, int dh, int dw,
                     Py_ssize_t cend) nogil


cdef inline void _taps(float_rp o, cfloat_rp xr, cfloat_rp wr, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        o[c] += xr[c] * wr[c]


cdef inline void _tail(float* op, const float* x, const float* w, const float* b,
                       Py_ssize_t r, Py_ssize_t ox, Py_ssize_t x0, Py_ssize_t H, Py_ssize_t W,
                       Py_ssize_t C, Py_ssize_t kh, Py_ssize_t kw, int sh, int sw, int pt,
                       int pl, int dh, int dw, Py_ssize_t cend) noexcept nogil:
    """Channels [cend, C) of output pixel (r, ox), accumulated in the output."""
    cdef Py_ssize_t i, j, c, iy, ix
    for c in range(cend, C):
        op[c] = b[c]
    for i in range(kh):
        iy = r * sh - pt + i * dh
        if iy < 0 or iy >= H:
            continue
        for j in range(kw):
            ix = ox * sw - pl + j * dw
            if ix < 0 or ix >= W:
                continue
            _taps(op + cend, x + ((iy - x0) * W + ix) * C + cend,
                  w + (i * kw + j) * C + cend, C - cend)


cdef void _row(float* o, const float* x, const float* w, const float* b, Py_ssize_t r,
               Py_ssize_t x0, Py_ssize_t H, Py_ssize_t W, Py_ssize_t Wo, Py_ssize_t C,
               Py_ssize_t kh, Py_ssize_t kw, int sh, int sw, int pt, int pl, int dh,
               int dw, bint relu6, int act, float aa, float ab) noexcept nogil:
    cdef Py_ssize_t ox, i, j, c, iy, ix, cend = C - C % 32
    cdef Py_ssize_t qa = 0, qb = 0      # output columns [qa, qb) read only inside the row
    cdef float s
    cdef float* op
    if DWK_QUAD and cend:
        qa = (pl + sw - 1) // sw
        qb = (W - 1 + pl - (kw - 1) * dw) // sw + 1 if W - 1 + pl - (kw - 1) * dw >= 0 else 0
        qb = min(qb, Wo)
        if qb - qa < 4:
            qa = qb = 0
    ox = 0
    while ox < Wo:
        op = o + ox * C
        if qa <= ox and ox + 4 <= qb:
            dwk_quad32(op, x, w, b, r * sh - pt, ox * sw - pl, x0, H, W, C, kh, kw, dh, dw,
                       sw, cend)
            if cend < C:
                for c in range(4):
                    _tail(op + c * C, x, w, b, r, ox + c, x0, H, W, C, kh, kw, sh, sw, pt,
                          pl, dh, dw, cend)
            ox += 4
            continue
        if cend:
            dwk_pixel32(op, x, w, b, r * sh - pt, ox * sw - pl, x0, H, W, C, kh, kw, dh, dw,
                        cend)
        if cend < C:
            _tail(op, x, w, b, r, ox, x0, H, W, C, kh, kw, sh, sw, pt, pl, dh, dw, cend)
        ox += 1
    if relu6:
        for c in range(Wo * C):
            s = o[c]
            s = s if s > <float>0.0 else <float>0.0
            o[c] = s if s < <float>6.0 else <float>6.0
    elif act >= 0:
        _run(o, Wo * C, act, aa, ab)


def dwconv(const float[:, :, ::1] x, const float[:, :, ::1] w, const float[::1] b,
           float[:, :, ::1] out, Py_ssize_t r0, Py_ssize_t x0, Py_ssize_t H, int sh, int sw,
           int pt, int pl, int dh, int dw, bint relu6, int threads=1, int act=-1,
           float act_a=0.0, float act_b=0.0):
    """Output rows [r0, r0 + len(out)) of a depthwise convolution (see the module docstring);
    then ReLU6, or the activation `act` (act.pyx's code, -1: none) with its parameters."""
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
             dh, dw, relu6, act, act_a, act_b)
