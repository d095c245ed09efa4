# cython: language_level=3
"""Depthwise convolution of any kernel size, stride, padding and dilation, NHWC fp32, with
bias and optional ReLU6, on a window of input rows.

Low-level kernel: no validation here (decolla.graph.ops checks the window). Computes output
rows [r0, r0 + out.shape[0]) from x = rows [x0, x0 + x.shape[0]) of an input of height
H: output pixel (r, c) reads input (r*sh - pt + i*dh, c*sw - pl + j*dw) for every tap
(i, j), taps outside the input being the zero padding. The loop over channels is the
vector loop: blocks of 32, 16 and 8 channels accumulate in registers (gcc vector types,
so every ISA build gets its own width) over all taps and are stored once; fewer than 8
remaining channels accumulate in the output row. An activation other than ReLU6 (`act`, act.pyx's codes)
is applied to each output row while it is in cache.
"""
from cython.parallel cimport prange

include "_common.pxi"

include "_act.pxi"

cdef extern from *:
    """
    typedef float dwk_v16 __attribute__((vector_size(64)));
    typedef float dwk_v16u __attribute__((vector_size(64), aligned(4), may_alias));
    typedef float dwk_v8 __attribute__((vector_size(32)));
    typedef float dwk_v8u __attribute__((vector_size(32), aligned(4), may_alias));
    /* Blocks of channels in registers: 32 (two 16-float vectors), then 16, then 8, so
       every channel count that is a multiple of 8 (every zoo network's) runs vectorised;
       fewer than 8 left go through _tail. NP pixels (1 or 4: a quad, each weight vector
       loaded once for the four) side by side, input columns ix0 + k * sw; `edge`: some
       tap of some pixel falls outside the row, checked per pixel and tap (a quad at a
       row's edge, instead of four single pixels each a 2-chain latency-bound sum). The
       taps are summed in the same order on every path (bias, then tap by tap, skipping
       those outside the input), so every path gives the same bits. */
    /* A quad's tap outside the row, AVX-512: a masked load (no fault, no read) and a
       masked multiply-add that keeps the sum as it is, instead of a branch per pixel and
       tap (mispredicted often enough to cost more than the sums on 7-pixel rows); the
       same bits as skipping it. */
    #ifdef __AVX512F__
    #include <immintrin.h>
    #define DWK_MASKED 1
    #define DWK_MFMA16(acc, p, w, ok) ((dwk_v16)_mm512_mask3_fmadd_ps(                   \\
        _mm512_maskz_loadu_ps((__mmask16)-(ok), (p)), (__m512)(w), (__m512)(acc),        \\
        (__mmask16)-(ok)))
    #define DWK_MFMA8(acc, p, w, ok) ((dwk_v8)_mm256_mask3_fmadd_ps(                     \\
        _mm256_maskz_loadu_ps((__mmask8)-(ok), (p)), (__m256)(w), (__m256)(acc),         \\
        (__mmask8)-(ok)))
    #else
    #define DWK_MASKED 0
    #define DWK_MFMA16(acc, p, w, ok) (acc)
    #define DWK_MFMA8(acc, p, w, ok) (acc)
    #endif
    #define DWK_BLOCK(NAME, VT, VTU, L, NV)                                               \\
    static inline __attribute__((always_inline)) void NAME(                              \\
            float* o, const float* x, const float* w, const float* b, ptrdiff_t iy0,     \\
            ptrdiff_t ix0, ptrdiff_t x0, ptrdiff_t H, ptrdiff_t W, ptrdiff_t C,           \\
            ptrdiff_t kh, ptrdiff_t kw, int dh, int dw, int sw, ptrdiff_t c0,            \\
            const int NP, const int edge) {                                              \\
        VT a[4][NV];                                                                     \\
        for (int k = 0; k < NP; k++)                                                     \\
            for (int v = 0; v < NV; v++)                                                 \\
                a[k][v] = *(const VTU*)(b + c0 + v * L);                                 \\
        for (ptrdiff_t i = 0; i < kh; i++) {                                             \\
            ptrdiff_t iy = iy0 + i * dh;                                                 \\
            if (iy < 0 || iy >= H) continue;                                             \\
            const float* xr = x + (iy - x0) * W * C + c0;                                \\
            const float* wr = w + i * kw * C + c0;                                       \\
            for (ptrdiff_t j = 0; j < kw; j++) {                                         \\
                VT wv[NV];                                                               \\
                for (int v = 0; v < NV; v++)                                             \\
                    wv[v] = *(const VTU*)(wr + j * C + v * L);                           \\
                for (int k = 0; k < NP; k++) {                                           \\
                    ptrdiff_t ix = ix0 + k * sw + j * dw;                                \\
                    int ok = ix >= 0 && ix < W;                                          \\
                    if (DWK_MASKED && edge && NP > 1) {                                  \\
                        for (int v = 0; v < NV; v++)                                     \\
                            a[k][v] = DWK_MFMA##L(a[k][v], xr + ix * C + v * L, wv[v], ok); \\
                        continue;                                                        \\
                    }                                                                    \\
                    if (edge && !ok) continue;                                           \\
                    for (int v = 0; v < NV; v++)                                         \\
                        a[k][v] += *(const VTU*)(xr + ix * C + v * L) * wv[v];           \\
                }                                                                        \\
            }                                                                            \\
        }                                                                                \\
        for (int k = 0; k < NP; k++)                                                     \\
            for (int v = 0; v < NV; v++)                                                 \\
                *(VTU*)(o + k * C + c0 + v * L) = a[k][v];                               \\
    }
    DWK_BLOCK(dwk_b32, dwk_v16, dwk_v16u, 16, 2)
    DWK_BLOCK(dwk_b16, dwk_v16, dwk_v16u, 16, 1)
    DWK_BLOCK(dwk_b8, dwk_v8, dwk_v8u, 8, 1)
    /* AVX-512 only: elsewhere a quad's eight 16-float accumulators do not fit in the
       registers. */
    #ifdef __AVX512F__
    #define DWK_QUAD 1
    #else
    #define DWK_QUAD 0
    #endif
    #define DWK_CALL(B, NP, EDGE) B(o + ox * C, x, w, b, iy0, ox * sw - pl, x0, H, W, C,  \\
                                    kh, kw, dh, dw, sw, c0, NP, EDGE)
    #define DWK_WIDTH(NP, EDGE) do {                                                     \\
            if (width == 32) DWK_CALL(dwk_b32, NP, EDGE);                                \\
            else if (width == 16) DWK_CALL(dwk_b16, NP, EDGE);                           \\
            else DWK_CALL(dwk_b8, NP, EDGE);                                             \\
        } while (0)
    /* Channels [c0, c0 + width) (width 32, 16 or 8) of one output row of Wo pixels (o
       its first), whose first input row is iy0: by quads where the build has them (a
       short last quad moved back to end at the row's end: its pixels are computed twice,
       the same), else pixel by pixel. [qa, qb): the pixels that read only inside the
       row. */
    static void dwk_row(float* o, const float* x, const float* w, const float* b,
                        ptrdiff_t iy0, ptrdiff_t pl, ptrdiff_t x0, ptrdiff_t H, ptrdiff_t W,
                        ptrdiff_t C, ptrdiff_t kh, ptrdiff_t kw, int dh, int dw, int sw,
                        ptrdiff_t Wo, ptrdiff_t qa, ptrdiff_t qb, ptrdiff_t c0, int width) {
        ptrdiff_t ox = 0;
        while (ox < Wo) {
            if (DWK_QUAD && Wo >= 4) {
                if (ox + 4 > Wo)
                    ox = Wo - 4;
                if (qa <= ox && ox + 4 <= qb)
                    DWK_WIDTH(4, 0);
                else
                    DWK_WIDTH(4, 1);
                ox += 4;
            } else {
                DWK_WIDTH(1, 1);
                ox += 1;
            }
        }
    }
    """
    void dwk_row(float* o, const float* x, const float* w, const float* b, Py_ssize_t iy0,
                 Py_ssize_t pl, Py_ssize_t x0, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                 Py_ssize_t kh, Py_ssize_t kw, int dh, int dw, int sw, Py_ssize_t Wo,
                 Py_ssize_t qa, Py_ssize_t qb, Py_ssize_t c0, int width) nogil


cdef enum:
    L1_BYTES = 32 * 1024
    L2_BYTES = 512 * 1024


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


cdef void _rows(float* o, const float* x, const float* w, const float* b, Py_ssize_t r0,
                Py_ssize_t rows, Py_ssize_t x0, Py_ssize_t H, Py_ssize_t W, Py_ssize_t Wo,
                Py_ssize_t C, Py_ssize_t kh, Py_ssize_t kw, int sh, int sw, int pt, int pl,
                int dh, int dw, bint relu6, int act, float aa, float ab) noexcept nogil:
    """Output rows [r0, r0 + rows) (o: the first): one block of channels at a time over
    all of them, so that the block's weights and input columns stay in L1 while they are
    reused (pixel by pixel over all channels, each pixel re-read them from L2: the 25
    taps of 32 channels at C floats apart); then the activation."""
    cdef Py_ssize_t r, c0, c, ox, width, cend = C - C % 8
    cdef Py_ssize_t qa = (pl + sw - 1) // sw
    cdef Py_ssize_t qb = (W - 1 + pl - (kw - 1) * dw) // sw + 1
    cdef float s
    if W - 1 + pl - (kw - 1) * dw < 0:
        qb = 0
    qb = min(qb, Wo)
    c0 = 0
    while c0 < cend:
        width = 32 if c0 + 32 <= cend else (16 if c0 + 16 <= cend else 8)
        for r in range(rows):
            dwk_row(o + r * Wo * C, x, w, b, (r0 + r) * sh - pt, pl, x0, H, W, C, kh, kw,
                    dh, dw, sw, Wo, qa, qb, c0, width)
        c0 += width
    if cend < C:
        for r in range(rows):
            for ox in range(Wo):
                _tail(o + (r * Wo + ox) * C, x, w, b, r0 + r, ox, x0, H, W, C, kh, kw, sh,
                      sw, pt, pl, dh, dw, cend)
    if relu6:
        for c in range(rows * Wo * C):
            s = o[c]
            s = s if s > <float>0.0 else <float>0.0
            o[c] = s if s < <float>6.0 else <float>6.0
    elif act >= 0:
        _run(o, rows * Wo * C, act, aa, ab)


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
    # Groups of g output rows: a 32-channel block's input rows for them fit in L1_BYTES,
    # and their output (for the activation pass) in L2_BYTES.
    cdef Py_ssize_t g = (L1_BYTES // max(1, 128 * W) - (kh - 1) * dh - 1) // sh + 1
    g = max(1, min(g, rows, L2_BYTES // max(1, 4 * Wo * C)))
    if threads > 1:
        g = min(g, (rows + threads - 1) // threads)
    cdef Py_ssize_t ng = (rows + g - 1) // g
    for r in prange(ng, nogil=True, num_threads=threads, schedule="static"):
        _rows(op + r * g * Wo * C, xp, wp, bp, r0 + r * g, min(g, rows - r * g), x0, H, W,
              Wo, C, kh, kw, sh, sw, pt, pl, dh, dw, relu6, act, act_a, act_b)

