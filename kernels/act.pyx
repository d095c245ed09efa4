# cython: language_level=3
"""Activations in place over a float32 buffer, vectorised (imported graphs' ReLU, clip,
sigmoid, hard-sigmoid, hard-swish and SiLU after a convolution, add or mul).

exp is a polynomial on a range-reduced argument (Cephes' expf: about 1 ulp) instead of
libm's, so that the loop vectorises; sigmoid(x) = 1 / (1 + exp(-x)).
"""
from cython.parallel cimport prange
from libc.math cimport floorf

include "_common.pxi"

cdef enum:
    _RELU, _CLIP, _SIGMOID, _HARDSIGMOID, _HARDSWISH, _SILU

RELU, CLIP, SIGMOID, HARDSIGMOID, HARDSWISH, SILU = _RELU, _CLIP, _SIGMOID, _HARDSIGMOID, \
    _HARDSWISH, _SILU

cdef extern from *:
    """
    static inline float decolla_pow2i(float n) {
        union { float f; int i; } u;
        u.i = ((int)n + 127) << 23;
        return u.f;
    }
    """
    float decolla_pow2i(float n) nogil


cdef inline float _exp(float x) noexcept nogil:
    x = x if x < <float>88.0 else <float>88.0
    x = x if x > <float>-87.0 else <float>-87.0
    cdef float n = floorf(x * <float>1.44269504088896341 + <float>0.5)
    cdef float r = x - n * <float>0.693359375 + n * <float>2.12194440e-4
    cdef float p = <float>1.9875691500e-4
    p = p * r + <float>1.3981999507e-3
    p = p * r + <float>8.3334519073e-3
    p = p * r + <float>4.1665795894e-2
    p = p * r + <float>1.6666665459e-1
    p = p * r + <float>5.0000001201e-1
    p = p * r * r + r + <float>1.0
    return p * decolla_pow2i(n)


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
            y[i] = <float>1.0 / (<float>1.0 + _exp(-y[i]))
    elif fn == _HARDSIGMOID:
        for i in range(n):
            y[i] = _clamp(y[i] * a + b, 0.0, 1.0)
    elif fn == _HARDSWISH:
        for i in range(n):
            y[i] = y[i] * _clamp(y[i] * <float>(1.0 / 6.0) + <float>0.5, 0.0, 1.0)
    elif fn == _SILU:
        for i in range(n):
            y[i] = y[i] / (<float>1.0 + _exp(-y[i]))


def apply(float[::1] y, int fn, float a=0.0, float b=0.0, int threads=1):
    """y = fn(y) in place (fn: RELU, CLIP (to [a, b]), SIGMOID, HARDSIGMOID (alpha a, beta b),
    HARDSWISH, SILU)."""
    cdef Py_ssize_t n = y.shape[0], block = 16384, nb, k
    if n == 0:
        return
    cdef float* p = &y[0]
    nb = (n + block - 1) // block
    if threads <= 1 or nb == 1:
        with nogil:
            _run(p, n, fn, a, b)
        return
    for k in prange(nb, nogil=True, num_threads=threads, schedule="static"):
        _run(p + k * block, (n - k * block) if k == nb - 1 else block, fn, a, b)
