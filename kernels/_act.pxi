# Activations over a float32 buffer in place (included by act.pyx and se.pyx).
# exp is a polynomial on a range-reduced argument (Cephes' expf: about 1 ulp) instead of
# libm's, so that the loops vectorise; sigmoid(x) = 1 / (1 + exp(-x)).

cdef enum:
    _RELU, _CLIP, _SIGMOID, _HARDSIGMOID, _HARDSWISH, _SILU

RELU, CLIP, SIGMOID, HARDSIGMOID, HARDSWISH, SILU = _RELU, _CLIP, _SIGMOID, _HARDSIGMOID, \
    _HARDSWISH, _SILU

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Cephes expf on a range-reduced argument, rounding by the 1.5 * 2^23 trick and bit
       casts through memcpy so that gcc vectorises a loop calling it */
    static inline float decolla_expf(float x) {
        const float magic = 12582912.0f;
        x = x < 88.0f ? x : 88.0f;
        x = x > -87.0f ? x : -87.0f;
        float t = x * 1.44269504088896341f + magic;
        int32_t ti, e;
        memcpy(&ti, &t, 4);
        float n = t - magic;
        float r = x - n * 0.693359375f + n * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.0f;
        e = (ti - 0x4B400000 + 127) << 23;
        float s;
        memcpy(&s, &e, 4);
        return p * s;
    }
    """
    float decolla_expf(float x) nogil


cdef inline float _clamp(float v, float lo, float hi) noexcept nogil:
    v = v if v > lo else lo
    return v if v < hi else hi


cdef void _run(float_rp y, Py_ssize_t n, int fn, float a, float b) noexcept nogil:
    cdef Py_ssize_t i
    if fn == _RELU:
        for i in range(n):
            y[i] = y[i] if y[i] > <float>0.0 else <float>0.0
    elif fn == _CLIP:
        for i in range(n):
            y[i] = _clamp(y[i], a, b)
    elif fn == _SIGMOID:
        for i in range(n):
            y[i] = <float>1.0 / (<float>1.0 + decolla_expf(-y[i]))
    elif fn == _HARDSIGMOID:
        for i in range(n):
            y[i] = _clamp(y[i] * a + b, 0.0, 1.0)
    elif fn == _HARDSWISH:
        for i in range(n):
            y[i] = y[i] * _clamp(y[i] * <float>(1.0 / 6.0) + <float>0.5, 0.0, 1.0)
    elif fn == _SILU:
        for i in range(n):
            y[i] = y[i] / (<float>1.0 + decolla_expf(-y[i]))
