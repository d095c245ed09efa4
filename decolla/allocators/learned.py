"""The learned allocation policy at run time: numpy only, no torch.

The policy scores every device slot for one chunk at a time with a small MLP shared by
all slots (so it works for any number of devices up to M_c); the chunk goes to the best
live slot, the slot's queue estimates are updated, and the next chunk is scored.
`SlotFeatures` builds the slots' features from the stage's `Placement`; training
(decolla.policy) uses the very same code on batches. `LearnedAllocator.assign` runs the
compiled kernel decolla.kernels.policy when it is built, otherwise `assign_numpy`, a
rearranged numpy path; both take the decisions `SlotFeatures` + the MLP give (the tests
check them against that straightforward version).
"""
from __future__ import annotations

import math
from importlib import resources
from typing import Sequence

import numpy as np

from decolla.allocators.base import live_devices, resource
from decolla.cost import KINDS, ChunkCost, DeviceState, Placement, StageInfo, rates

try:
    from decolla.kernels import load as _load_kernel
    _KERNEL = _load_kernel("policy")
except ImportError:     # not built: the numpy path decides
    _KERNEL = None

FEATURE_VERSION = 1
# The DRL-ES policy of docs/POLICY.md's full run (bench/results/policies/drl-es), shipped so
# that allocator="learned" works without training first.
DEFAULT_POLICY = "policy_drl_es.npz"
N_STAGE = len(KINDS) + 2
N_FEATURES = 11 + N_STAGE
_ONEHOT = {kd: tuple(float(i == j) for j in range(len(KINDS))) for i, kd in enumerate(KINDS)}


def stage_values(kind: str, index: int, num_stages: int, macs: float, bytes_in: float) -> tuple:
    """Stage features: kind one-hot (unknown kinds count as the last), position in the
    plan, bytes-per-MAC (log)."""
    return (*_ONEHOT.get(kind, _ONEHOT[KINDS[-1]]), index / max(num_stages - 1, 1),
            math.log10(max(bytes_in, 1.0) / max(macs, 1.0)) / 3.0)


def stage_vector(kind: str, index: int, num_stages: int, macs: float, bytes_in: float) -> np.ndarray:
    """`stage_values` as an array."""
    return np.array(stage_values(kind, index, num_stages, macs, bytes_in))


class SlotFeatures:
    """The policy's input for a batch of device-slot sets, shape [B, M]: each slot's
    features for the next chunk, from the stage's `Placement`.

    `live` masks real devices; empty or dead slots are never chosen.
    """

    def __init__(self, speed, available, bandwidth, latency, busy, uplink, live, m_c):
        self.live = np.asarray(live, dtype=bool)
        self.speed = np.where(self.live, speed, 0.0)
        self.avail = np.clip(available, 0.0, 1.0)
        self.plan = Placement(rates(self.speed, self.avail), np.where(self.live, bandwidth, 1.0),
                              np.where(self.live, latency, 0.0),
                              np.where(self.live, np.maximum(busy, 0.0), 0.0),
                              np.asarray(uplink, dtype=float)[..., None])
        self.ref_speed = np.maximum(self.speed.max(axis=-1, keepdims=True), 1e-30)
        self.speed_rel = self.speed / self.ref_speed
        self.local = self.plan.local.astype(float)
        n_live = np.maximum(self.live.sum(axis=-1, keepdims=True), 1)
        self.n_live_frac = np.log(n_live) / math.log(max(m_c, 2))

    def features(self, macs, bytes_in, bytes_out, stage_vec, k: int, k_total: int) -> np.ndarray:
        """Slot features [B, M, F] for placing one chunk; scalars broadcast as [B, 1]."""
        shape1 = self.plan.req_free.shape
        macs = np.asarray(macs, dtype=float).reshape(shape1)
        bytes_in = np.asarray(bytes_in, dtype=float).reshape(shape1)
        bytes_out = np.asarray(bytes_out, dtype=float).reshape(shape1)
        done = self.plan.times(macs, bytes_in, bytes_out)
        t_ref = np.maximum(macs / self.ref_speed, 1e-9)
        xfer = bytes_in / self.plan.eff
        comp = macs / self.plan.rate
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
            self.avail, self.speed_rel, self.plan.count / k_total, self.local,
            np.broadcast_to(np.full(shape[:-1] + (1,), k / k_total), shape),
            np.broadcast_to(self.n_live_frac, shape),
        ]
        base = np.stack(np.broadcast_arrays(*cols), axis=-1)
        sv = np.broadcast_to(np.asarray(stage_vec)[..., None, :], shape + (N_STAGE,))
        feats = np.concatenate([base, sv], axis=-1)
        return np.where(self.live[..., None], feats, 0.0)

    def commit(self, choice) -> None:
        """Record that the last scored chunk went to slot `choice` ([B] ints)."""
        self.plan.commit(choice)


def default_policy_path() -> str:
    """The trained policy installed with the package (decolla/data)."""
    return str(resources.files("decolla").joinpath("data", DEFAULT_POLICY))


def _open_policy(path: str):
    """The arrays of a policy .npz; a file that is no .npz is refused by name (numpy's own
    message for it suggests loading pickles)."""
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError:
        z = None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a policy .npz file (decolla.policy.train writes them)")
    return z


class LearnedAllocator:
    """Allocator running an exported DRL/ES/DRL-ES policy (.npz) with numpy."""
    name = "learned"

    def __init__(self, path: str | None = None, compiled: bool | None = None):
        """Load the policy `path` (None: the shipped one, `default_policy_path()`); compiled:
        use the Cython kernel (None: when it is built)."""
        path = path or default_policy_path()
        if compiled and _KERNEL is None:
            raise ImportError("decolla.kernels.policy is not built: run `pip install --no-build-isolation -e .`")
        self.compiled = _KERNEL is not None if compiled is None else bool(compiled)
        with _open_policy(path) as z:
            missing = {"w0", "b0", "w1", "b1", "w2", "b2", "m_c", "feature_version"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a policy written by decolla.policy.train "
                                 f"(no {', '.join(sorted(missing))})")
            self.params = {k: z[k].astype(np.float64) for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
            self.m_c = int(z["m_c"])
            version = int(z["feature_version"])
        if version != FEATURE_VERSION:
            raise ValueError(f"{path}: policy features v{version}, runtime has v{FEATURE_VERSION}")
        if self.params["w0"].shape[0] != N_FEATURES:
            raise ValueError(f"{path}: policy expects {self.params['w0'].shape[0]} features")
        w0, hidden = self.params["w0"], self.params["w0"].shape[1]
        # The first layer regrouped over the numpy path's input columns (_COLS), plus one
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

    def _slots_or_answer(self, chunks, devices) -> tuple[list[DeviceState], list[str] | None]:
        """The slots, and the answer when there is no choice to make (one slot, no chunk)."""
        devs = self.slots(devices)
        if len(devs) == 1:
            return devs, [devs[0].name] * len(chunks)
        return devs, (None if chunks else [])

    @staticmethod
    def _stage(stage: StageInfo, chunks: Sequence[ChunkCost]) -> tuple:
        return stage_values(stage.kind, stage.index, stage.num_stages, float(sum(c.macs for c in chunks)),
                            float(sum(c.bytes_in for c in chunks)))

    def assign_compiled(self, stage: StageInfo, chunks: Sequence[ChunkCost],
                        devices: Sequence[DeviceState]) -> list[str]:
        """`assign` through the Cython kernel: the whole sequential decision loop in C."""
        devs, trivial = self._slots_or_answer(chunks, devices)
        if trivial is not None:
            return trivial
        n = len(devs)
        ref = max(max(d.speed for d in devs), 1e-30)
        uplink = float(stage.uplink)
        finite = math.isfinite(uplink)
        rows = []
        for d in devs:           # the kernel's device columns (D_RATE ... D_SPEED_REL)
            bw = float(d.bandwidth)
            loc = math.isinf(bw)
            rows.append((max(d.rate, 1e-30), math.inf if loc else min(bw, uplink), bw, d.latency, loc,
                         finite and not loc, d.busy_s, min(max(d.available, 0.0), 1.0), d.speed / ref))
        dev = np.array(rows, dtype=float)
        ch = np.array([(c.macs, c.bytes_in, c.bytes_out) for c in chunks], dtype=float)
        sv = np.array(self._stage(stage, chunks))
        out = np.empty(len(chunks), dtype=np.int64)
        scratch = np.empty(_KERNEL.scratch_size(n, self._k_w[0].shape[1]))
        _KERNEL.decide(dev, ch, sv, ref, math.log(n) / self._log_mc, *self._k_w, out, scratch)
        return [devs[i].name for i in out.tolist()]

    def assign_numpy(self, stage: StageInfo, chunks: Sequence[ChunkCost],
                     devices: Sequence[DeviceState]) -> list[str]:
        """`assign` in numpy (the fallback when the kernel is not built)."""
        # Few numpy calls, whose overhead (not the arithmetic) dominates for a handful of
        # devices. Placement is sequential (each chunk's features depend on where the
        # earlier ones went), so the policy is scored for all remaining chunks at once
        # under a guessed placement (earliest finish time, which the policy usually agrees
        # with) in one batch of matmuls; guesses are accepted up to the first chunk where
        # the policy chose differently (that choice is right too), and the rest is guessed
        # again from there.
        devs, trivial = self._slots_or_answer(chunks, devices)
        if trivial is not None:
            return trivial
        n, n_k = len(devs), len(chunks)
        ref = max(max(d.speed for d in devs), 1e-30)
        plan = Placement.of(devs, stage.uplink, overhead=False)
        # Input columns fixed for the stage: per-slot ones + per-chunk ones, and the
        # transfer and compute seconds of every chunk on every slot.
        stage_cols = (*self._stage(stage, chunks), math.log(n) / self._log_mc, 1.0)
        dv = np.array([(min(max(d.available, 0.0), 1.0), d.speed / ref, float(math.isinf(d.bandwidth)),
                        *stage_cols, eff, rate) for d, eff, rate in zip(devs, plan.eff, plan.rate)],
                      dtype=float)
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
                i = hint[j] if j < len(hint) else int(done.argmin())
                rows.append(np.concatenate((done, trial.count, (done.min(),))))
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


# Input columns of the numpy path's matrix [K, n, C] (chunk, slot, column): result time,
# wait, best slot (set per pass), transfer and compute terms, chunk position and log t_ref
# (per chunk), chunks already on the slot (per pass), then per-slot and per-stage constants.
_COLS = ("logdone", "logwait", "best", "xfer", "comp", "pos", "logtref", "count", "avail",
         "speed", "local", *(f"stage{i}" for i in range(N_STAGE)), "nlive", "one")
_N_COLS = len(_COLS)
(_C_LOGDONE, _C_LOGWAIT, _C_BEST, _C_XFER, _C_COMP, _C_POS, _C_LOGTREF, _C_COUNT, _C_AVAIL,
 _C_SPEED, _C_LOCAL) = range(11)
_C_STAGE = 11
_C_NLIVE, _C_ONE = _N_COLS - 2, _N_COLS - 1
