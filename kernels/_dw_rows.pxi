# The depthwise 3x3 row kernels (included by dwconv.pyx and fused.pyx; each module
# compiles them with its own ISA flags). Needs _common.pxi included first.

cdef extern from *:
    """
    /* _quad is called with a literal stride; gcc folds it into constant offsets (and
       loads each column shared by neighbouring pixels once) only when it inlines it. */
    #undef CYTHON_INLINE
    #define CYTHON_INLINE __inline__ __attribute__((always_inline, unused))
    """


# The AVX-512 build (x86-64-v4) computes the interior of a row with intrinsics
# (dw5_run): per 16 channels, the 9 weights stay in zmm registers while the whole run of
# pixels passes, each pixel 9 loads and 9 FMAs through 3 moving row pointers. The NEON
# build (aarch64) does the same per 8 channels (dwn_run, kernels/dw_neon.h). dw_run is
# this build's run kernel, DW_RUN whether it has one.
cdef extern from *:
    """
    #include <stddef.h>
    #include "dw_neon.h"
    #if defined(__AVX512F__)
    #include <immintrin.h>
    #define DW_AVX512 1
    /* One block of 16 channels (m: the channels present) of npix pixels. Per pixel the
       taps are summed in the order of _pixel (b + tap 0 + ... + tap 8, each an FMA), so
       both paths give the same bits; max/min keep _clamp6's NaN and -0 results. */
    static inline __attribute__((always_inline)) void
    dw5_block(float *o, ptrdiff_t on, const float *a, const float *e, const float *g,
              ptrdiff_t sa, ptrdiff_t se, ptrdiff_t sg, ptrdiff_t cx, const float *w,
              ptrdiff_t wc, const float *b, ptrdiff_t npix, int relu6, __mmask16 m,
              const int masked) {
    #define DW5_LD(p) (masked ? _mm512_maskz_loadu_ps(m, (p)) : _mm512_loadu_ps(p))
        const __m512 w0 = DW5_LD(w), w1 = DW5_LD(w + wc), w2 = DW5_LD(w + 2 * wc);
        const __m512 w3 = DW5_LD(w + 3 * wc), w4 = DW5_LD(w + 4 * wc), w5 = DW5_LD(w + 5 * wc);
        const __m512 w6 = DW5_LD(w + 6 * wc), w7 = DW5_LD(w + 7 * wc), w8 = DW5_LD(w + 8 * wc);
        const __m512 bv = DW5_LD(b), zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.0f);
        for (ptrdiff_t i = 0; i < npix; i++) {
            __m512 acc = _mm512_fmadd_ps(DW5_LD(a), w0, bv);
            acc = _mm512_fmadd_ps(DW5_LD(a + cx), w1, acc);
            acc = _mm512_fmadd_ps(DW5_LD(a + 2 * cx), w2, acc);
            acc = _mm512_fmadd_ps(DW5_LD(e), w3, acc);
            acc = _mm512_fmadd_ps(DW5_LD(e + cx), w4, acc);
            acc = _mm512_fmadd_ps(DW5_LD(e + 2 * cx), w5, acc);
            acc = _mm512_fmadd_ps(DW5_LD(g), w6, acc);
            acc = _mm512_fmadd_ps(DW5_LD(g + cx), w7, acc);
            acc = _mm512_fmadd_ps(DW5_LD(g + 2 * cx), w8, acc);
            if (relu6)
                acc = _mm512_min_ps(_mm512_max_ps(acc, zero), six);
            if (masked)
                _mm512_mask_storeu_ps(o, m, acc);
            else
                _mm512_storeu_ps(o, acc);
            a += sa; e += se; g += sg; o += on;
        }
    #undef DW5_LD
    }

    /* npix adjacent output pixels (on floats apart) of n channels; r0..r2 point at the
       first input column the first pixel reads in each of the 3 input rows, s0..s2 are
       the floats from one pixel's columns to the next's (0 for a row of zeros). */
    static void dw5_run(float *o, ptrdiff_t on, const float *r0, const float *r1,
                        const float *r2, ptrdiff_t s0, ptrdiff_t s1, ptrdiff_t s2,
                        ptrdiff_t cx, const float *w, ptrdiff_t wc, const float *b,
                        ptrdiff_t n, ptrdiff_t npix, int relu6) {
        ptrdiff_t c = 0;
        for (; c + 16 <= n; c += 16)
            dw5_block(o + c, on, r0 + c, r1 + c, r2 + c, s0, s1, s2, cx, w + c, wc, b + c,
                      npix, relu6, (__mmask16)0xFFFF, 0);
        if (c < n)
            dw5_block(o + c, on, r0 + c, r1 + c, r2 + c, s0, s1, s2, cx, w + c, wc, b + c,
                      npix, relu6, (__mmask16)((1u << (n - c)) - 1u), 1);
    }
    #else
    #define DW_AVX512 0
    static inline void dw5_run(float *o, ptrdiff_t on, const float *r0, const float *r1,
                        const float *r2, ptrdiff_t s0, ptrdiff_t s1, ptrdiff_t s2,
                        ptrdiff_t cx, const float *w, ptrdiff_t wc, const float *b,
                        ptrdiff_t n, ptrdiff_t npix, int relu6) {
        (void)o; (void)on; (void)r0; (void)r1; (void)r2; (void)s0; (void)s1; (void)s2;
        (void)cx; (void)w; (void)wc; (void)b; (void)n; (void)npix; (void)relu6;
        /* never called: DW_AVX512 is 0 */
    }
    #endif
    #if DW_NEON
    #define dw_run dwn_run
    #else
    #define dw_run dw5_run
    #endif
    #define DW_RUN (DW_AVX512 || DW_NEON)
    """
    enum:
        DW_AVX512
        DW_NEON
        DW_RUN
    void dw_run(float* o, Py_ssize_t on, const float* r0, const float* r1, const float* r2,
                 Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2, Py_ssize_t cx, const float* w,
                 Py_ssize_t wc, const float* b, Py_ssize_t n, Py_ssize_t npix,
                 bint relu6) noexcept nogil


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
    """One output row: interior pixels all in one run (AVX-512, NEON) or four at a time
    (if quad), the others one by one."""
    cdef const float* rows[3]
    cdef Py_ssize_t dy, iy
    for dy in range(3):
        iy = oy * stride - 1 + dy
        rows[dy] = x + (iy - in_row0) * W * cx if 0 <= iy < in_height else NULL
    row_from(orow, rows, zero, stride, W, Wo, cx, w, wc, b, n, relu6, quad)


cdef void row_from(float* orow, const float** rows, const float* zero, Py_ssize_t stride,
                   Py_ssize_t W, Py_ssize_t Wo, Py_ssize_t cx, const float* w, Py_ssize_t wc,
                   const float* b, Py_ssize_t n, bint relu6, bint quad) noexcept nogil:
    """One output row from its 3 input rows (NULL: a row of zero padding), each W pixels
    of cx floats."""
    cdef const float* q[3]
    cdef const float* p[9]
    cdef Py_ssize_t dy, dx, ix, ox, ox_hi
    # pixels [1, ox_hi) read only in-range columns (ox * stride + 1 < W)
    ox_hi = (W - 2) // stride + 1 if W >= 2 else 0
    if ox_hi > Wo:
        ox_hi = Wo
    ox = 0
    while ox < Wo:
        if DW_RUN and quad and ox >= 1 and ox < ox_hi:
            for dy in range(3):
                # a missing row reads the same 3 columns of zeros for every pixel
                q[dy] = rows[dy] + (ox * stride - 1) * cx if rows[dy] != NULL else zero
            dw_run(orow + ox * n, n, q[0], q[1], q[2],
                    stride * cx if rows[0] != NULL else 0,
                    stride * cx if rows[1] != NULL else 0,
                    stride * cx if rows[2] != NULL else 0,
                    cx, w, wc, b, n, ox_hi - ox, relu6)
            ox = ox_hi
            continue
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
