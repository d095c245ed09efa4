# cython: language_level=3
"""Squeeze-excitation in two calls: `gate` pools a map and runs the two small fully
connected layers (1x1 convolutions on the pooled vector) with their activations;
`scale` multiplies rows of the map by the gate, channel by channel.

One call each instead of a pool, two convolutions, two activation passes and a
broadcast multiply, each a Python dispatch (MobileNetV3, EfficientNet). Activation
codes as act.pyx's (NONE: no activation).
"""
include "_common.pxi"

include "_act.pxi"

NONE = -1


def gate(const float[:, :, ::1] x, const float[:, ::1] w1, const float[::1] b1, int fn1,
         float a1, float c1, const float[:, ::1] w2, const float[::1] b2, int fn2, float a2,
         float c2, float[::1] g, float[::1] work):
    """g = fn2(fn1(mean(x) @ w1 + b1) @ w2 + b2): x (H, W, C), w1 (C, R), w2 (R, C), g (C,),
    work (C + R,) scratch. fn*: activation codes with their two parameters (a, c)."""
    cdef Py_ssize_t npix = x.shape[0] * x.shape[1], C = x.shape[2], R = w1.shape[1]
    if w1.shape[0] != C or w2.shape[0] != R or w2.shape[1] != C or b1.shape[0] != R or \
            b2.shape[0] != C or g.shape[0] != C or work.shape[0] < C + R:
        raise ValueError(f"se.gate: shapes do not fit a map of {C} channels and {R} hidden")
    if npix == 0 or C == 0:
        raise ValueError("se.gate: the map is empty")
    cdef float* s = &work[0]
    cdef float* h = s + C
    cdef Py_ssize_t p, c, r
    with nogil:
        _zero(s, C)
        for p in range(npix):
            _axpy(s, &x[0, 0, 0] + p * C, 1.0, C)
        _scale(s, <float>1.0 / npix, C)
        _copy(h, &b1[0], R)
        for c in range(C):
            _axpy(h, &w1[0, 0] + c * R, s[c], R)
        _run(h, R, fn1, a1, c1)
        _copy(&g[0], &b2[0], C)
        for r in range(R):
            _axpy(&g[0], &w2[0, 0] + r * C, h[r], C)
        _run(&g[0], C, fn2, a2, c2)


def scale(const float[:, :, ::1] x, Py_ssize_t xr0, const float[::1] g,
          float[:, :, ::1] out):
    """out[i, j, c] = x[xr0 + i, j, c] * g[c] for every row i of out."""
    cdef Py_ssize_t rows = out.shape[0], W = out.shape[1], C = out.shape[2], p
    if x.shape[1] != W or x.shape[2] != C or g.shape[0] != C or xr0 < 0 or \
            xr0 + rows > x.shape[0]:
        raise ValueError(f"se.scale: rows [{xr0}, {xr0 + rows}) of a map of shape "
                         f"{tuple(x.shape)[:3]} do not fit out {tuple(out.shape)[:3]} and "
                         f"gate ({g.shape[0]},)")
    if rows * W * C == 0:
        return
    cdef const float* xp = &x[0, 0, 0] + xr0 * W * C
    cdef float* op = &out[0, 0, 0]
    with nogil:
        for p in range(rows * W):
            _mul(op + p * C, xp + p * C, &g[0], C)


cdef inline void _zero(float_rp o, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        o[i] = 0.0


cdef inline void _copy(float_rp o, cfloat_rp v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        o[i] = v[i]


cdef inline void _scale(float_rp o, float a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        o[i] *= a


cdef inline void _axpy(float_rp o, cfloat_rp v, float a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        o[i] += a * v[i]


cdef inline void _mul(float* o, const float* v, cfloat_rp g, Py_ssize_t n) noexcept nogil:
    # o may be v (in place): no restrict on those two
    cdef Py_ssize_t i
    for i in range(n):
        o[i] = v[i] * g[i]
