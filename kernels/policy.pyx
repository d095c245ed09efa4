# cython: language_level=3
"""The learned allocator's per-stage decision loop in C (float64, no Python objects).

For each chunk in order: the timing model (the arithmetic of `decolla.cost.Placement`)
gives its result time on every slot, the slot features of
`decolla.allocators.learned.SlotFeatures.features` are formed, the policy MLP scores
each slot, the chunk goes to the first best slot and the slot's queue is updated.
Low-level: no validation here (decolla.allocators.learned validates and builds the inputs).
"""
from libc.math cimport log, log1p, fabs, floor, INFINITY
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

include "_common.pxi"

cdef extern from *:
    ctypedef double* double_rp "double * __restrict__"

# Columns of the `dev` matrix (one row per slot), built by decolla.allocators.learned.
cdef enum:
    D_RATE, D_EFF, D_BW, D_LAT, D_LOCAL, D_SHARED, D_BUSY, D_AVAIL, D_SPEED_REL, N_DEV_COLS

N_DEV = N_DEV_COLS


cdef inline double _fmax(double a, double b) noexcept nogil:
    # np.maximum semantics for the non-NaN inputs that reach here
    return a if a > b else b


cdef inline double _fmin(double a, double b) noexcept nogil:
    return a if a < b else b


# tanh in float64 without libm: libm's tanh is a scalar call of ~25 ns and the policy
# needs 2 x hidden of them per slot and chunk. Cephes' tanh (rational approximation for
# |x| < 0.625, else 1 - 2 / (exp(2|x|) + 1)) with Cephes' exp: branch-free so gcc can
# vectorise it; within 4e-16 relative of np.tanh (checked in tests/test_policy_fast.py).
cdef double TP0 = -9.64399179425052238628e-1, TP1 = -9.92877231001918586564e1
cdef double TP2 = -1.61468768441708447952e3
cdef double TQ0 = 1.12811678491632931402e2, TQ1 = 2.23548839060100448583e3
cdef double TQ2 = 4.84406305325125486048e3
cdef double EP0 = 1.26177193074810590878e-4, EP1 = 3.02994407707441961300e-2
cdef double EP2 = 9.99999999999999999910e-1
cdef double EQ0 = 3.00198505138664455042e-6, EQ1 = 2.52448340349684104192e-3
cdef double EQ2 = 2.27265548208155028766e-1, EQ3 = 2.00000000000000000009e0
cdef double LN2_HI = 6.93145751953125e-1, LN2_LO = 1.42860682030941723212e-6


cdef inline double _exp_small(double x) noexcept nogil:
    """exp(x) for 0 <= x <= 40 (Cephes: x = n ln2 + r, Pade approximant of exp(r))."""
    cdef double n = floor(x * 1.4426950408889634 + 0.5)
    cdef double r = (x - n * LN2_HI) - n * LN2_LO
    cdef double z = r * r
    cdef double px = r * ((EP0 * z + EP1) * z + EP2)
    cdef double q = ((EQ0 * z + EQ1) * z + EQ2) * z + EQ3
    cdef double m = n + 6755399441055744.0      # 1.5 * 2**52: n now sits in the low mantissa bits
    cdef uint64_t bits
    cdef double two_n
    memcpy(&bits, &m, 8)
    bits = (bits + 1023) << 52                   # the exponent field of 2**n
    memcpy(&two_n, &bits, 8)
    return (1.0 + 2.0 * px / (q - px)) * two_n


cdef inline void _tanh_inplace(double* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef double v, a, z, small, big
    for i in range(n):
        v = x[i]
        a = fabs(v)
        a = a if a < 20.0 else 20.0              # tanh(20) == 1.0 in float64
        z = v * v
        small = v + v * z * (((TP0 * z + TP1) * z + TP2) / (((z + TQ0) * z + TQ1) * z + TQ2))
        big = 1.0 - 2.0 / (_exp_small(2.0 * a) + 1.0)
        big = big if v >= 0.0 else -big
        v = small if fabs(v) < 0.625 else (big if v == v else v)
        x[i] = v


cdef int _decide(const double[:, ::1] dev, const double[:, ::1] chunks, const double[::1] stage_vec,
                 double ref_speed, double n_live_frac,
                 const double* w0, const double* b0, const double* w1,
                 const double* b1, const double* w2, double b2, Py_ssize_t hid,
                 long long[::1] out, double* buf) noexcept nogil:
    cdef Py_ssize_t n = dev.shape[0], n_k = chunks.shape[0]
    cdef Py_ssize_t n_sv = stage_vec.shape[0]
    cdef Py_ssize_t i, j, h, k, pick
    # scratch: hconst [n, hid] | link_free, comp_free, count, send, comp, done, xfer, cmp [n] | h0, h1 [hid]
    cdef double* hconst = buf
    cdef double* link_free = hconst + n * hid
    cdef double* comp_free = link_free + n
    cdef double* count = comp_free + n
    cdef double* send = count + n
    cdef double* comp = send + n
    cdef double* done = comp + n
    cdef double* xfer = done + n
    cdef double* cmp = xfer + n
    cdef double_rp h0 = cmp + n
    cdef double_rp h1 = h0 + hid
    cdef const double* hc
    cdef const double* wr
    cdef double req_free = 0.0, macs, b_in, b_out, t_ref, best, s, a, e, wait, score, top
    cdef double kf = <double>n_k
    cdef double f0, f1, f2, f3, f4, f7, f9

    # First layer's stage-constant part per slot: bias + avail, speed, local, n_live, stage vector.
    for i in range(n):
        link_free[i] = 0.0
        comp_free[i] = _fmax(dev[i, D_BUSY], 0.0)
        count[i] = 0.0
        for h in range(hid):
            s = b0[h] + dev[i, D_AVAIL] * w0[5 * hid + h] + dev[i, D_SPEED_REL] * w0[6 * hid + h] \
                + dev[i, D_LOCAL] * w0[8 * hid + h] + n_live_frac * w0[10 * hid + h]
            for j in range(n_sv):
                s = s + stage_vec[j] * w0[(11 + j) * hid + h]
            hconst[i * hid + h] = s

    for k in range(n_k):
        macs = chunks[k, 0]
        b_in = chunks[k, 1]
        b_out = chunks[k, 2]
        t_ref = _fmax(macs / ref_speed, 1e-9)
        best = INFINITY
        for i in range(n):
            xfer[i] = b_in / dev[i, D_EFF]          # eff = inf for the requester itself: 0
            s = (req_free if dev[i, D_SHARED] != 0.0 and req_free > link_free[i] else link_free[i]) + xfer[i]
            a = s + dev[i, D_LAT]
            cmp[i] = macs / dev[i, D_RATE]
            e = (a if a > comp_free[i] else comp_free[i]) + cmp[i]
            send[i] = s
            comp[i] = e
            done[i] = e + dev[i, D_LAT] + (0.0 if dev[i, D_LOCAL] != 0.0 else b_out / dev[i, D_BW])
            if done[i] < best:
                best = done[i]
        pick = 0
        top = -INFINITY
        f9 = k / kf
        for i in range(n):
            wait = _fmax(done[i] - xfer[i] - cmp[i], 0.0)
            f0 = log(_fmax(done[i] / t_ref, 1e-6))
            f1 = log(_fmax(done[i] / _fmax(best, 1e-12), 1.0))
            f2 = log1p(xfer[i] / t_ref)
            f3 = log1p(_fmin(cmp[i], 1e9) / t_ref)
            f4 = log1p(_fmin(wait, 1e9) / t_ref)
            f7 = count[i] / kf
            hc = hconst + i * hid
            for h in range(hid):
                h0[h] = (hc[h] + f0 * w0[h] + f1 * w0[hid + h] + f2 * w0[2 * hid + h]
                         + f3 * w0[3 * hid + h] + f4 * w0[4 * hid + h] + f7 * w0[7 * hid + h]
                         + f9 * w0[9 * hid + h])
            _tanh_inplace(h0, hid)
            for h in range(hid):
                h1[h] = b1[h]
            for j in range(hid):
                s = h0[j]
                wr = w1 + j * hid
                for h in range(hid):
                    h1[h] += s * wr[h]
            _tanh_inplace(h1, hid)
            score = b2
            for h in range(hid):
                score += h1[h] * w2[h]
            if score != score:      # np.argmax: the first NaN wins
                pick = i
                break
            if score > top:
                top = score
                pick = i
        out[k] = pick
        link_free[pick] = send[pick]
        comp_free[pick] = comp[pick]
        if send[pick] > req_free:
            req_free = send[pick]
        count[pick] += 1.0
    return 0


def tanh(const double[::1] x, double[::1] out):
    """The kernel's float64 tanh of x, into out (exposed for testing)."""
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        out[i] = x[i]
    if x.shape[0]:
        _tanh_inplace(&out[0], x.shape[0])


def scratch_size(Py_ssize_t n, Py_ssize_t hidden):
    """Doubles of scratch memory `decide` needs for n slots."""
    return n * hidden + 8 * n + 2 * hidden


def decide(const double[:, ::1] dev, const double[:, ::1] chunks, const double[::1] stage_vec,
           double ref_speed, double n_live_frac,
           const double[:, ::1] w0, const double[::1] b0, const double[:, ::1] w1,
           const double[::1] b1, const double[::1] w2, double b2,
           long long[::1] out, double[::1] scratch):
    """Slot index for each chunk (written to `out`), chunks placed in order.

    dev: [n, 9] rate, eff. bandwidth, bandwidth, latency, local, shared uplink, busy s,
    availability, speed / fastest speed; chunks: [K, 3] MACs, bytes in, bytes out;
    scratch: at least scratch_size(n, hidden) doubles.
    """
    if dev.shape[1] != N_DEV_COLS or chunks.shape[1] != 3 or out.shape[0] < chunks.shape[0]:
        raise ValueError("policy.decide: bad input shapes")
    if (w0.shape[0] != 11 + stage_vec.shape[0] or w1.shape[0] != w0.shape[1] or w1.shape[1] != w0.shape[1]
            or w2.shape[0] != w0.shape[1] or b0.shape[0] != w0.shape[1] or b1.shape[0] != w0.shape[1]):
        raise ValueError("policy.decide: weights do not match the features")
    if scratch.shape[0] < scratch_size(dev.shape[0], w0.shape[1]):
        raise ValueError("policy.decide: scratch too small")
    with nogil:
        _decide(dev, chunks, stage_vec, ref_speed, n_live_frac, &w0[0, 0], &b0[0], &w1[0, 0], &b1[0],
                &w2[0], b2, w0.shape[1], out, &scratch[0])
