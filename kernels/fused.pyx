# cython: language_level=3
"""A whole inverted-residual block (expand 1x1 + ReLU6 -> depthwise 3x3 + ReLU6 ->
project 1x1 (+ the block's input)) computed a tile of output rows at a time, so that the
expanded rows and the depthwise row stay in cache instead of going to memory as whole
tensors. Each expanded input row is computed once and kept in a ring of rows.

Same kernels as the separate layers (the packed pointwise kernel of gemm.pyx and the
depthwise rows of dwconv.pyx, compiled here with this build's ISA flags): the result
is bit for bit that of pwconv_packed -> dwconv3x3 -> pwconv_packed. NHWC fp32, whole
image, one thread. Low-level kernel: no validation here beyond what a wrong call
could corrupt memory with.
"""
include "_common.pxi"

include "_pw_packed.pxi"

include "_dw_rows.pxi"

include "_act.pxi"

cdef extern from "<stdlib.h>" nogil:
    void* malloc(size_t n)


def inverted_residual(const float[:, :, ::1] x, const float[:, :, ::1] wexp,
                      const float[::1] bexp, const float[:, :, ::1] wdw, const float[::1] bdw,
                      const float[:, :, ::1] wproj, const float[::1] bproj,
                      float[:, :, ::1] out, int stride, bint residual, Py_ssize_t tile=0,
                      acts=None):
    """out = project(dw(expand(x))) (+ x if residual), all of it.

    x (H, W, Cin); wexp: the expand weight (Cin, Ce) packed by gemm.pack_pw of this
    build, or None for a block without expansion (Ce = Cin); wdw (3, 3, Ce); wproj the
    project weight (Ce, Cout) packed; out (Ho, Wo, Cout) with Ho = (H - 1) // stride + 1.
    Expand and depthwise apply ReLU6, or `acts`: ((code, a, b) of expand, of depthwise),
    act.pyx's codes (-1: none), as the imported graphs' blocks have them (ReLU,
    hard-swish); each is the pointwise kernel's epilogue where it has it, else a pass
    over the rows just computed, in cache. Project applies none. `tile` output rows are
    computed at a time (0: enough rows for TILE_PIXELS output pixels, so that small
    images still give the pointwise kernel long runs of pixels).
    """
    cdef Py_ssize_t H = x.shape[0], W = x.shape[1], cin = x.shape[2]
    cdef Py_ssize_t ce = wdw.shape[2], Ho = out.shape[0], Wo = out.shape[1]
    cdef Py_ssize_t cout = out.shape[2]
    if stride not in (1, 2):
        raise ValueError("stride must be 1 or 2")
    if Ho != (H - 1) // stride + 1 or Wo != (W - 1) // stride + 1:
        raise ValueError("out has the wrong height or width")
    if (wexp is None and ce != cin) or (wexp is not None and (
            wexp.shape[1] != cin or wexp.shape[0] * wexp.shape[2] < ce
            or bexp.shape[0] < ce)):
        raise ValueError("expand weight does not match x and the depthwise weight")
    if wproj.shape[1] != ce or wproj.shape[0] * wproj.shape[2] < cout or bproj.shape[0] < cout:
        raise ValueError("project weight does not match")
    if wexp is not None and wexp.shape[2] != PW_NR or wproj.shape[2] != PW_NR:
        raise ValueError(f"weights must be packed in panels of {PW_NR} (this build)")
    if bdw.shape[0] < ce or wdw.shape[0] != 3 or wdw.shape[1] != 3:
        raise ValueError("depthwise weight must be (3, 3, Ce)")
    if residual and (stride != 1 or cin != cout):
        raise ValueError("a residual needs stride 1 and as many outputs as inputs")
    if H == 0 or W == 0 or cout == 0:
        return
    cdef const float* xp = &x[0, 0, 0]
    cdef const float* we = NULL if wexp is None or cin == 0 else &wexp[0, 0, 0]
    cdef const float* be = NULL if wexp is None else &bexp[0]
    cdef const float* wd = &wdw[0, 0, 0]
    cdef const float* bd = &bdw[0]
    cdef const float* wpj = &wproj[0, 0, 0]
    cdef const float* bpj = &bproj[0]
    cdef float* op = &out[0, 0, 0]
    cdef bint expand = wexp is not None
    cdef int fe = _RELU6, fd = _RELU6, pe = PW_ACT_RELU6
    cdef float ea = 0, eb = 0, da = 0, db = 0
    if acts is not None:
        (fe, ea, eb), (fd, da, db) = acts
        fe, fd = _as_relu6(fe, ea, eb), _as_relu6(fd, da, db)
        pe = _pw_act(fe)
        if pe != PW_ACT_NONE:
            fe = -1            # in the kernel's epilogue
    if tile <= 0:
        tile = (TILE_PIXELS + Wo - 1) // Wo
    if tile > Ho:
        tile = Ho
    # A tile of output rows reads (tile - 1) * stride + 3 input rows: a ring of that many
    # expanded rows (row iy in slot iy % P) never overwrites a row the tile still needs.
    cdef Py_ssize_t P = (tile - 1) * stride + 3
    # the ring, the tile's depthwise rows, 9 columns of zeros
    cdef float* ring = <float*>malloc(((P * W if expand else 0) + tile * Wo + 9) * ce
                                      * sizeof(float))
    if ring == NULL:
        raise MemoryError()
    cdef float* dwrows = ring + (P * W * ce if expand else 0)
    cdef float* zero = dwrows + tile * Wo * ce
    cdef const float* rows[3]
    cdef Py_ssize_t oy0, oy, nt, dy, iy, nxt = 0, hi, c, cnt
    try:
        with nogil:
            for c in range(9 * ce):
                zero[c] = 0
            oy0 = 0
            while oy0 < Ho:
                nt = Ho - oy0 if Ho - oy0 < tile else tile
                hi = (oy0 + nt - 1) * stride + 2
                if hi > H:
                    hi = H
                while expand and nxt < hi:
                    # the rows up to hi, or up to the end of the ring, in one call
                    cnt = hi - nxt
                    if nxt % P + cnt > P:
                        cnt = P - nxt % P
                    pw_packed_serial(xp + nxt * W * cin, cnt * W, cin, we, be,
                                     ring + (nxt % P) * W * ce, ce, NULL, 0, pe)
                    if fe >= 0:
                        _run(ring + (nxt % P) * W * ce, cnt * W * ce, fe, ea, eb)
                    nxt += cnt
                for oy in range(oy0, oy0 + nt):
                    for dy in range(3):
                        iy = oy * stride - 1 + dy
                        if iy < 0 or iy >= H:
                            rows[dy] = NULL
                        elif expand:
                            rows[dy] = ring + (iy % P) * W * ce
                        else:
                            rows[dy] = xp + iy * W * cin
                    row_from(dwrows + (oy - oy0) * Wo * ce, rows, zero, stride, W, Wo, ce,
                             wd, ce, bd, ce, fd == _RELU6, True)
                if fd >= 0 and fd != _RELU6:
                    _run(dwrows, nt * Wo * ce, fd, da, db)
                pw_packed_serial(dwrows, nt * Wo, ce, wpj, bpj, op + oy0 * Wo * cout, cout,
                                 xp + oy0 * W * cin if residual else NULL, cin, False)
                oy0 += nt
    finally:
        free(ring)


# Output pixels per tile when the caller does not say (see inverted_residual).
TILE_PIXELS = 64

cdef enum:
    _RELU6 = 1000      # beside act.pyx's codes: ReLU6, the epilogue of every build


cdef int _as_relu6(int fn, float a, float b):
    return _RELU6 if fn == _CLIP and a == 0 and b == 6 else fn


cdef int _pw_act(int fn):
    """The packed kernel's epilogue code for an activation, PW_ACT_NONE where it has none."""
    if fn == _RELU6:
        return PW_ACT_RELU6
    if PW_AVX512 and fn == _RELU:
        return PW_ACT_RELU
    if PW_AVX512 and fn == _HARDSWISH:
        return PW_ACT_HARDSWISH
    if PW_AVX512 and fn == _SILU:
        return PW_ACT_SILU
    return PW_ACT_NONE
