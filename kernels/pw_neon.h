/* The packed pointwise micro-kernel of the NEON build (aarch64 with DECOLLA_NEON, ARMv8.0:
   no SVE, no fp16 arithmetic). Included by kernels/_pw_packed.pxi.

   NEON has 32 registers of 4 floats: a block of 8 pixels x 8 channels keeps its 16
   accumulators, the 8 pixels' next 4 inputs (one register per pixel, used lane by lane
   by `fmla v.4s, v.4s, v.s[j]`) and the panel's 2 weight vectors in registers, with
   no spill (tools/neon_asm_check.py checks the compiled inner loop). Per 4 K steps:
   8 input loads and 4 paired weight loads (ldp) for 64 fmla. (The x86 6 x 16 block
   would need 24 + 6 + 4 registers, a 12 x 8 one 24 + 12 + 2.) Each accumulator sums
   its K products in order, one fused multiply-add each, as the other builds do. */
#ifndef DECOLLA_PW_NEON_H
#define DECOLLA_PW_NEON_H
#include <stddef.h>

#if defined(DECOLLA_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define PW_NEON 1
#define PWN_NR 8    /* channels per weight panel: two vectors */
#define PWN_MR 8    /* pixels per block: 8 x 8 accumulators = 16 registers */
#define PWN_INLINE static inline __attribute__((always_inline))
#define PWN_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define PWN_ROWS_J(X, j) X(0, j) X(1, j) X(2, j) X(3, j) X(4, j) X(5, j) X(6, j) X(7, j)

/* *o = act(acc + *b) (+ *r): one channel of the epilogue of bias_act_rows. */
PWN_INLINE void pwn_out1(float *o, const float *r, float acc, const float *b, int relu6) {
    float s = acc + *b;
    if (relu6) {
        s = s > 0.0f ? s : 0.0f;
        s = s < 6.0f ? s : 6.0f;
    }
    *o = r ? s + *r : s;
}

/* o[0:n] = act(acc + b) (+ r) for the first n (<= 4) channels of acc: the epilogue of
   bias_act_rows in registers; the selects give its NaN and -0 results (s > 0 ? s : 0).
   Fewer than 4 channels go lane by lane: b and r may end there. */
PWN_INLINE void pwn_out(float *o, const float *r, float32x4_t acc, const float *b,
                        ptrdiff_t n, int relu6) {
    if (n >= 4) {
        float32x4_t s = vaddq_f32(acc, vld1q_f32(b));
        if (relu6) {
            const float32x4_t zero = vdupq_n_f32(0.0f), six = vdupq_n_f32(6.0f);
            s = vbslq_f32(vcgtq_f32(s, zero), s, zero);
            s = vbslq_f32(vcltq_f32(s, six), s, six);
        }
        if (r)
            s = vaddq_f32(s, vld1q_f32(r));
        vst1q_f32(o, s);
        return;
    }
    if (n > 0)
        pwn_out1(o, r, vgetq_lane_f32(acc, 0), b, relu6);
    if (n > 1)
        pwn_out1(o + 1, r ? r + 1 : NULL, vgetq_lane_f32(acc, 1), b + 1, relu6);
    if (n > 2)
        pwn_out1(o + 2, r ? r + 2 : NULL, vgetq_lane_f32(acc, 2), b + 2, relu6);
}

/* mr (<= 8, a literal after inlining) pixels, rows of K floats from a, x nt (<= 8)
   channels from one K x 8 weight panel; only its first 4 channels unless `wide`. */
PWN_INLINE void pwn_block(const float *__restrict__ a, ptrdiff_t K,
                          const float *__restrict__ w, const float *b, float *o,
                          ptrdiff_t ldo, const float *r, ptrdiff_t rs, ptrdiff_t nt,
                          int relu6, const int mr, const int wide) {
#define PWN_DECL(i) float32x4_t c##i##a = vdupq_n_f32(0.0f), c##i##b = vdupq_n_f32(0.0f);
    PWN_ROWS(PWN_DECL)
#define PWN_LANE(i, j) if (mr > i) { \
        c##i##a = vfmaq_laneq_f32(c##i##a, w0, x##i, j); \
        if (wide) c##i##b = vfmaq_laneq_f32(c##i##b, w1, x##i, j); }
/* The empty asm keeps gcc from hoisting every step's weight loads to the top of the
   loop: 8 weight vectors beside 16 accumulators and 8 inputs cost register moves. */
#define PWN_STEP(j) { \
        __asm__ volatile("" ::: "memory"); \
        const float32x4_t w0 = vld1q_f32(wk + 8 * j); \
        const float32x4_t w1 = wide ? vld1q_f32(wk + 8 * j + 4) : w0; \
        PWN_ROWS_J(PWN_LANE, j) }
#define PWN_LOADX(i) const float32x4_t x##i = mr > i ? vld1q_f32(a + i * K + k) \
                                                      : vdupq_n_f32(0.0f);
    const float *wk = w;
    ptrdiff_t k = 0;
    for (; k + 4 <= K; k += 4, wk += 32) {
        PWN_ROWS(PWN_LOADX)
        PWN_STEP(0) PWN_STEP(1) PWN_STEP(2) PWN_STEP(3)
    }
#define PWN_TAIL(i) if (mr > i) { \
        const float32x4_t x = vld1q_dup_f32(a + i * K + k); \
        c##i##a = vfmaq_f32(c##i##a, w0, x); \
        if (wide) c##i##b = vfmaq_f32(c##i##b, w1, x); }
    for (; k < K; k++, wk += 8) {
        const float32x4_t w0 = vld1q_f32(wk);
        const float32x4_t w1 = wide ? vld1q_f32(wk + 4) : w0;
        PWN_ROWS(PWN_TAIL)
    }
#define PWN_OUT(i) if (mr > i) { \
        pwn_out(o + i * ldo, r ? r + i * rs : NULL, c##i##a, b, nt, relu6); \
        if (wide) pwn_out(o + i * ldo + 4, r ? r + i * rs + 4 : NULL, c##i##b, b + 4, \
                          nt - 4, relu6); }
    PWN_ROWS(PWN_OUT)
#undef PWN_DECL
#undef PWN_LANE
#undef PWN_STEP
#undef PWN_LOADX
#undef PWN_TAIL
#undef PWN_OUT
}

/* All M pixels against one panel of nt channels, 8 at a time; each block height is a
   literal, so every call is a specialised copy with its row loop unrolled. */
static void pwn_panel(const float *a, ptrdiff_t M, ptrdiff_t K, const float *w,
                      const float *b, float *o, ptrdiff_t ldo, const float *r, ptrdiff_t rs,
                      ptrdiff_t nt, int relu6) {
    const int wide = nt > 4;
    for (ptrdiff_t p = 0; p < M;) {
        ptrdiff_t mr = M - p < PWN_MR ? M - p : PWN_MR;
        const float *ap = a + p * K, *rp = r ? r + p * rs : NULL;
        float *op = o + p * ldo;
        switch (mr) {
#define PWN_CASE(n) case n: \
            wide ? pwn_block(ap, K, w, b, op, ldo, rp, rs, nt, relu6, n, 1) \
                 : pwn_block(ap, K, w, b, op, ldo, rp, rs, nt, relu6, n, 0); break;
        PWN_CASE(8) PWN_CASE(7) PWN_CASE(6) PWN_CASE(5)
        PWN_CASE(4) PWN_CASE(3) PWN_CASE(2) PWN_CASE(1)
#undef PWN_CASE
        }
        p += mr;
    }
}

#else   /* not the NEON build */
#define PW_NEON 0
#define PWN_NR 8
#define PWN_MR 8
static inline void pwn_panel(const float *a, ptrdiff_t M, ptrdiff_t K, const float *w,
                      const float *b, float *o, ptrdiff_t ldo, const float *r, ptrdiff_t rs,
                      ptrdiff_t nt, int relu6) {
    (void)a; (void)M; (void)K; (void)w; (void)b; (void)o; (void)ldo; (void)r;
    (void)rs; (void)nt; (void)relu6;   /* never called: PW_NEON is 0 */
}
#endif
#endif
