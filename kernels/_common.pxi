# Shared declarations for the DeColla kernels (included, not compiled alone).
# Restrict-qualified pointer types: they let gcc vectorize loops over several
# input streams without runtime alias checks.
cdef extern from *:
    ctypedef float* float_rp "float * __restrict__"
    ctypedef const float* cfloat_rp "const float * __restrict__"

cdef extern from "<stdlib.h>" nogil:
    void* calloc(size_t n, size_t size)
    void free(void* p)


cdef inline void bias_act_rows(float* out, const float* res, Py_ssize_t res_stride,
                               const float* b, Py_ssize_t npix, Py_ssize_t n,
                               Py_ssize_t out_stride, bint relu6) noexcept nogil:
    """out[p, c] = act(out[p, c] + b[c]) (+ res[p, c]) for npix pixels of n channels."""
    cdef Py_ssize_t p
    for p in range(npix):
        if res == NULL:
            _bias_act(out + p * out_stride, <const float*>NULL, b, n, relu6)
        else:
            _bias_act(out + p * out_stride, res + p * res_stride, b, n, relu6)


cdef inline void _bias_act(float_rp o, cfloat_rp r, cfloat_rp b, Py_ssize_t n,
                           bint relu6) noexcept nogil:
    cdef Py_ssize_t c
    cdef float s
    if r == NULL:
        if relu6:
            for c in range(n):
                s = o[c] + b[c]
                s = s if s > <float>0.0 else <float>0.0
                o[c] = s if s < <float>6.0 else <float>6.0
        else:
            for c in range(n):
                o[c] = o[c] + b[c]
    else:
        if relu6:
            for c in range(n):
                s = o[c] + b[c]
                s = s if s > <float>0.0 else <float>0.0
                o[c] = (s if s < <float>6.0 else <float>6.0) + r[c]
        else:
            for c in range(n):
                o[c] = o[c] + b[c] + r[c]


cdef inline void _fill(float_rp o, float v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        o[c] = v
