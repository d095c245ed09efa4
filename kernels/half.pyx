# cython: language_level=3, boundscheck=False, wraparound=False
"""float32 <-> float16 for the wire codec (decolla.runtime.wire): F16C instructions, 8 values at a
time, in the x86-64-v3 and v4 builds (`F16C` true), the ARMv8.0 fcvtn / fcvtl instructions
in the NEON build (`NEON` true); the rest, and other builds, through C `_Float16` casts.
Rounding is IEEE round-to-nearest-even, as numpy's."""
import numpy as np
cimport numpy as cnp

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #ifdef __F16C__
    #include <immintrin.h>
    #define DECOLLA_F16C 1
    #else
    #define DECOLLA_F16C 0
    #endif
    #if defined(DECOLLA_NEON) && defined(__aarch64__)
    #include <arm_neon.h>
    #define DECOLLA_NEON_F16 1
    #else
    #define DECOLLA_NEON_F16 0
    #endif
    static void decolla_f2h(const float *__restrict__ in, uint16_t *__restrict__ out, size_t n) {
        size_t i = 0;
    #if DECOLLA_F16C
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(out + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
    #elif DECOLLA_NEON_F16
        for (; i + 8 <= n; i += 8)   /* fcvtn + fcvtn2: rounds as FPCR says, to nearest even */
            vst1q_u16(out + i, vreinterpretq_u16_f16(
                vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(in + i)), vld1q_f32(in + i + 4))));
    #endif
        _Float16 *__restrict__ o = (_Float16 *)out;
        for (; i < n; i++) o[i] = (_Float16)in[i];
    }
    static void decolla_h2f(const uint16_t *__restrict__ in, float *__restrict__ out, size_t n) {
        size_t i = 0;
    #if DECOLLA_F16C
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    #elif DECOLLA_NEON_F16
        for (; i + 8 <= n; i += 8) {   /* fcvtl + fcvtl2 */
            float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(in + i));
            vst1q_f32(out + i, vcvt_f32_f16(vget_low_f16(h)));
            vst1q_f32(out + i + 4, vcvt_high_f32_f16(h));
        }
    #endif
        const _Float16 *__restrict__ h = (const _Float16 *)in;
        for (; i < n; i++) out[i] = (float)h[i];
    }
    """
    bint HAS_F16C "DECOLLA_F16C"
    bint HAS_NEON_F16 "DECOLLA_NEON_F16"
    void decolla_f2h(const float* inp, cnp.uint16_t* out, size_t n) nogil
    void decolla_h2f(const cnp.uint16_t* inp, float* out, size_t n) nogil


F16C = HAS_F16C         # built with x86 F16C conversion
NEON = HAS_NEON_F16     # built with aarch64 fcvtn / fcvtl conversion
HARDWARE = F16C or NEON   # vector conversion (else numpy's is faster: use that)


def to_half(x):
    """A C-contiguous float32 array's values as float16 (a new array of the same shape)."""
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    out = np.empty(flat.shape[0], np.float16)
    cdef cnp.uint16_t[::1] o = out.view(np.uint16)
    if flat.shape[0]:
        with nogil:
            decolla_f2h(&flat[0], &o[0], flat.shape[0])
    return out.reshape(np.shape(x))


def from_half(buf, shape):
    """float16 values in a bytes-like `buf` as a new float32 array of `shape`."""
    cdef const cnp.uint16_t[::1] h = np.frombuffer(buf, np.uint16)
    out = np.empty(h.shape[0], np.float32)
    cdef float[::1] o = out
    if h.shape[0]:
        with nogil:
            decolla_h2f(&h[0], &o[0], h.shape[0])
    return out.reshape(shape)
