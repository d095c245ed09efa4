# cython: language_level=3
"""Full 3x3 convolution (the stem), pad 1, stride 1 or 2, NHWC fp32, fused bias + ReLU6.

im2col on a block of output rows (small enough to stay in cache) followed by one
BLAS sgemm per block against the (9*Cin, Cout) weight matrix, then the fused
epilogue. Low-level kernel: no validation here (decolla.ops validates). Computes
output rows [r0, r0 + out.shape[0]) and channels [c0, c0 + out.shape[2]) from an
input row window x = rows [in_row0, in_row0 + x.shape[0]) of an input of height
in_height.
"""
from cython.parallel cimport prange, threadid
from scipy.linalg.cython_blas cimport sgemm

include "_common.pxi"

cdef extern from "<stdlib.h>" nogil:
    void* malloc(size_t n)

# Target size of one im2col block in floats (~128 KiB: fits L2 with the output block).
cdef Py_ssize_t PATCH_FLOATS = 32768


cdef inline void _copy(float_rp d, cfloat_rp s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        d[c] = s[c]


cdef inline void _zero(float_rp d, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        d[c] = 0.0


cdef void _im2col_row(float* patch, const float* x, Py_ssize_t oy, Py_ssize_t stride,
                      Py_ssize_t in_row0, Py_ssize_t in_height, Py_ssize_t W,
                      Py_ssize_t Wo, Py_ssize_t cin) noexcept nogil:
    cdef Py_ssize_t dy, dx, iy, ix, ox
    cdef Py_ssize_t K = 9 * cin
    cdef const float* row
    cdef float* dst
    for dy in range(3):
        iy = oy * stride - 1 + dy
        if iy < 0 or iy >= in_height:
            for ox in range(Wo):
                _zero(patch + ox * K + dy * 3 * cin, 3 * cin)
            continue
        row = x + (iy - in_row0) * W * cin
        for ox in range(Wo):
            dst = patch + ox * K + dy * 3 * cin
            ix = ox * stride - 1
            if ix >= 0 and ix + 2 < W:
                _copy(dst, row + ix * cin, 3 * cin)
            else:
                for dx in range(3):
                    if 0 <= ix + dx < W:
                        _copy(dst + dx * cin, row + (ix + dx) * cin, cin)
                    else:
                        _zero(dst + dx * cin, cin)


cdef void _block(const float* xp, const float* wp, const float* bp, float* op,
                 const float* rp, Py_ssize_t rs, float* patch, Py_ssize_t i0, Py_ssize_t cnt,
                 Py_ssize_t r0, int stride, Py_ssize_t in_row0, Py_ssize_t in_height,
                 Py_ssize_t W, Py_ssize_t Wo, Py_ssize_t cin, Py_ssize_t cout, Py_ssize_t n,
                 bint relu6) noexcept nogil:
    """Output rows [i0, i0 + cnt) of the chunk: im2col, one sgemm, fused epilogue."""
    cdef Py_ssize_t i, K = 9 * cin
    for i in range(cnt):
        _im2col_row(patch + i * Wo * K, xp, r0 + i0 + i, stride, in_row0, in_height, W, Wo, cin)
    cdef int im = <int>n, in_ = <int>(cnt * Wo), ik = <int>K, ila = <int>cout
    cdef int ilb = <int>K, ilc = <int>n
    cdef float one = 1.0, zero = 0.0
    # Row-major out_blk = patch @ w[:, c0:] is column-major out^T = w^T patch^T.
    sgemm("N", "N", &im, &in_, &ik, &one, <float*>wp, &ila, patch, &ilb, &zero,
          op + i0 * Wo * n, &ilc)
    bias_act_rows(op + i0 * Wo * n, NULL if rp == NULL else rp + i0 * Wo * rs, rs, bp,
                  cnt * Wo, n, n, relu6)


def conv3x3(const float[:, :, ::1] x, const float[:, :, :, ::1] w, const float[::1] b,
            float[:, :, ::1] out, int stride, Py_ssize_t c0, Py_ssize_t r0,
            Py_ssize_t in_row0, Py_ssize_t in_height, bint relu6,
            const float[:, :, ::1] res=None, Py_ssize_t rr0=0, Py_ssize_t rc0=0,
            int threads=1):
    """Rows/channels of a 3x3 convolution into `out` (see module docstring).

    Blocks of output rows are shared by OpenMP threads, each with its own im2col
    buffer and single-threaded BLAS. (A direct 27-tap loop over output channels for
    the 3-channel stem was measured 1.8x slower than im2col + sgemm.)
    """
    cdef Py_ssize_t rows = out.shape[0], Wo = out.shape[1], n = out.shape[2]
    cdef Py_ssize_t W = x.shape[1], cin = x.shape[2], cout = w.shape[3]
    cdef Py_ssize_t K = 9 * cin
    if rows == 0 or Wo == 0 or n == 0:
        return
    if cin == 0:
        raise ValueError("conv3x3 needs at least one input channel")
    cdef Py_ssize_t rb = PATCH_FLOATS // (Wo * K)
    if rb < 1:
        rb = 1
    if rb > rows:
        rb = rows
    cdef Py_ssize_t nblk = (rows + rb - 1) // rb
    if threads < 1:
        threads = 1
    if threads > nblk:
        threads = <int>nblk
    cdef const float* xp = &x[0, 0, 0]
    cdef const float* wp = &w[0, 0, 0, 0] + c0
    cdef const float* bp = &b[0] + c0
    cdef float* op = &out[0, 0, 0]
    cdef const float* rp = NULL
    cdef Py_ssize_t rs = 0
    if res is not None:
        rs = res.shape[2]
        rp = &res[0, 0, 0] + rr0 * Wo * rs + rc0
    cdef Py_ssize_t psize = rb * Wo * K
    cdef float* patches = <float*>malloc(threads * psize * sizeof(float))
    if patches == NULL:
        raise MemoryError()
    cdef Py_ssize_t blk, i0
    try:
        if threads == 1:
            with nogil:
                for blk in range(nblk):
                    i0 = blk * rb
                    _block(xp, wp, bp, op, rp, rs, patches, i0,
                           rows - i0 if rows - i0 < rb else rb, r0, stride, in_row0,
                           in_height, W, Wo, cin, cout, n, relu6)
        else:
            for blk in prange(nblk, nogil=True, num_threads=threads, schedule="static"):
                i0 = blk * rb
                _block(xp, wp, bp, op, rp, rs, patches + threadid() * psize, i0,
                       rows - i0 if rows - i0 < rb else rb, r0, stride, in_row0,
                       in_height, W, Wo, cin, cout, n, relu6)
    finally:
        free(patches)
