"""The learned allocation policy at run time: numpy only, no torch.

The policy scores every device slot for one chunk at a time with a small MLP
shared by all slots (so it works for any number of devices up to M_c); the chunk
goes to the best live slot, the slot's queue estimates are updated, and the next
chunk is scored. `Planner` holds that per-stage bookkeeping and builds the slot
features; training (decolla.policy) uses the very same code on batches.
`LearnedAllocator.assign` runs the compiled kernel decolla.kernels.policy when it is
built and otherwise `assign_numpy`, a rearranged numpy fast path; all of them take the
same decisions as `assign_reference`, the Planner-based version (checked in the tests).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from decolla.allocators import (KINDS, MIN_AVAILABLE, ChunkCost, DeviceState, ScalarPlan, StageInfo,
                                live_devices, place_chunk, resource)

try:
    from decolla.kernels import load as _load_kernel
    _KERNEL = _load_kernel("policy")
except ImportError:     # not built: the numpy path decides
    _KERNEL = None

FEATURE_VERSION = 1
N_STAGE = len(KINDS) + 2
N_FEATURES = 11 + N_STAGE


def stage_vector(kind: str, index: int, num_stages: int, macs: float, bytes_in: float) -> np.ndarray:
    """Stage features: kind one-hot, position in the plan, bytes-per-MAC (log)."""
    v = np.zeros(N_STAGE)
    v[KINDS.index(kind) if kind in KINDS else len(KINDS) - 1] = 1.0
    v[len(KINDS)] = index / max(num_stages - 1, 1)
    v[len(KINDS) + 1] = math.log10(max(bytes_in, 1.0) / max(macs, 1.0)) / 3.0
    return v


class Planner:
    """Stage-local timing estimates for a batch of device-slot sets, shape [B, M].

    `live` masks real devices; empty or dead slots are never chosen.
    """

    def __init__(self, speed, available, bandwidth, latency, busy, uplink, live, m_c):
        self.live = np.asarray(live, dtype=bool)
        self.speed = np.where(self.live, speed, 0.0)
        self.avail = np.clip(available, 0.0, 1.0)
        self.rate = self.speed * np.maximum(self.avail, MIN_AVAILABLE)
        self.bw = np.where(self.live, bandwidth, 1.0)
        self.lat = np.where(self.live, latency, 0.0)
        self.uplink = np.asarray(uplink, dtype=float)[..., None]
        self.link_free = np.zeros(self.live.shape)
        self.comp_free = np.where(self.live, np.maximum(busy, 0.0), 0.0)
        self.req_free = np.zeros(self.live.shape[:-1] + (1,))
        self.count = np.zeros(self.live.shape)
        self.ref_speed = np.maximum(self.speed.max(axis=-1, keepdims=True), 1e-30)
        self.speed_rel = self.speed / self.ref_speed
        self.local = np.isinf(self.bw).astype(float)
        n_live = np.maximum(self.live.sum(axis=-1, keepdims=True), 1)
        self.n_live_frac = np.log(n_live) / math.log(max(m_c, 2))
        self._last = None

    def features(self, macs, bytes_in, bytes_out, stage_vec, k: int, k_total: int) -> np.ndarray:
        """Slot features [B, M, F] for placing one chunk; scalars broadcast as [B, 1]."""
        macs = np.asarray(macs, dtype=float).reshape(self.req_free.shape)
        bytes_in = np.asarray(bytes_in, dtype=float).reshape(self.req_free.shape)
        bytes_out = np.asarray(bytes_out, dtype=float).reshape(self.req_free.shape)
        send_end, comp_end, done = place_chunk(
            macs, bytes_in, bytes_out, self.rate, self.bw, self.lat, self.uplink,
            self.link_free, self.comp_free, self.req_free)
        self._last = (send_end, comp_end, done)
        t_ref = np.maximum(macs / self.ref_speed, 1e-9)
        xfer = bytes_in / np.where(np.isinf(self.bw), np.inf, np.minimum(self.bw, self.uplink))
        comp = macs / np.maximum(self.rate, 1e-30)
        wait = np.maximum(done - xfer - comp, 0.0)
        best = np.where(self.live, done, np.inf).min(axis=-1, keepdims=True)
        done_safe = np.where(self.live, done, best)
        shape = self.live.shape
        cols = [
            np.log(np.maximum(done_safe / t_ref, 1e-6)),
            np.log(np.maximum(done_safe / np.maximum(best, 1e-12), 1.0)),
            np.log1p(np.where(self.live, xfer, 0.0) / t_ref),
            np.log1p(np.where(self.live, np.minimum(comp, 1e9), 0.0) / t_ref),
            np.log1p(np.where(self.live, np.minimum(wait, 1e9), 0.0) / t_ref),
            self.avail, self.speed_rel, self.count / k_total, self.local,
            np.broadcast_to(np.full(shape[:-1] + (1,), k / k_total), shape),
            np.broadcast_to(self.n_live_frac, shape),
        ]
        base = np.stack(np.broadcast_arrays(*cols), axis=-1)
        sv = np.broadcast_to(np.asarray(stage_vec)[..., None, :], shape + (N_STAGE,))
        feats = np.concatenate([base, sv], axis=-1)
        return np.where(self.live[..., None], feats, 0.0)

    def commit(self, choice) -> None:
        """Record that the last scored chunk went to slot `choice` ([B] ints)."""
        send_end, comp_end, _ = self._last
        choice = np.asarray(choice).reshape(self.req_free.shape)
        s = np.take_along_axis(send_end, choice, axis=-1)
        c = np.take_along_axis(comp_end, choice, axis=-1)
        np.put_along_axis(self.link_free, choice, s, axis=-1)
        np.put_along_axis(self.comp_free, choice, c, axis=-1)
        self.req_free = np.maximum(self.req_free, s)
        np.put_along_axis(self.count, choice, np.take_along_axis(self.count, choice, -1) + 1, -1)


def mlp_scores(params: dict, feats: np.ndarray) -> np.ndarray:
    """Score of each slot: tanh MLP applied per slot, [.., M, F] -> [.., M]."""
    h = np.tanh(feats @ params["w0"] + params["b0"])
    h = np.tanh(h @ params["w1"] + params["b1"])
    return (h @ params["w2"] + params["b2"])[..., 0]


def masked_argmax(scores: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Index of the best live slot along the last axis."""
    return np.argmax(np.where(live, scores, -np.inf), axis=-1)


class LearnedAllocator:
    """Allocator running an exported DRL/ES/DRL-ES policy (.npz) with numpy."""
    name = "learned"

    def __init__(self, path, compiled: bool | None = None):
        """Load the policy `path`; compiled: use the Cython kernel (None: when it is built)."""
        if compiled and _KERNEL is None:
            raise ImportError("decolla.kernels.policy is not built: run `pip install --no-build-isolation -e .`")
        self.compiled = _KERNEL is not None if compiled is None else bool(compiled)
        with np.load(path) as z:
            self.params = {k: z[k].astype(np.float64) for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
            self.m_c = int(z["m_c"])
            version = int(z["feature_version"])
        if version != FEATURE_VERSION:
            raise ValueError(f"{path}: policy features v{version}, runtime has v{FEATURE_VERSION}")
        if self.params["w0"].shape[0] != N_FEATURES:
            raise ValueError(f"{path}: policy expects {self.params['w0'].shape[0]} features")
        w0, hidden = self.params["w0"], self.params["w0"].shape[1]
        # The first layer regrouped over the fast path's input columns (_COLS), plus one
        # output column driven to tanh() == 1.0 exactly, which carries the second layer's bias.
        w = np.zeros((_N_COLS, hidden + 1))
        h = slice(0, hidden)
        w[_C_LOGDONE, h] = w0[0] + w0[1]        # log done feeds "done / t_ref" and "done / best"
        w[_C_LOGWAIT, h] = w0[4]
        w[_C_BEST, h] = -w0[1]
        w[_C_XFER, h] = w0[2]
        w[_C_COMP, h] = w0[3]
        w[_C_POS, h] = w0[9]
        w[_C_LOGTREF, h] = -(w0[0] + w0[2] + w0[3] + w0[4])
        w[_C_COUNT, h] = w0[7]
        w[_C_AVAIL, h] = w0[5]
        w[_C_SPEED, h] = w0[6]
        w[_C_LOCAL, h] = w0[8]
        w[_C_STAGE:_C_STAGE + N_STAGE, h] = w0[11:]
        w[_C_NLIVE, h] = w0[10]
        w[_C_ONE, h] = self.params["b0"]
        w[_C_ONE, hidden] = 1e3
        self._w_first = w
        self._w1 = np.concatenate([self.params["w1"], self.params["b1"][None]], 0)   # [H + 1, H]
        self._w2 = np.ascontiguousarray(self.params["w2"][:, 0])
        self._log_mc = math.log(max(self.m_c, 2))
        self._onehot = {kd: tuple(float(i == j) for j in range(len(KINDS))) for i, kd in enumerate(KINDS)}
        p = self.params
        self._k_w = (np.ascontiguousarray(p["w0"]), np.ascontiguousarray(p["b0"]),
                     np.ascontiguousarray(p["w1"]), np.ascontiguousarray(p["b1"]),
                     np.ascontiguousarray(p["w2"][:, 0]), float(p["b2"][0]))

    def slots(self, devices: Sequence[DeviceState]) -> list[DeviceState]:
        """The live devices the policy sees: the M_c with the most available compute."""
        live = sorted(live_devices(devices), key=resource, reverse=True)
        return live[: self.m_c]

    def assign(self, stage: StageInfo, chunks: Sequence[ChunkCost],
               devices: Sequence[DeviceState]) -> list[str]:
        """A live device name for each chunk (compiled kernel when available, else numpy)."""
        if self.compiled:
            return self.assign_compiled(stage, chunks, devices)
        return self.assign_numpy(stage, chunks, devices)

    def assign_compiled(self, stage: StageInfo, chunks: Sequence[ChunkCost],
                        devices: Sequence[DeviceState]) -> list[str]:
        """`assign` through the Cython kernel: the whole sequential decision loop in C."""
        devs = self.slots(devices)
        if len(devs) == 1:          # no choice to make
            return [devs[0].name] * len(chunks)
        if not chunks:
            return []
        n = len(devs)
        ref = max(max(d.speed for d in devs), 1e-30)
        uplink = float(stage.uplink)
        finite = math.isfinite(uplink)
        rows = []
        for d in devs:
            a = min(max(d.available, 0.0), 1.0)
            bw = float(d.bandwidth)
            loc = math.isinf(bw)
            rows.append((max(d.speed * max(a, MIN_AVAILABLE), 1e-30), math.inf if loc else min(bw, uplink),
                         bw, d.latency, loc, finite and not loc, d.busy_s, a, d.speed / ref))
        dev = np.array(rows, dtype=float)
        ch = np.array([(c.macs, c.bytes_in, c.bytes_out) for c in chunks], dtype=float)
        tot_macs = float(sum(c.macs for c in chunks))
        tot_in = float(sum(c.bytes_in for c in chunks))
        sv = np.array((*self._onehot.get(stage.kind, self._onehot[KINDS[-1]]),
                       stage.index / max(stage.num_stages - 1, 1),
                       math.log10(max(tot_in, 1.0) / max(tot_macs, 1.0)) / 3.0))
        out = np.empty(len(chunks), dtype=np.int64)
        scratch = np.empty(_KERNEL.scratch_size(n, self._k_w[0].shape[1]))
        _KERNEL.decide(dev, ch, sv, ref, math.log(n) / self._log_mc, *self._k_w, out, scratch)
        return [devs[i].name for i in out.tolist()]

    def assign_numpy(self, stage: StageInfo, chunks: Sequence[ChunkCost],
                     devices: Sequence[DeviceState]) -> list[str]:
        """`assign` in numpy (the fallback when the kernel is not built)."""
        # Same decisions as assign_reference with few numpy calls, whose overhead (not the
        # arithmetic) dominates for a handful of devices. Placement is sequential (each
        # chunk's features depend on where the earlier ones went), so the policy is scored
        # for all remaining chunks at once under a guessed placement (earliest finish
        # time, which the policy usually agrees with), in plain-Python timing + one batch
        # of matmuls; guesses are accepted up to the first chunk where the policy chose
        # differently (that choice is right too), and the rest is guessed again from there.
        devs = self.slots(devices)
        if len(devs) == 1:          # no choice to make
            return [devs[0].name] * len(chunks)
        if not chunks:
            return []
        n, n_k = len(devs), len(chunks)
        ref = max(max(d.speed for d in devs), 1e-30)
        avail = [min(max(d.available, 0.0), 1.0) for d in devs]
        plan = ScalarPlan(devs, stage.uplink, [d.speed * max(a, MIN_AVAILABLE) for d, a in zip(devs, avail)],
                          overhead=False)
        # Input columns fixed for the stage: per-slot ones + per-chunk ones, and the
        # transfer and compute seconds of every chunk on every slot.
        tot_macs = sum(c.macs for c in chunks)
        tot_in = sum(c.bytes_in for c in chunks)
        stage_cols = (*self._onehot.get(stage.kind, self._onehot[KINDS[-1]]),
                      stage.index / max(stage.num_stages - 1, 1),
                      math.log10(max(float(tot_in), 1.0) / max(float(tot_macs), 1.0)) / 3.0,
                      math.log(n) / self._log_mc, 1.0)
        dv = np.array([(a, d.speed / ref, float(math.isinf(d.bandwidth)), *stage_cols, eff, rate)
                       for d, a, eff, rate in zip(devs, avail, plan.eff, plan.rate)], dtype=float)
        c_rows = []
        for k, c in enumerate(chunks):
            t = max(c.macs / ref, 1e-9)
            c_rows.append((k / n_k, math.log(t), c.bytes_in, c.macs, t))
        cc = np.array(c_rows, dtype=float)
        cols = np.empty((n_k, n, _N_COLS))                      # [K, n, C]
        cols[:, :, _C_AVAIL:] = dv[:, :-2]
        cols[:, :, _C_POS:_C_LOGTREF + 1] = cc[:, None, :2]
        xc = cc[:, None, 2:4] / dv[:, -2:]                      # [K, n, 2] transfer, compute seconds
        t_ref = cc[:, 4:]                                       # [K, 1]
        feats = cols[:, :, _C_XFER:_C_COMP + 1]
        np.add(xc, t_ref[:, :, None], out=feats)
        np.log(feats, out=feats)
        wait_off = xc[:, :, 0] + xc[:, :, 1]                     # done - wait_off = wait + t_ref
        wait_off -= t_ref
        out, f, hint = [], 0, []
        while f < n_k:
            trial = plan.copy()
            rows, guess = [], []
            for j, c in enumerate(chunks[f:]):
                done = trial.times(c.macs, c.bytes_in, c.bytes_out)
                first = min(done)
                i = hint[j] if j < len(hint) else done.index(first)
                rows.append(done + trial.count + [first])
                guess.append(i)
                trial.commit(i)
            picks = self._best_slots(cols[f:], rows, wait_off[f:], t_ref[f:], n_k)
            j = next((j for j, (p, g) in enumerate(zip(picks, guess)) if p != g), len(picks) - 1)
            out += [devs[p].name for p in picks[:j + 1]]
            if f + j + 1 == n_k:
                break
            for c, p in zip(chunks[f:f + j + 1], picks):
                plan.place(p, c.macs, c.bytes_in, c.bytes_out)
            f += j + 1
            hint = picks[j + 1:]
        return out

    def _best_slots(self, cols, rows, wait_off, t_ref, n_k) -> list[int]:
        """Policy's choice for each chunk of `cols`; rows[j] = result time on each slot,
        chunks already on each slot, the earliest result time."""
        m, n = cols.shape[:2]
        r = np.array(rows, dtype=float)
        done = r[:, :n]
        cols[:, :, _C_LOGDONE] = done
        wait = np.subtract(done, wait_off, out=cols[:, :, _C_LOGWAIT])   # wait + t_ref
        np.maximum(wait, t_ref, out=wait)
        cols[:, :, _C_BEST] = r[:, -1:]
        dw = cols[:, :, :_C_BEST + 1]
        np.log(dw, out=dw)                     # log is monotonic: log(min done) = min log done
        np.divide(r[:, n:-1], n_k, out=cols[:, :, _C_COUNT])
        h1 = np.dot(cols.reshape(m * n, _N_COLS), self._w_first)
        np.tanh(h1, out=h1)
        h2 = np.dot(h1, self._w1)
        np.tanh(h2, out=h2)
        return np.dot(h2, self._w2).reshape(m, n).argmax(axis=1).tolist()

    def assign_reference(self, stage: StageInfo, chunks: Sequence[ChunkCost],
                         devices: Sequence[DeviceState]) -> list[str]:
        """Straightforward Planner-based version of assign (for checking the fast path)."""
        devs = self.slots(devices)
        plan = Planner(
            np.array([[d.speed for d in devs]]), np.array([[d.available for d in devs]]),
            np.array([[d.bandwidth for d in devs]], dtype=float),
            np.array([[d.latency for d in devs]]), np.array([[d.busy_s for d in devs]]),
            np.array([stage.uplink]), np.ones((1, len(devs)), bool), self.m_c)
        total = float(sum(c.macs for c in chunks))
        sv = stage_vector(stage.kind, stage.index, stage.num_stages, total,
                          float(sum(c.bytes_in for c in chunks)))
        out = []
        for k, c in enumerate(chunks):
            f = plan.features(c.macs, c.bytes_in, c.bytes_out, sv[None], k, len(chunks))
            i = masked_argmax(mlp_scores(self.params, f), plan.live)
            plan.commit(i)
            out.append(devs[int(i[0])].name)
        return out


# Input columns of the fast path's matrix [K, n, C] (chunk, slot, column): result time,
# wait, best slot (set per pass), transfer and compute terms, chunk position and log t_ref
# (per chunk), chunks already on the slot (per pass), then per-slot and per-stage constants.
_COLS = ("logdone", "logwait", "best", "xfer", "comp", "pos", "logtref", "count", "avail",
         "speed", "local", *(f"stage{i}" for i in range(N_STAGE)), "nlive", "one")
_N_COLS = len(_COLS)
(_C_LOGDONE, _C_LOGWAIT, _C_BEST, _C_XFER, _C_COMP, _C_POS, _C_LOGTREF, _C_COUNT, _C_AVAIL,
 _C_SPEED, _C_LOCAL) = range(11)
_C_STAGE = 11
_C_NLIVE, _C_ONE = _N_COLS - 2, _N_COLS - 1
