# cython: language_level=3
"""Activations in place over a float32 buffer, vectorised (imported graphs' ReLU, clip,
sigmoid, hard-sigmoid, hard-swish and SiLU after a convolution, add or mul).

The functions live in _act.pxi (shared with se.pyx).
"""
from cython.parallel cimport prange

include "_common.pxi"

include "_act.pxi"


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
