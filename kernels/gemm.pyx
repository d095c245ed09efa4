# cython: language_level=3
"""Pointwise 1x1 convolution and linear layer through BLAS, plus fused epilogues;
for few pixels, a pointwise convolution on weights packed once (`pwconv_packed`).

Low-level kernels: no validation here (decolla.ops validates). NHWC fp32.
"""
from cython.parallel cimport prange
from libc.stdlib cimport malloc
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm, sgemv

include "_common.pxi"

cdef void gemm_rowmajor(const float* a, Py_ssize_t lda, const float* bm, Py_ssize_t ldb,
                        float* c, Py_ssize_t ldc, Py_ssize_t m, Py_ssize_t n,
                        Py_ssize_t k) noexcept nogil:
    """c (m x n) = a (m x k) @ bm (k x n), all row-major with leading dimensions."""
    # Row-major C = A B is column-major C^T = B^T A^T: swap the operands.
    cdef int im = <int>n, in_ = <int>m, ik = <int>k
    cdef int ila = <int>ldb, ilb = <int>lda, ilc = <int>ldc
    cdef float one = 1.0, zero = 0.0
    sgemm("N", "N", &im, &in_, &ik, &one, <float*>bm, &ila, <float*>a, &ilb, &zero,
          c, &ilc)


cdef Py_ssize_t auto_block(Py_ssize_t M, Py_ssize_t n) noexcept nogil:
    """Pixels per GEMM tile: the tile's output (~256 KiB) stays in L2 for the
    epilogue; at least 256 rows so each sgemm call still amortises packing."""
    cdef Py_ssize_t mb = BLOCK_FLOATS // n if n > 0 else M
    if mb < 256:
        mb = 256
    return M if M < 2 * mb else mb


# Floats of GEMM output per tile (see auto_block).
cdef Py_ssize_t BLOCK_FLOATS = 65536


cdef void _tile(const float* a, Py_ssize_t K, const float* wm, Py_ssize_t ldw,
                const float* bias, float* out, Py_ssize_t ldo, const float* res,
                Py_ssize_t rs, Py_ssize_t m, Py_ssize_t nt, bint relu6) noexcept nogil:
    """One tile of m pixels x nt channels: GEMM, then the epilogue while it is cached."""
    cdef Py_ssize_t p, c
    if K > 0:
        gemm_rowmajor(a, K, wm, ldw, out, ldo, m, nt, K)
    else:
        for p in range(m):
            for c in range(nt):
                out[p * ldo + c] = 0
    bias_act_rows(out, res, rs, bias, m, nt, ldo, relu6)


cdef inline const float* _residual_start(const float[:, :, ::1] res, Py_ssize_t rr0,
                                        Py_ssize_t W, Py_ssize_t rc0):
    """Where the residual's rows [rr0, ...) and channels [rc0, ...) start (NULL: none)."""
    if res is None:
        return NULL
    return &res[0, 0, 0] + rr0 * W * res.shape[2] + rc0


cdef Py_ssize_t _out_ld(float[:, :, :] out) except -1:
    """Floats between an output's pixels: `out` is a C-contiguous (rows, W, n) tensor or a
    channel window of a wider one (a branch written straight into its concatenation)."""
    cdef Py_ssize_t rows = out.shape[0], W = out.shape[1], n = out.shape[2], f = sizeof(float)
    cdef Py_ssize_t ld = out.strides[1] if W > 1 else (out.strides[0] if rows > 1 else n * f)
    if (n > 1 and out.strides[2] != f) or ld % f or ld < n * f or \
            (rows > 1 and W > 1 and out.strides[0] != W * ld):
        raise ValueError(f"out (strides {tuple(out.strides)[:3]}) is neither C-contiguous nor "
                         f"a channel window of a C-contiguous tensor")
    return ld // f


def pwconv(const float[:, :, ::1] x, const float[:, ::1] w, const float[::1] b,
           float[:, :, :] out, Py_ssize_t c0, Py_ssize_t xr0, bint relu6,
           const float[:, :, ::1] res=None, Py_ssize_t rr0=0, Py_ssize_t rc0=0,
           int threads=1, Py_ssize_t block=0):
    """out = act(x[xr0:xr0+rows] @ w[:, c0:c0+n] + b[c0:c0+n]) (+ res[rr0:, :, rc0:]);
    out may be a channel window of a wider C-contiguous tensor.

    Work is cut into tiles of `block` pixels (0: automatic) and, when there are
    fewer pixel tiles than threads, into channel slices too; OpenMP threads share
    the tiles and each tile calls single-threaded BLAS (one thread pool only).
    """
    cdef Py_ssize_t rows = out.shape[0], W = out.shape[1], n = out.shape[2]
    cdef Py_ssize_t K = x.shape[2], cout = w.shape[1]
    if rows == 0 or W == 0 or n == 0:
        return
    cdef Py_ssize_t M = rows * W, ldo = _out_ld(out)
    cdef const float* ap = &x[0, 0, 0] + xr0 * W * K
    cdef const float* wp = &w[0, 0] + c0 if K > 0 else NULL
    cdef const float* bp = &b[0] + c0
    cdef float* op = &out[0, 0, 0]
    cdef Py_ssize_t rs = 0 if res is None else res.shape[2]
    cdef const float* rp = _residual_start(res, rr0, W, rc0)
    cdef Py_ssize_t mb = auto_block(M, n) if block <= 0 else block
    cdef Py_ssize_t tm = (M + mb - 1) // mb
    cdef Py_ssize_t tn = 1, nb = n, t
    if threads > 1 and tm < threads and n >= 16 * threads:
        nb = ((n + threads - 1) // threads + 7) // 8 * 8  # channel slices of whole vectors
        tn = (n + nb - 1) // nb
    if threads <= 1 or tm * tn == 1:
        with nogil:
            for t in range(tm * tn):
                _pw_task(t, tn, mb, nb, M, n, ldo, K, cout, ap, wp, bp, op, rp, rs, relu6)
        return
    for t in prange(tm * tn, nogil=True, num_threads=threads, schedule="static"):
        _pw_task(t, tn, mb, nb, M, n, ldo, K, cout, ap, wp, bp, op, rp, rs, relu6)


cdef void _pw_task(Py_ssize_t t, Py_ssize_t tn, Py_ssize_t mb, Py_ssize_t nb, Py_ssize_t M,
                   Py_ssize_t n, Py_ssize_t ldo, Py_ssize_t K, Py_ssize_t cout,
                   const float* ap,
                   const float* wp, const float* bp, float* op, const float* rp,
                   Py_ssize_t rs, bint relu6) noexcept nogil:
    cdef Py_ssize_t p0 = (t // tn) * mb, q0 = (t % tn) * nb
    cdef Py_ssize_t m = M - p0 if M - p0 < mb else mb
    cdef Py_ssize_t nt = n - q0 if n - q0 < nb else nb
    _tile(ap + p0 * K, K, NULL if wp == NULL else wp + q0, cout, bp + q0, op + p0 * ldo + q0,
          ldo, NULL if rp == NULL else rp + p0 * rs + q0, rs, m, nt, relu6)


include "_pw_packed.pxi"


def pwconv_packed(const float[:, :, ::1] x, const float[:, :, ::1] wpk, const float[::1] b,
                  float[:, :, :] out, Py_ssize_t c0, Py_ssize_t xr0, int act,
                  const float[:, :, ::1] res=None, Py_ssize_t rr0=0, Py_ssize_t rc0=0,
                  int threads=1):
    """Same as `pwconv`, with the weight window w[:, c0:c0+n] pre-packed by `pack_pw`
    as wpk (panels, K, PW_NR); act: ACT_NONE, ACT_RELU6 (or a bool relu6) or, where
    RELU_FUSED, ACT_RELU, ACT_HARDSWISH or ACT_SILU. Work is cut into (pixel chunk, panel) tasks that the threads
    share."""
    _check_act(act)
    cdef Py_ssize_t rows = out.shape[0], W = out.shape[1], n = out.shape[2]
    cdef Py_ssize_t K = x.shape[2], npan = wpk.shape[0], t
    if rows == 0 or W == 0 or n == 0:
        return
    cdef Py_ssize_t M = rows * W, ldo = _out_ld(out)
    cdef const float* ap = &x[0, 0, 0] + xr0 * W * K
    cdef const float* wp = &wpk[0, 0, 0]
    cdef const float* bp = &b[0] + c0
    cdef float* op = &out[0, 0, 0]
    cdef Py_ssize_t rs = 0 if res is None else res.shape[2]
    cdef const float* rp = _residual_start(res, rr0, W, rc0)
    # Pixel chunks whose inputs stay in L2 while every panel passes over them.
    cdef Py_ssize_t mc = pw_chunk(K, M)
    cdef Py_ssize_t ntask = (M + mc - 1) // mc * npan
    if threads <= 1 or ntask == 1:
        with nogil:
            for t in range(ntask):
                _pw_packed_task(t, npan, mc, ap, M, K, wp, bp, op, n, ldo, rp, rs, act)
        return
    for t in prange(ntask, nogil=True, num_threads=threads, schedule="static"):
        _pw_packed_task(t, npan, mc, ap, M, K, wp, bp, op, n, ldo, rp, rs, act)


def pack_pw(const float[:, ::1] w, Py_ssize_t c0, Py_ssize_t c1, float[:, :, ::1] wpk):
    """wpk[q, k, j] = w[k, c0 + q * PW_NR + j] (zero past c1): the layout of `pwconv_packed`."""
    cdef Py_ssize_t K = w.shape[0], q, k, j, c
    for q in range(wpk.shape[0]):
        for k in range(K):
            for j in range(PW_NR):
                c = c0 + q * PW_NR + j
                wpk[q, k, j] = w[k, c] if c < c1 else 0


PACK_NR = PW_NR     # channels per packed weight panel in this build
PACK_MR = PW_MR     # pixels per register block
AVX512 = bool(PW_AVX512)   # the packed kernel is the AVX-512 one
NEON = bool(PW_NEON)       # the packed kernel is the NEON one (aarch64)
ACT_NONE, ACT_RELU6, ACT_RELU = PW_ACT_NONE, PW_ACT_RELU6, PW_ACT_RELU
ACT_HARDSWISH, ACT_SILU = PW_ACT_HARDSWISH, PW_ACT_SILU
# The packed kernels' epilogue has ReLU, hard-swish and SiLU (beside none and ReLU6).
RELU_FUSED = bool(PW_AVX512)


cdef _check_act(int act):
    if act not in (PW_ACT_NONE, PW_ACT_RELU6) and not (
            PW_ACT_RELU <= act <= PW_ACT_SILU and PW_AVX512):
        raise ValueError(f"activation code {act} is not one this build's packed kernel has")


# Floats of input window (AVX-512) or patches (other builds) per row chunk of conv_packed
# (1 MiB: half of this host's L2), read by every weight panel in turn.
cdef Py_ssize_t CONV_CHUNK_FLOATS = 262144


def conv_packed(const float[:, :, ::1] xp, const float[:, :, ::1] wpk, const float[::1] b,
                float[:, :, :] out, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh,
                Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw, int act, int threads=1):
    """A dense convolution on the packed-weight kernel: out[y, x, c] = act(b[c] + sum over
    i, j, ci of xp[y*sh + i*dh, x*sw + j*dw, ci] * w[i, j, ci, c]), every row and column of
    xp inside the (padded) input window, w packed by `pack_pw` from its (kh * kw * C, n)
    reshape. The AVX-512 build reads the input in place (tasks: row chunk, weight panel);
    the others copy a chunk of rows' patches (im2col) and run every panel over it. out may
    be a channel window of a wider C-contiguous tensor."""
    cdef Py_ssize_t rows = out.shape[0], wo = out.shape[1], n = out.shape[2]
    cdef Py_ssize_t Wp = xp.shape[1], C = xp.shape[2], npan = wpk.shape[0]
    _check_act(act)
    if rows == 0 or wo == 0 or n == 0:
        return
    cdef Py_ssize_t ldo = _out_ld(out)
    if wpk.shape[1] != kh * kw * C or wpk.shape[2] != PW_NR or npan * PW_NR < n or \
            b.shape[0] < n:
        raise ValueError(f"packed weight {tuple(wpk.shape)} / bias {b.shape[0]} do not fit a "
                         f"{kh}x{kw} kernel over {C} channels into {n} outputs")
    if min(kh, kw, sh, sw, dh, dw) < 1 or C < 1 or \
            xp.shape[0] < (rows - 1) * sh + (kh - 1) * dh + 1 or \
            Wp < (wo - 1) * sw + (kw - 1) * dw + 1:
        raise ValueError(f"input window {tuple(xp.shape)} is too small for {rows}x{wo} "
                         f"outputs of a {kh}x{kw} kernel, stride {sh}x{sw}, dilation {dh}x{dw}")
    # Segments: one kernel row (kw taps, kw * C consecutive floats) when dw is 1, else one
    # tap each.
    cdef Py_ssize_t nseg = kh if dw == 1 else kh * kw, L = kw * C if dw == 1 else C, s
    cdef Py_ssize_t* off = <Py_ssize_t*>calloc(nseg, sizeof(Py_ssize_t))
    if off == NULL:
        raise MemoryError()
    for s in range(nseg):
        off[s] = (s * dh * Wp) * C if dw == 1 else ((s // kw) * dh * Wp + (s % kw) * dw) * C
    cdef Py_ssize_t span = (kh - 1) * dh + 1, rc, ntask, t
    if PW_AVX512:    # rows whose input window stays in L2 while every panel reads it
        rc = (CONV_CHUNK_FLOATS // (Wp * C) - span) // sh + 1
    else:            # rows whose patches stay in L2 while every panel reads them
        rc = CONV_CHUNK_FLOATS // (wo * nseg * L)
    rc = 1 if rc < 1 else (rows if rc > rows else rc)
    ntask = (rows + rc - 1) // rc * (npan if PW_AVX512 else 1)
    cdef const float* xq = &xp[0, 0, 0]
    cdef const float* wq = &wpk[0, 0, 0]
    cdef float* oq = &out[0, 0, 0]
    cdef int failed = 0
    try:
        if threads <= 1 or ntask == 1:
            with nogil:
                for t in range(ntask):
                    failed |= _conv_task(t, npan, rc, xq, Wp, C, rows, wo, sh, sw, off, nseg,
                                         L, wq, &b[0], oq, n, ldo, act)
        else:
            for t in prange(ntask, nogil=True, num_threads=threads, schedule="static"):
                failed |= _conv_task(t, npan, rc, xq, Wp, C, rows, wo, sh, sw, off, nseg, L,
                                     wq, &b[0], oq, n, ldo, act)
    finally:
        free(off)
    if failed:
        raise MemoryError()


cdef inline int _conv_task(Py_ssize_t t, Py_ssize_t npan, Py_ssize_t rc, const float* xp,
                           Py_ssize_t Wp, Py_ssize_t C, Py_ssize_t rows, Py_ssize_t wo,
                           Py_ssize_t sh, Py_ssize_t sw, const Py_ssize_t* off,
                           Py_ssize_t nseg, Py_ssize_t L, const float* wp, const float* bp,
                           float* op, Py_ssize_t n, Py_ssize_t ldo, int act) noexcept nogil:
    """One task of conv_packed; 1 when its patch buffer could not be allocated."""
    cdef Py_ssize_t y0 = (t // npan if PW_AVX512 else t) * rc, q = t % npan, q0 = q * PW_NR
    cdef Py_ssize_t m = rows - y0 if rows - y0 < rc else rc
    cdef Py_ssize_t nt = n - q0 if n - q0 < PW_NR else PW_NR, K = nseg * L, y, x, s
    cdef float* buf
    cdef const float* src
    if PW_AVX512:
        pw5_conv_panel(xp + y0 * sh * Wp * C, Wp, C, m, wo, sh, sw, off, nseg, L,
                       wp + q * K * PW_NR, bp + q0, op + y0 * wo * ldo + q0, ldo, nt,
                       act)
        return 0
    buf = <float*>malloc(m * wo * K * sizeof(float))
    if buf == NULL:
        return 1
    for y in range(m):
        for x in range(wo):
            src = xp + ((y0 + y) * sh * Wp + x * sw) * C
            for s in range(nseg):
                memcpy(buf + (y * wo + x) * K + s * L, src + off[s], L * sizeof(float))
    for q in range(npan):
        _pw_packed_task(q, npan, m * wo, buf, m * wo, K, wp, bp, op + y0 * wo * ldo, n, ldo,
                        NULL, 0, act)
    free(buf)
    return 0


def linear(const float[::1] x, const float[:, ::1] w, const float[::1] b, float[::1] out,
           Py_ssize_t c0, bint relu6):
    """out = act(x @ w[:, c0:c0+n] + b[c0:c0+n])."""
    cdef Py_ssize_t n = out.shape[0], K = x.shape[0], cout = w.shape[1], i
    if n == 0:
        return
    cdef int im = <int>n, ik = <int>K, ilda = <int>cout, inc = 1
    cdef float one = 1.0, zero = 0.0
    if K == 0:
        for i in range(n):
            out[i] = 0
    else:
        with nogil:
            # Row-major (K x cout) slice = column-major (n x K) with lda = cout.
            sgemv("N", &im, &ik, &one, <float*>&w[0, 0] + c0, &ilda, <float*>&x[0], &inc,
                  &zero, &out[0], &inc)
    with nogil:
        bias_act_rows(&out[0], NULL, 0, &b[0] + c0, 1, n, n, relu6)


def gap(const float[:, :, ::1] x, float[::1] out, Py_ssize_t c0):
    """out[c] = mean over pixels of x[..., c0 + c]."""
    cdef Py_ssize_t npix = x.shape[0] * x.shape[1], C = x.shape[2], n = out.shape[0]
    cdef Py_ssize_t p
    if n == 0:
        return
    cdef float* op = &out[0]
    cdef const float* xp = &x[0, 0, 0] + c0 if npix > 0 else NULL
    cdef float scale = 1.0 / npix if npix > 0 else 0.0
    with nogil:
        _fill(op, 0.0, n)
        for p in range(npix):
            _accumulate(op, xp + p * C, n)
        _scale(op, scale, n)


cdef inline void _accumulate(float_rp o, cfloat_rp x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        o[c] += x[c]


cdef inline void _scale(float_rp o, float s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        o[c] *= s


def add_residual(float[:, :, ::1] out, const float[:, :, ::1] res, Py_ssize_t rr0,
                 Py_ssize_t rc0):
    """out += res[rr0:rr0+rows, :, rc0:rc0+n] (for kernels that do not fuse the residual)."""
    cdef Py_ssize_t rows = out.shape[0], W = out.shape[1], n = out.shape[2]
    cdef Py_ssize_t rs = res.shape[2], p
    if rows == 0 or W == 0 or n == 0:
        return
    cdef float* op = &out[0, 0, 0]
    cdef const float* rp = &res[0, 0, 0] + rr0 * W * rs + rc0
    with nogil:
        for p in range(rows * W):
            _accumulate(op + p * n, rp + p * rs, n)
