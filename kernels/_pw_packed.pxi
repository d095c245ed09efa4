# The packed-weight pointwise kernel (included by gemm.pyx and fused.pyx; each module
# compiles it with its own ISA flags). Needs _common.pxi included first.

# Packed-weight path for few pixels: OpenBLAS repacks the whole weight matrix on
# every sgemm call, which dominates when there are only a few dozen pixels.
#
# Three micro-kernels, one per build: the AVX-512 build (x86-64-v4) multiplies 12 pixels
# by a 32-channel panel in 24 zmm accumulators (pw5_*, kernels/pw_avx512.h); the NEON
# build (aarch64) 8 pixels by an 8-channel panel in 16 q-register accumulators
# (pwn_panel, kernels/pw_neon.h); every other build 6 pixels by a 16-channel panel in 12
# ymm accumulators (_pw_block, GCC vector extensions). PW_NR / PW_MR are this build's
# panel width and block height.
cdef extern from *:
    """
    #include <stddef.h>
    #include "pw_neon.h"
    #include "pw_avx512.h"
    #define PW3_NR 16   /* channels per weight panel: two AVX2 vectors */
    #define PW3_MR 6    /* pixels per block: 6 x 16 accumulators = 12 ymm registers */
    #if PW_AVX512
    #define PW_NR PW5_NR
    #define PW_MR PW5_MR
    #elif PW_NEON
    #define PW_NR PWN_NR
    #define PW_MR PWN_MR
    #else
    #define PW_NR PW3_NR
    #define PW_MR PW3_MR
    #endif
    """
    enum:
        PW3_NR
        PW3_MR
        PW_NR
        PW_MR
        PW_AVX512
        PW_NEON
        PW_ACT_NONE
        PW_ACT_RELU6
        PW_ACT_RELU
        PW_ACT_HARDSWISH
        PW_ACT_SILU
    # act: PW_ACT_NONE, PW_ACT_RELU6 (what a true relu6 flag is), PW_ACT_RELU,
    # PW_ACT_HARDSWISH or PW_ACT_SILU
    void pw5_panel(const float* a, Py_ssize_t M, Py_ssize_t K, const float* w,
                   const float* b, float* o, Py_ssize_t ldo, const float* r, Py_ssize_t rs,
                   Py_ssize_t nt, int act) noexcept nogil
    void pw5_conv_panel(const float* xp, Py_ssize_t Wp, Py_ssize_t C, Py_ssize_t rows,
                        Py_ssize_t wo, Py_ssize_t sh, Py_ssize_t sw, const Py_ssize_t* off,
                        Py_ssize_t nseg, Py_ssize_t L, const float* w, const float* b,
                        float* o, Py_ssize_t ldo, Py_ssize_t nt, int act) noexcept nogil
    void pwn_panel(const float* a, Py_ssize_t M, Py_ssize_t K, const float* w,
                   const float* b, float* o, Py_ssize_t ldo, const float* r, Py_ssize_t rs,
                   Py_ssize_t nt, bint relu6) noexcept nogil


cdef extern from *:
    """
    #if defined(__AVX2__) && defined(__FMA__)
    #include <immintrin.h>
    #define PW3_INTRIN 1
    #define PW3_INLINE static inline __attribute__((always_inline))
    #define PW3_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

    /* Lanes [0, n) of 8 (n clipped to 0..8), as a vmaskmov mask. */
    static const int pw3_ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    PW3_INLINE __m256i pw3_mask(ptrdiff_t n) {
        n = n < 0 ? 0 : n > 8 ? 8 : n;
        return _mm256_loadu_si256((const __m256i *)(pw3_ones + 8 - n));
    }

    /* o[0:8] = act(acc + bias) (+ r) on the lanes of m, all 8 if `full`: the epilogue of
       bias_act_rows in registers. max/min give its NaN and -0 results (s > 0 ? s : 0). */
    PW3_INLINE void pw3_out(float *o, const float *r, __m256 acc, __m256 bias, __m256i m,
                            int full, int relu6, __m256 zero, __m256 six) {
        __m256 s = _mm256_add_ps(acc, bias);
        if (relu6)
            s = _mm256_min_ps(_mm256_max_ps(s, zero), six);
        if (r)
            s = _mm256_add_ps(s, full ? _mm256_loadu_ps(r) : _mm256_maskload_ps(r, m));
        if (full)
            _mm256_storeu_ps(o, s);
        else
            _mm256_maskstore_ps(o, m, s);
    }

    /* mr (<= 6, a literal after inlining) pixels x nt (<= 16) channels from one K x 16
       weight panel; only its first 8 channels unless `wide`. 12 ymm accumulators, two
       weight vectors and one broadcast: 15 of the 16 registers. */
    PW3_INLINE void pw3_block(const float *__restrict__ a, ptrdiff_t K,
                              const float *__restrict__ w, const float *__restrict__ b,
                              float *o, ptrdiff_t ldo, const float *r, ptrdiff_t rs,
                              ptrdiff_t nt, int relu6, const int mr, const int wide) {
    #define PW3_DECL(i) __m256 c##i##a = _mm256_setzero_ps(), c##i##b = _mm256_setzero_ps();
        PW3_ROWS(PW3_DECL)
        /* One moving pointer into the pixels' rows (row i at ak[i * K]) and one into the
           panel. The wide loop also pulls the same line of the next panel (packed right
           after this one; a narrow panel is the last; past the last, prefetching is
           harmless) into L2: in a whole network the weights come cold from memory, and
           the first block of each panel would wait for them (3-5 % of MobileNetV2). */
        const float *ak = a, *wk = w, *wend = w + K * PW3_NR;
        if (wide) {
            for (; wk != wend; wk += PW3_NR, ak++) {
                _mm_prefetch((const char *)(wk + K * PW3_NR), _MM_HINT_T1);
                __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
    #define PW3_FMA2(i) if (mr > i) { __m256 x = _mm256_broadcast_ss(ak + i * K); \
                c##i##a = _mm256_fmadd_ps(x, w0, c##i##a); \
                c##i##b = _mm256_fmadd_ps(x, w1, c##i##b); }
                PW3_ROWS(PW3_FMA2)
            }
        } else {
            for (; wk != wend; wk += PW3_NR, ak++) {
                __m256 w0 = _mm256_loadu_ps(wk);
    #define PW3_FMA1(i) if (mr > i) \
                c##i##a = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + i * K), w0, c##i##a);
                PW3_ROWS(PW3_FMA1)
            }
        }
        /* The epilogue's bias and constants come from volatile asm: gcc would otherwise
           hoist them out of the caller's loop over blocks and keep them in registers
           through the K loop, which then spills accumulators (17 live vectors). */
        static const float pw3_six = 6.0f;
        const float *sixp = &pw3_six;
        __m256 zero;
        __asm__ volatile("" : "+r"(b), "+r"(sixp), "+r"(nt));
        __asm__ volatile("vxorps %0, %0, %0" : "=x"(zero));
        __m256 six = _mm256_broadcast_ss(sixp);
        int full0 = nt >= 8, full1 = nt >= 16;
        __m256i m0 = pw3_mask(nt), m1 = pw3_mask(nt - 8);
        __m256 b0 = full0 ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
        __m256 b1 = full1 ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
    #define PW3_OUT(i) if (mr > i) { \
            pw3_out(o + i * ldo, r ? r + i * rs : NULL, c##i##a, b0, m0, full0, relu6, \
                    zero, six); \
            if (wide) pw3_out(o + i * ldo + 8, r ? r + i * rs + 8 : NULL, c##i##b, b1, m1, \
                              full1, relu6, zero, six); }
        PW3_ROWS(PW3_OUT)
    }
    #else
    #define PW3_INTRIN 0
    static inline void pw3_block(const float *a, ptrdiff_t K, const float *w, const float *b,
                                 float *o, ptrdiff_t ldo, const float *r, ptrdiff_t rs,
                                 ptrdiff_t nt, int relu6, const int mr, const int wide) {
        (void)a; (void)K; (void)w; (void)b; (void)o; (void)ldo; (void)r; (void)rs;
        (void)nt; (void)relu6; (void)mr; (void)wide;   /* never called: PW3_INTRIN is 0 */
    }
    #endif

    /* 8 floats of any alignment (GCC/Clang vector extensions). */
    #if defined(__AVX__)
    typedef float pw_v8 __attribute__((vector_size(32), aligned(4)));
    #define PW_LOAD(p) (*(const pw_v8 *)(p))
    #define PW_STORE(p, v) (*(pw_v8 *)(p) = (v))
    #define PW_ZERO() ((pw_v8){0})
    #define PW_FMA(acc, a, w) ((acc) + (a) * (w))
    #else
    /* Two 4-float halves: gcc lowers a 32-byte vector on a 16-byte ISA through the
       stack, where every scalar broadcast stalls (50x slower). */
    typedef float pw_v4 __attribute__((vector_size(16), aligned(4)));
    typedef struct { pw_v4 lo, hi; } pw_v8;
    static inline pw_v8 PW_LOAD(const float *p) {
        pw_v8 v = {*(const pw_v4 *)p, *(const pw_v4 *)(p + 4)}; return v; }
    static inline void PW_STORE(float *p, pw_v8 v) {
        *(pw_v4 *)p = v.lo; *(pw_v4 *)(p + 4) = v.hi; }
    static inline pw_v8 PW_ZERO(void) { pw_v8 v = {{0}, {0}}; return v; }
    static inline pw_v8 PW_FMA(pw_v8 acc, float a, pw_v8 w) {
        acc.lo += a * w.lo; acc.hi += a * w.hi; return acc; }
    #endif
    """
    enum:
        PW3_INTRIN
    void pw3_block(const float* a, Py_ssize_t K, const float* w, const float* b, float* o,
                   Py_ssize_t ldo, const float* r, Py_ssize_t rs, Py_ssize_t nt, bint relu6,
                   const int mr, const bint wide) noexcept nogil
    ctypedef struct pw_v8:
        pass
    pw_v8 PW_LOAD(const float* p) noexcept nogil
    void PW_STORE(float* p, pw_v8 v) noexcept nogil
    pw_v8 PW_ZERO() noexcept nogil
    pw_v8 PW_FMA(pw_v8 acc, float a, pw_v8 w) noexcept nogil


cdef inline void _pw_block(cfloat_rp a, Py_ssize_t K, cfloat_rp wp, cfloat_rp bp,
                           float* op, Py_ssize_t ldo, const float* rp, Py_ssize_t rs,
                           Py_ssize_t nt, bint relu6, const int mr, const bint wide) noexcept nogil:
    """mr (<= PW3_MR) pixels x nt (<= PW3_NR) channels from one K x PW3_NR weight panel
    (only its first 8 channels unless `wide`)."""
    # AVX2 builds: intrinsics (pw3_block), with the epilogue in registers.
    if PW3_INTRIN:
        pw3_block(a, K, wp, bp, op, ldo, rp, rs, nt, relu6, mr, wide)
        return
    # Other builds: explicit vectors: left to itself gcc vectorizes the K loop (emulated gathers)
    # instead of keeping the 6 x 16 accumulators in registers.
    cdef pw_v8 c00 = PW_ZERO(), c01 = PW_ZERO(), c10 = PW_ZERO(), c11 = PW_ZERO()
    cdef pw_v8 c20 = PW_ZERO(), c21 = PW_ZERO(), c30 = PW_ZERO(), c31 = PW_ZERO()
    cdef pw_v8 c40 = PW_ZERO(), c41 = PW_ZERO(), c50 = PW_ZERO(), c51 = PW_ZERO()
    cdef pw_v8 w0, w1
    cdef float acc[PW3_MR][PW3_NR]
    cdef Py_ssize_t i, k
    # Two loops rather than a test inside one: gcc does not unswitch it.
    if wide:
        for k in range(K):
            w0 = PW_LOAD(wp + k * PW3_NR)
            w1 = PW_LOAD(wp + k * PW3_NR + 8)
            c00 = PW_FMA(c00, a[k], w0)
            c01 = PW_FMA(c01, a[k], w1)
            if mr > 1:
                c10 = PW_FMA(c10, a[K + k], w0)
                c11 = PW_FMA(c11, a[K + k], w1)
            if mr > 2:
                c20 = PW_FMA(c20, a[2 * K + k], w0)
                c21 = PW_FMA(c21, a[2 * K + k], w1)
            if mr > 3:
                c30 = PW_FMA(c30, a[3 * K + k], w0)
                c31 = PW_FMA(c31, a[3 * K + k], w1)
            if mr > 4:
                c40 = PW_FMA(c40, a[4 * K + k], w0)
                c41 = PW_FMA(c41, a[4 * K + k], w1)
            if mr > 5:
                c50 = PW_FMA(c50, a[5 * K + k], w0)
                c51 = PW_FMA(c51, a[5 * K + k], w1)
    else:
        for k in range(K):
            w0 = PW_LOAD(wp + k * PW3_NR)
            c00 = PW_FMA(c00, a[k], w0)
            if mr > 1:
                c10 = PW_FMA(c10, a[K + k], w0)
            if mr > 2:
                c20 = PW_FMA(c20, a[2 * K + k], w0)
            if mr > 3:
                c30 = PW_FMA(c30, a[3 * K + k], w0)
            if mr > 4:
                c40 = PW_FMA(c40, a[4 * K + k], w0)
            if mr > 5:
                c50 = PW_FMA(c50, a[5 * K + k], w0)
    PW_STORE(acc[0], c00); PW_STORE(acc[0] + 8, c01)
    PW_STORE(acc[1], c10); PW_STORE(acc[1] + 8, c11)
    PW_STORE(acc[2], c20); PW_STORE(acc[2] + 8, c21)
    PW_STORE(acc[3], c30); PW_STORE(acc[3] + 8, c31)
    PW_STORE(acc[4], c40); PW_STORE(acc[4] + 8, c41)
    PW_STORE(acc[5], c50); PW_STORE(acc[5] + 8, c51)
    for i in range(mr):
        if rp == NULL:
            _pw_store(op + i * ldo, acc[i], <const float*>NULL, bp, nt, relu6)
        else:
            _pw_store(op + i * ldo, acc[i], rp + i * rs, bp, nt, relu6)


cdef inline void _pw_store(float_rp o, cfloat_rp acc, cfloat_rp r, cfloat_rp b, Py_ssize_t n,
                           bint relu6) noexcept nogil:
    """o = act(acc + b) (+ r): the epilogue of `pwconv` (bias_act_rows) from registers."""
    cdef Py_ssize_t c
    cdef float s
    for c in range(n):
        s = acc[c] + b[c]
        if relu6:
            s = s if s > <float>0.0 else <float>0.0
            s = s if s < <float>6.0 else <float>6.0
        o[c] = s + r[c] if r != NULL else s


cdef inline void _pw_panel(const float* ap, Py_ssize_t M, Py_ssize_t K, const float* wp,
                           const float* bp, float* op, Py_ssize_t ldo, const float* rp,
                           Py_ssize_t rs, Py_ssize_t nt, bint relu6,
                           const bint wide) noexcept nogil:
    """All M pixels against one weight panel, PW3_MR pixels at a time."""
    cdef Py_ssize_t p = 0, mr
    cdef const float* r
    while p < M:
        r = NULL if rp == NULL else rp + p * rs
        mr = M - p if M - p < PW3_MR else PW3_MR
        # Literal block heights: each call is specialised with its loops unrolled.
        if mr == 6:
            _pw_block(ap + p * K, K, wp, bp, op + p * ldo, ldo, r, rs, nt, relu6, 6, wide)
        elif mr == 5:
            _pw_block(ap + p * K, K, wp, bp, op + p * ldo, ldo, r, rs, nt, relu6, 5, wide)
        elif mr == 4:
            _pw_block(ap + p * K, K, wp, bp, op + p * ldo, ldo, r, rs, nt, relu6, 4, wide)
        elif mr == 3:
            _pw_block(ap + p * K, K, wp, bp, op + p * ldo, ldo, r, rs, nt, relu6, 3, wide)
        elif mr == 2:
            _pw_block(ap + p * K, K, wp, bp, op + p * ldo, ldo, r, rs, nt, relu6, 2, wide)
        else:
            _pw_block(ap + p * K, K, wp, bp, op + p * ldo, ldo, r, rs, nt, relu6, 1, wide)
        p += mr


# Input floats per pixel chunk of pwconv_packed (128 KiB: half of a small L2).
cdef Py_ssize_t PW_CHUNK_FLOATS = 32768


cdef inline void _pw_packed_task(Py_ssize_t t, Py_ssize_t npan, Py_ssize_t mc,
                                 const float* ap, Py_ssize_t M, Py_ssize_t K,
                                 const float* wp, const float* bp, float* op, Py_ssize_t n,
                                 Py_ssize_t ldo, const float* rp, Py_ssize_t rs,
                                 int act) noexcept nogil:
    # n output channels per pixel, pixels ldo floats apart
    cdef Py_ssize_t p0 = (t // npan) * mc, q = t % npan, q0 = q * PW_NR
    cdef Py_ssize_t m = M - p0 if M - p0 < mc else mc
    cdef Py_ssize_t nt = n - q0 if n - q0 < PW_NR else PW_NR
    cdef const float* r = NULL if rp == NULL else rp + p0 * rs + q0
    # Only the AVX-512 epilogue has ReLU, hard-swish and SiLU: the callers pass them there only.
    cdef bint relu6 = act == PW_ACT_RELU6
    if PW_AVX512:
        pw5_panel(ap + p0 * K, m, K, wp + q * K * PW_NR, bp + q0, op + p0 * ldo + q0, ldo, r, rs,
                  nt, act)
    elif PW_NEON:
        pwn_panel(ap + p0 * K, m, K, wp + q * K * PW_NR, bp + q0, op + p0 * ldo + q0, ldo, r, rs,
                  nt, relu6)
    # A last panel of at most 8 channels (e.g. 24 outputs) skips its zero half.
    elif nt > PW_NR // 2:
        _pw_panel(ap + p0 * K, m, K, wp + q * K * PW_NR, bp + q0, op + p0 * ldo + q0, ldo, r, rs,
                  nt, relu6, True)
    else:
        _pw_panel(ap + p0 * K, m, K, wp + q * K * PW_NR, bp + q0, op + p0 * ldo + q0, ldo, r, rs,
                  nt, relu6, False)


cdef inline Py_ssize_t pw_chunk(Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """Pixels per chunk: inputs that stay in L2 while every panel passes over them."""
    cdef Py_ssize_t mc = (PW_CHUNK_FLOATS // K if K > 0 else M) // PW_MR * PW_MR
    return mc if mc >= PW_MR else PW_MR


cdef inline void pw_packed_serial(const float* ap, Py_ssize_t M, Py_ssize_t K,
                                  const float* wp, const float* bp, float* op, Py_ssize_t n,
                                  const float* rp, Py_ssize_t rs, int act) noexcept nogil:
    """op[p, c] = act(ap[p] . w[:, c] + bp[c]) (+ rp[p * rs + c]) for M pixels (K inputs,
    n outputs, rows n floats apart) on one thread; wp packed by pack_pw for exactly n
    channels; act: PW_ACT_*."""
    cdef Py_ssize_t npan = (n + PW_NR - 1) // PW_NR, mc = pw_chunk(K, M), t
    if M <= 0 or n <= 0:
        return
    for t in range((M + mc - 1) // mc * npan):
        _pw_packed_task(t, npan, mc, ap, M, K, wp, bp, op, n, n, rp, rs, act)
