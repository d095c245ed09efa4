/* The packed pointwise micro-kernel of the AVX-512 build (x86-64-v4), and the direct
   (implicit im2col) convolution made of it. Included by kernels/_pw_packed.pxi.

   A block of 12 pixels x 32 channels keeps 24 zmm accumulators; each K step loads two
   weight vectors and broadcasts one input per pixel. A dense convolution is the same
   block summed over segments: a segment is one kernel row's taps (kw * C consecutive
   floats of the input when the dilation is 1, else one tap's C), read straight from the
   NHWC input at one offset per segment, the block's pixels `ps` floats apart (stride *
   C), so no patch matrix is ever written. The weight rows run in the same (i, j, c)
   order as the patch's, so both share one packed weight. */
#ifndef DECOLLA_PW_AVX512_H
#define DECOLLA_PW_AVX512_H
#include <stddef.h>

/* Activations of the epilogue: none, ReLU6 (what a true `relu6` flag passes), ReLU,
   hard-swish, SiLU (the last three in the AVX-512 build only). */
#define PW_ACT_NONE 0
#define PW_ACT_RELU6 1
#define PW_ACT_RELU 2
#define PW_ACT_HARDSWISH 3
#define PW_ACT_SILU 4

#if defined(__AVX512F__)
#include <immintrin.h>
#define PW_AVX512 1
#define PW5_NR 32   /* two zmm vectors */
#define PW5_MR 12   /* 12 x 32 accumulators = 24 of the 32 zmm registers */
#define PW5_INLINE static inline __attribute__((always_inline))
#define PW5_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* exp(x), 16 lanes: kernels/act.pyx's decolla_expf (Cephes' polynomial on a
   range-reduced argument) step for step, so SiLU here matches act.apply's. */
PW5_INLINE __m512 pw5_exp(__m512 x) {
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
    __m512 n = _mm512_sub_ps(t, magic);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                               _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t),
                                                   _mm512_set1_epi32(127 - 0x4B400000)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* o[0:16] = act(acc + bias) (+ r) on the channels of mask m: the epilogue of
   bias_act_rows, in registers. max/min keep its NaN and -0 results (s > 0 ? s : 0). */
PW5_INLINE void pw5_out(float *o, const float *r, __m512 acc, __m512 bias, __mmask16 m,
                        int act) {
    __m512 s = _mm512_add_ps(acc, bias);
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    if (act == PW_ACT_RELU6)
        s = _mm512_min_ps(_mm512_max_ps(s, zero), _mm512_set1_ps(6.0f));
    else if (act == PW_ACT_RELU)
        s = _mm512_max_ps(s, zero);
    else if (act == PW_ACT_HARDSWISH)   /* s * clamp(s / 6 + 1/2, 0, 1) */
        s = _mm512_mul_ps(s, _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(
                s, _mm512_set1_ps(1.0f / 6.0f), _mm512_set1_ps(0.5f)), zero), one));
    else if (act == PW_ACT_SILU)        /* s / (1 + exp(-s)) */
        s = _mm512_div_ps(s, _mm512_add_ps(one, pw5_exp(_mm512_sub_ps(zero, s))));
    if (r)
        s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, r));
    _mm512_mask_storeu_ps(o, m, s);
}

/* mr (<= 12, a literal after inlining) pixels x nt (<= 32) channels from one weight
   panel (rows of 32 floats; only its first 16 channels unless `wide`): the sum over
   nseg segments of L inputs, pixel i of segment s reading a[off[s] + i * ps + k]. */
PW5_INLINE void pw5_block(const float *__restrict__ a, const ptrdiff_t *off, ptrdiff_t nseg,
                          ptrdiff_t L, ptrdiff_t ps, const float *__restrict__ w,
                          const float *__restrict__ b, float *o, ptrdiff_t ldo,
                          const float *r, ptrdiff_t rs, ptrdiff_t nt, int act,
                          const int mr, const int wide) {
#define PW5_DECL(i) __m512 c##i##a = _mm512_setzero_ps(), c##i##b = _mm512_setzero_ps();
    PW5_ROWS(PW5_DECL)
    const float *wk = w;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        /* One moving pointer into the pixels' inputs and one into the panel: pixel i is
           at ak[i * ps], so the loop needs 11 offset registers and no spilled pointer. */
        const float *ak = a + off[s], *aend = ak + L;
        if (wide) {
            for (; ak != aend; wk += 32, ak++) {
                __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
#define PW5_FMA2(i) if (mr > i) { __m512 x = _mm512_set1_ps(ak[i * ps]); \
                c##i##a = _mm512_fmadd_ps(x, w0, c##i##a); \
                c##i##b = _mm512_fmadd_ps(x, w1, c##i##b); }
                PW5_ROWS(PW5_FMA2)
            }
        } else {
            for (; ak != aend; wk += 32, ak++) {
                __m512 w0 = _mm512_loadu_ps(wk);
#define PW5_FMA1(i) if (mr > i) \
                c##i##a = _mm512_fmadd_ps(_mm512_set1_ps(ak[i * ps]), w0, c##i##a);
                PW5_ROWS(PW5_FMA1)
            }
        }
    }
    __mmask16 m0 = nt >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nt) - 1u);
    __mmask16 m1 = nt >= 32 ? (__mmask16)0xFFFF
                 : nt <= 16 ? (__mmask16)0 : (__mmask16)((1u << (nt - 16)) - 1u);
    __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
#define PW5_OUT(i) if (mr > i) { \
        pw5_out(o + i * ldo, r ? r + i * rs : NULL, c##i##a, b0, m0, act); \
        if (wide) pw5_out(o + i * ldo + 16, r ? r + i * rs + 16 : NULL, c##i##b, b1, m1, \
                          act); }
    PW5_ROWS(PW5_OUT)
}

/* One block of mr (1..12) pixels, dispatched to the copy specialised for that height. */
static void pw5_any(const float *a, const ptrdiff_t *off, ptrdiff_t nseg, ptrdiff_t L,
                    ptrdiff_t ps, const float *w, const float *b, float *o, ptrdiff_t ldo,
                    const float *r, ptrdiff_t rs, ptrdiff_t nt, int act, ptrdiff_t mr) {
    int wide = nt > 16;
    switch (mr) {
#define PW5_CASE(n) case n: { if (wide) \
        pw5_block(a, off, nseg, L, ps, w, b, o, ldo, r, rs, nt, act, n, 1); \
        else pw5_block(a, off, nseg, L, ps, w, b, o, ldo, r, rs, nt, act, n, 0); } break;
    PW5_CASE(12) PW5_CASE(11) PW5_CASE(10) PW5_CASE(9) PW5_CASE(8) PW5_CASE(7)
    PW5_CASE(6) PW5_CASE(5) PW5_CASE(4) PW5_CASE(3) PW5_CASE(2) PW5_CASE(1)
    }
}

/* All M pixels (rows K floats apart) against one K x 32 panel, 12 at a time. */
static void pw5_panel(const float *a, ptrdiff_t M, ptrdiff_t K, const float *w,
                      const float *b, float *o, ptrdiff_t ldo, const float *r,
                      ptrdiff_t rs, ptrdiff_t nt, int act) {
    const ptrdiff_t off0 = 0;
    for (ptrdiff_t p = 0; p < M; p += PW5_MR) {
        ptrdiff_t mr = M - p < PW5_MR ? M - p : PW5_MR;
        pw5_any(a + p * K, &off0, 1, K, K, w, b, o + p * ldo, ldo, r ? r + p * rs : NULL, rs,
                nt, act, mr);
    }
}

/* Output rows [0, rows) (wo pixels each, rows ldo * wo floats apart) x nt channels of a
   dense convolution against one panel: pixel x of output row y reads the segments at
   xp + (y * sh * Wp + x * sw) * C + off[s]. Each row is cut into blocks of equal size
   (at most 12): a block of 7 keeps 14 accumulators busy, one of 2 would wait on the
   multiply-add latency. */
static void pw5_conv_panel(const float *xp, ptrdiff_t Wp, ptrdiff_t C, ptrdiff_t rows,
                           ptrdiff_t wo, ptrdiff_t sh, ptrdiff_t sw, const ptrdiff_t *off,
                           ptrdiff_t nseg, ptrdiff_t L, const float *w, const float *b,
                           float *o, ptrdiff_t ldo, ptrdiff_t nt, int act) {
    ptrdiff_t nblk = (wo + PW5_MR - 1) / PW5_MR;
    for (ptrdiff_t y = 0; y < rows; y++) {
        const float *row = xp + y * sh * Wp * C;
        for (ptrdiff_t k = 0; k < nblk; k++) {
            ptrdiff_t x0 = k * wo / nblk, x1 = (k + 1) * wo / nblk;
            pw5_any(row + x0 * sw * C, off, nseg, L, sw * C, w, b, o + (y * wo + x0) * ldo,
                    ldo, NULL, 0, nt, act, x1 - x0);
        }
    }
}

#else
#define PW_AVX512 0
#define PW5_NR 32
#define PW5_MR 12
/* Never called: the build has no AVX-512. */
static void pw5_panel(const float *a, ptrdiff_t M, ptrdiff_t K, const float *w,
                      const float *b, float *o, ptrdiff_t ldo, const float *r,
                      ptrdiff_t rs, ptrdiff_t nt, int act) {
    (void)a; (void)M; (void)K; (void)w; (void)b; (void)o; (void)ldo; (void)r; (void)rs;
    (void)nt; (void)act;
}
static void pw5_conv_panel(const float *xp, ptrdiff_t Wp, ptrdiff_t C, ptrdiff_t rows,
                           ptrdiff_t wo, ptrdiff_t sh, ptrdiff_t sw, const ptrdiff_t *off,
                           ptrdiff_t nseg, ptrdiff_t L, const float *w, const float *b,
                           float *o, ptrdiff_t ldo, ptrdiff_t nt, int act) {
    (void)xp; (void)Wp; (void)C; (void)rows; (void)wo; (void)sh; (void)sw; (void)off;
    (void)nseg; (void)L; (void)w; (void)b; (void)o; (void)ldo; (void)nt; (void)act;
}
#endif
#endif
