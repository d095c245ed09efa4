/* The depthwise 3x3 interior run of the NEON build (aarch64 with DECOLLA_NEON). Included
   by kernels/_dw_rows.pxi; the AVX-512 build's dw5_run is its x86 counterpart.

   Per block of 8 channels (then 4, then single channels) the 9 weights and the bias stay
   in registers while the whole run of pixels passes, each pixel 9 loads and 9 fused
   multiply-adds per vector through 3 moving row pointers. The taps are summed in the
   order of _pixel (b + tap 0 + ... + tap 8, each one fused multiply-add, as gcc
   contracts _pixel's expression), so the run and the one-pixel path give the same
   bits. */
#ifndef DECOLLA_DW_NEON_H
#define DECOLLA_DW_NEON_H
#include <stddef.h>

#if defined(DECOLLA_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define DW_NEON 1
#define DWN_INLINE static inline __attribute__((always_inline))

/* _clamp6 on 4 lanes: the selects give its NaN and -0 results (s > 0 ? s : 0). */
DWN_INLINE float32x4_t dwn_clamp6(float32x4_t s) {
    const float32x4_t zero = vdupq_n_f32(0.0f), six = vdupq_n_f32(6.0f);
    s = vbslq_f32(vcgtq_f32(s, zero), s, zero);
    return vbslq_f32(vcltq_f32(s, six), s, six);
}

/* One block of 4 * nv (nv = 1 or 2, a literal after inlining) channels of npix pixels;
   a, e, g: the first input column of the 3 input rows, sa, se, sg: floats from one
   pixel's columns to the next's (0 for a row of zeros). */
DWN_INLINE void dwn_block(float *o, ptrdiff_t on, const float *a, const float *e,
                          const float *g, ptrdiff_t sa, ptrdiff_t se, ptrdiff_t sg,
                          ptrdiff_t cx, const float *w, ptrdiff_t wc, const float *b,
                          ptrdiff_t npix, int relu6, const int nv) {
    float32x4_t wt[2][9], bv[2];
    for (int v = 0; v < nv; v++) {
        for (int t = 0; t < 9; t++)
            wt[v][t] = vld1q_f32(w + t * wc + 4 * v);
        bv[v] = vld1q_f32(b + 4 * v);
    }
    for (ptrdiff_t i = 0; i < npix; i++) {
        for (int v = 0; v < nv; v++) {
            const ptrdiff_t c = 4 * v;
            float32x4_t acc = vfmaq_f32(bv[v], vld1q_f32(a + c), wt[v][0]);
            acc = vfmaq_f32(acc, vld1q_f32(a + cx + c), wt[v][1]);
            acc = vfmaq_f32(acc, vld1q_f32(a + 2 * cx + c), wt[v][2]);
            acc = vfmaq_f32(acc, vld1q_f32(e + c), wt[v][3]);
            acc = vfmaq_f32(acc, vld1q_f32(e + cx + c), wt[v][4]);
            acc = vfmaq_f32(acc, vld1q_f32(e + 2 * cx + c), wt[v][5]);
            acc = vfmaq_f32(acc, vld1q_f32(g + c), wt[v][6]);
            acc = vfmaq_f32(acc, vld1q_f32(g + cx + c), wt[v][7]);
            acc = vfmaq_f32(acc, vld1q_f32(g + 2 * cx + c), wt[v][8]);
            vst1q_f32(o + c, relu6 ? dwn_clamp6(acc) : acc);
        }
        a += sa; e += se; g += sg; o += on;
    }
}

/* One channel of npix pixels, in the same order with scalar fused multiply-adds. */
DWN_INLINE void dwn_channel(float *o, ptrdiff_t on, const float *a, const float *e,
                            const float *g, ptrdiff_t sa, ptrdiff_t se, ptrdiff_t sg,
                            ptrdiff_t cx, const float *w, ptrdiff_t wc, const float *b,
                            ptrdiff_t npix, int relu6) {
    for (ptrdiff_t i = 0; i < npix; i++) {
        float s = __builtin_fmaf(a[0], w[0], *b);
        s = __builtin_fmaf(a[cx], w[wc], s);
        s = __builtin_fmaf(a[2 * cx], w[2 * wc], s);
        s = __builtin_fmaf(e[0], w[3 * wc], s);
        s = __builtin_fmaf(e[cx], w[4 * wc], s);
        s = __builtin_fmaf(e[2 * cx], w[5 * wc], s);
        s = __builtin_fmaf(g[0], w[6 * wc], s);
        s = __builtin_fmaf(g[cx], w[7 * wc], s);
        s = __builtin_fmaf(g[2 * cx], w[8 * wc], s);
        if (relu6) {
            s = s > 0.0f ? s : 0.0f;
            s = s < 6.0f ? s : 6.0f;
        }
        *o = s;
        a += sa; e += se; g += sg; o += on;
    }
}

/* npix adjacent output pixels (on floats apart) of n channels; r0..r2 point at the
   first input column the first pixel reads in each of the 3 input rows, s0..s2 are
   the floats from one pixel's columns to the next's (0 for a row of zeros). */
static void dwn_run(float *o, ptrdiff_t on, const float *r0, const float *r1,
                    const float *r2, ptrdiff_t s0, ptrdiff_t s1, ptrdiff_t s2,
                    ptrdiff_t cx, const float *w, ptrdiff_t wc, const float *b,
                    ptrdiff_t n, ptrdiff_t npix, int relu6) {
    ptrdiff_t c = 0;
    for (; c + 8 <= n; c += 8)
        dwn_block(o + c, on, r0 + c, r1 + c, r2 + c, s0, s1, s2, cx, w + c, wc, b + c,
                  npix, relu6, 2);
    if (c + 4 <= n) {
        dwn_block(o + c, on, r0 + c, r1 + c, r2 + c, s0, s1, s2, cx, w + c, wc, b + c,
                  npix, relu6, 1);
        c += 4;
    }
    for (; c < n; c++)
        dwn_channel(o + c, on, r0 + c, r1 + c, r2 + c, s0, s1, s2, cx, w + c, wc, b + c,
                    npix, relu6);
}

#else   /* not the NEON build */
#define DW_NEON 0
static inline void dwn_run(float *o, ptrdiff_t on, const float *r0, const float *r1,
                    const float *r2, ptrdiff_t s0, ptrdiff_t s1, ptrdiff_t s2,
                    ptrdiff_t cx, const float *w, ptrdiff_t wc, const float *b,
                    ptrdiff_t n, ptrdiff_t npix, int relu6) {
    (void)o; (void)on; (void)r0; (void)r1; (void)r2; (void)s0; (void)s1; (void)s2;
    (void)cx; (void)w; (void)wc; (void)b; (void)n; (void)npix; (void)relu6;
    /* never called: DW_NEON is 0 */
}
#endif
#endif
