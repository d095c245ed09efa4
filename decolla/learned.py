"""The learned allocation policy at run time: numpy only, no torch.

The policy scores every device slot for one chunk at a time with a small MLP
shared by all slots (so it works for any number of devices up to M_c); the chunk
goes to the best live slot, the slot's queue estimates are updated, and the next
chunk is scored. `Planner` holds that per-stage bookkeeping and builds the slot
features; training (decolla.policy) uses the very same code on batches.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from decolla.allocators import (KINDS, MIN_AVAILABLE, ChunkCost, DeviceState, StageInfo,
                                live_devices, place_chunk, resource)

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

    def __init__(self, path):
        with np.load(path) as z:
            self.params = {k: z[k].astype(np.float64) for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
            self.m_c = int(z["m_c"])
            version = int(z["feature_version"])
        if version != FEATURE_VERSION:
            raise ValueError(f"{path}: policy features v{version}, runtime has v{FEATURE_VERSION}")
        if self.params["w0"].shape[0] != N_FEATURES:
            raise ValueError(f"{path}: policy expects {self.params['w0'].shape[0]} features")
        w = self.params
        self._t = {"w0s": np.ascontiguousarray(w["w0"][list(_STATIC)].T),
                   "w0d": np.ascontiguousarray(w["w0"][list(_DYNAMIC)].T),
                   "b0": w["b0"][:, None], "w1": np.ascontiguousarray(w["w1"].T),
                   "b1": w["b1"][:, None], "w2": w["w2"][:, 0]}

    def slots(self, devices: Sequence[DeviceState]) -> list[DeviceState]:
        """The live devices the policy sees: the M_c with the most available compute."""
        live = sorted(live_devices(devices), key=resource, reverse=True)
        return live[: self.m_c]

    def assign(self, stage: StageInfo, chunks: Sequence[ChunkCost],
               devices: Sequence[DeviceState]) -> list[str]:
        # Same features and MLP as Planner.features + mlp_scores, rearranged for one small
        # device set (numpy call overhead dominates): slot-constant features go through the
        # first layer once per stage; log1p(x/t) = log(x+t) - log(t); slots are columns.
        devs = self.slots(devices)
        n, n_k = len(devs), len(chunks)
        p = self._t
        speed = np.array([d.speed for d in devs], dtype=float)
        avail = np.clip(np.array([d.available for d in devs], dtype=float), 0.0, 1.0)
        rate = np.maximum(speed * np.maximum(avail, MIN_AVAILABLE), 1e-30)
        bw = np.array([d.bandwidth for d in devs], dtype=float)
        lat = np.array([d.latency for d in devs], dtype=float)
        comp_free = np.array([max(d.busy_s, 0.0) for d in devs], dtype=float)
        link_free = np.zeros(n)
        local = np.isinf(bw)
        eff = np.where(local, np.inf, np.minimum(bw, stage.uplink))
        up_mask = (~local).astype(float) if math.isfinite(stage.uplink) else np.zeros(n)
        ref = max(float(speed.max()), 1e-30)
        sv = stage_vector(stage.kind, stage.index, stage.num_stages,
                          float(sum(c.macs for c in chunks)), float(sum(c.bytes_in for c in chunks)))
        static = np.empty((N_FEATURES - len(_DYNAMIC), n))
        static[0] = avail
        static[1] = speed / ref
        static[2] = local
        static[3] = math.log(max(n, 1)) / math.log(max(self.m_c, 2))
        static[4:] = sv[:, None]
        h0 = p["w0s"] @ static + p["b0"]
        dyn = np.zeros((len(_DYNAMIC), n))
        req_free, out = 0.0, []
        for k, c in enumerate(chunks):
            t_ref = max(c.macs / ref, 1e-9)
            xfer = c.bytes_in / eff
            send_end = np.maximum(link_free, req_free * up_mask) + xfer
            comp = c.macs / rate
            comp_end = np.maximum(send_end + lat, comp_free) + comp
            done = comp_end + (lat + c.bytes_out / bw)
            acc = dyn[:4]
            acc[0] = done
            np.add(xfer, t_ref, out=acc[1])
            np.add(comp, t_ref, out=acc[2])
            np.subtract(done, xfer, out=acc[3])
            acc[3] -= comp
            acc[3] += t_ref
            np.log(acc, out=acc)
            acc -= math.log(t_ref)
            np.subtract(acc[0], acc[0].min(), out=dyn[4])
            dyn[6] = k / n_k
            h = np.tanh(h0 + p["w0d"] @ dyn)
            i = int((p["w2"] @ np.tanh(p["w1"] @ h + p["b1"])).argmax())
            link_free[i] = send_end[i]
            comp_free[i] = comp_end[i]
            req_free = max(req_free, float(send_end[i]))
            dyn[5, i] += 1.0 / n_k
            out.append(devs[i].name)
        return out

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


# Feature columns that change from chunk to chunk, in the row order assign() builds them
# (log done, log1p xfer, log1p comp, log1p wait, log done/best, count, chunk position);
# the others are constant over a stage.
_DYNAMIC = (0, 2, 3, 4, 1, 7, 9)
_STATIC = tuple(i for i in range(N_FEATURES) if i not in _DYNAMIC)
