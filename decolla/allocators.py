"""Allocation policies: which live device computes each chunk of a stage.

Every allocator implements `Allocator.assign(stage, chunks, devices)` and returns
one device name per chunk, always naming a live device.

The stage timing model (`place_chunk`) lives here too: the earliest-finish-time
heuristic, the learned policy's features and the training simulator all use it,
so they agree on what "finish time" means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

#: Layer kinds known to stage features; anything else maps to the last entry.
KINDS = ("conv3x3", "dwconv3x3", "pwconv", "gap", "linear", "fused")


@dataclass(frozen=True)
class DeviceState:
    """What the allocator knows about one device when a stage is planned."""
    name: str
    speed: float          # MAC/s the device reaches when fully available (measured, for this stage's kind)
    available: float      # fraction of its CPU free for DeColla, 0..1
    bandwidth: float      # bytes/s between the requester and this device (inf: the requester itself)
    queue: int = 0        # chunks already queued or running on it
    alive: bool = True
    latency: float = 0.0  # one-way message latency in seconds
    busy_s: float = 0.0   # seconds of work already queued on it (estimate; 0 when unknown)
    overhead_s: float = 0.0  # fixed seconds each chunk costs on it besides its MACs (codec, messaging)


@dataclass(frozen=True)
class ChunkCost:
    """Cost of one chunk of a stage."""
    macs: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class StageInfo:
    """Features of the stage being allocated."""
    index: int            # position of the stage in the plan
    num_stages: int
    kind: str             # e.g. 'conv3x3', 'dwconv3x3', 'pwconv', 'linear', 'fused'
    uplink: float = math.inf  # requester's outgoing bytes/s shared by all sends; inf: not a bottleneck


class Allocator(Protocol):
    name: str

    def assign(self, stage: StageInfo, chunks: Sequence[ChunkCost],
               devices: Sequence[DeviceState]) -> list[str]:
        """Return a live device name for each chunk (same order as `chunks`)."""
        ...


class NoLiveDevice(RuntimeError):
    """Raised when a stage must be allocated but no device is alive."""


MIN_AVAILABLE = 1e-3  # a device reported at 0 % is treated as nearly stalled, not infinitely slow


def live_devices(devices: Sequence[DeviceState]) -> list[DeviceState]:
    """The alive devices, in input order; raises NoLiveDevice when there are none."""
    live = [d for d in devices if d.alive]
    if not live:
        raise NoLiveDevice("no live device to allocate the stage to")
    return live


def resource(d: DeviceState) -> float:
    """Available compute of a device in MAC/s."""
    return d.speed * max(d.available, 0.0)


def place_chunk(macs, bytes_in, bytes_out, rate, bandwidth, latency, uplink,
                link_free, comp_free, req_free, overhead=0.0):
    """Timing of one chunk if placed on each device (numpy arrays, broadcasting).

    Times are relative to the stage start. The chunk's input is sent over the
    device's link (serialised with earlier sends to that device and, when the
    requester uplink is finite, with every earlier send of the stage; a device with
    infinite bandwidth is the requester itself and needs no transfer); the device
    computes its chunks FIFO at `rate` MAC/s plus a fixed `overhead` seconds per chunk;
    the result returns after `latency` plus `bytes_out / bandwidth`. Returns
    (send_end, compute_end, result_time).
    """
    local = np.isinf(bandwidth)  # the requester itself: no transfer, no uplink use
    eff = np.where(local, np.inf, np.minimum(bandwidth, uplink))
    xfer = bytes_in / eff
    start = np.maximum(link_free, np.where(local | np.isinf(uplink), 0.0, req_free))
    send_end = start + xfer
    arrive = send_end + latency
    comp_end = np.maximum(arrive, comp_free) + (macs / np.maximum(rate, 1e-30) + overhead)
    back = np.where(np.isinf(bandwidth), 0.0, bytes_out / bandwidth)
    return send_end, comp_end, comp_end + latency + back


class _Plan:
    """Mutable per-stage bookkeeping of the timing model for a set of devices (numpy)."""

    def __init__(self, devs: Sequence[DeviceState], uplink: float):
        self.rate = np.array([_rate(d) for d in devs])
        self.bw = np.array([d.bandwidth for d in devs], dtype=float)
        self.lat = np.array([d.latency for d in devs], dtype=float)
        self.link_free = np.zeros(len(devs))
        self.comp_free = np.array([_busy(d) for d in devs], dtype=float)
        self.overhead = np.array([d.overhead_s for d in devs], dtype=float)
        self.req_free = 0.0
        self.uplink = float(uplink)
        self.count = np.zeros(len(devs))

    def times(self, c: ChunkCost):
        return place_chunk(c.macs, c.bytes_in, c.bytes_out, self.rate, self.bw, self.lat,
                           self.uplink, self.link_free, self.comp_free, self.req_free, self.overhead)

    def commit(self, i: int, send_end, comp_end) -> None:
        self.link_free[i] = send_end[i]
        self.comp_free[i] = comp_end[i]
        # A local placement leaves send_end at 0, so max() keeps the uplink's busy time.
        self.req_free = max(self.req_free, float(send_end[i]))
        self.count[i] += 1


class ScalarPlan:
    """`place_chunk` for one stage in plain Python floats, with the same arithmetic.

    For a handful of devices this is several times faster than numpy, whose per-call
    overhead dominates on tiny arrays. `times` scores every device for a chunk and
    `commit` places it on one of them; `place` does both for one device.
    """
    __slots__ = ("rate", "eff", "bw", "lat", "ovh", "local", "shared", "link_free", "comp_free",
                 "req_free", "count", "_send", "_comp")

    def __init__(self, devs: Sequence[DeviceState], uplink: float, rates=None, overhead: bool = True):
        """Timing of `devs` (rates: MAC/s per device, default speed x availability;
        overhead: use each device's `overhead_s`)."""
        finite = math.isfinite(uplink)
        self.rate, self.eff, self.bw, self.lat, self.ovh = r, e, b, lt, o = [], [], [], [], []
        self.local, self.shared, self.comp_free = lo, sh, cf = [], [], []
        for i, d in enumerate(devs):
            rate = _rate(d) if rates is None else rates[i]
            bw = float(d.bandwidth)
            loc = math.isinf(bw)
            r.append(max(rate, 1e-30))
            b.append(bw)
            lt.append(float(d.latency))
            o.append(float(d.overhead_s) if overhead else 0.0)
            lo.append(loc)
            e.append(math.inf if loc else min(bw, uplink))
            sh.append(finite and not loc)
            cf.append(max(float(d.busy_s), 0.0))
        self.link_free = [0.0] * len(b)
        self.req_free = 0.0
        self.count = [0.0] * len(b)   # chunks placed per device
        self._send = self._comp = None

    def copy(self) -> "ScalarPlan":
        new = object.__new__(ScalarPlan)
        new.rate, new.eff, new.bw, new.lat, new.ovh = self.rate, self.eff, self.bw, self.lat, self.ovh
        new.local, new.shared, new.req_free = self.local, self.shared, self.req_free
        new.link_free, new.comp_free, new.count = self.link_free[:], self.comp_free[:], self.count[:]
        new._send = new._comp = None
        return new

    def times(self, macs, bytes_in, bytes_out) -> list[float]:
        """Result time of the chunk on every device (remembered for `commit`)."""
        req = self.req_free
        send, comp, done = [], [], []
        for lf, cf, sh, eff, rate, ov, lat, bw, loc in zip(
                self.link_free, self.comp_free, self.shared, self.eff, self.rate, self.ovh, self.lat,
                self.bw, self.local):
            s = (req if sh and req > lf else lf) + bytes_in / eff
            a = s + lat
            e = (a if a > cf else cf) + (macs / rate + ov)
            send.append(s)
            comp.append(e)
            done.append(e + lat + (0.0 if loc else bytes_out / bw))
        self._send, self._comp = send, comp
        return done

    def commit(self, i: int) -> None:
        """Place the chunk last given to `times` on device i."""
        self._set(i, self._send[i], self._comp[i])

    def place(self, i: int, macs, bytes_in, bytes_out) -> None:
        """Place a chunk on device i (same arithmetic as `times` + `commit`)."""
        lf, cf = self.link_free[i], self.comp_free[i]
        s = (self.req_free if self.shared[i] and self.req_free > lf else lf) + bytes_in / self.eff[i]
        a = s + self.lat[i]
        self._set(i, s, (a if a > cf else cf) + (macs / self.rate[i] + self.ovh[i]))

    def _set(self, i: int, send_end: float, comp_end: float) -> None:
        self.link_free[i] = send_end
        self.comp_free[i] = comp_end
        if send_end > self.req_free:
            self.req_free = send_end
        self.count[i] += 1


def _rate(d: DeviceState) -> float:
    return max(d.speed, 0.0) * max(d.available, MIN_AVAILABLE)


def _busy(d: DeviceState) -> float:
    return max(d.busy_s, 0.0)


class RandomAllocator:
    """Each chunk to a uniformly random live device (seeded)."""
    name = "random"

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)

    def assign(self, stage, chunks, devices):
        live = live_devices(devices)
        idx = self._rng.integers(0, len(live), size=len(chunks))
        return [live[i].name for i in idx]


class AverageAllocator:
    """Chunks dealt round-robin over live devices (the paper's Average)."""
    name = "average"

    def __init__(self):
        self._next = 0

    def assign(self, stage, chunks, devices):
        live = live_devices(devices)
        # Continue where the previous call left off, so counts stay even over a request and
        # one-chunk stages (whole requests) rotate over the devices instead of all going to the first.
        off = self._next
        self._next += len(chunks)
        return [live[(off + j) % len(live)].name for j in range(len(chunks))]


class LeastAllocator:
    """Every chunk to the device with the most available compute (the paper's Least)."""
    name = "least"

    def assign(self, stage, chunks, devices):
        live = live_devices(devices)
        best = max(live, key=resource)
        return [best.name] * len(chunks)


class ProportionalAllocator:
    """Chunk counts in proportion to speed × availability (largest remainder)."""
    name = "proportional"

    def assign(self, stage, chunks, devices):
        live = sorted(live_devices(devices), key=resource, reverse=True)
        w = np.array([resource(d) for d in live])
        w = w / w.sum() if w.sum() > 0 else np.full(len(live), 1.0 / len(live))
        quota = w * len(chunks)
        counts = np.floor(quota).astype(int)
        for i in np.argsort(-(quota - counts), kind="stable")[: len(chunks) - counts.sum()]:
            counts[i] += 1
        return [d.name for d, n in zip(live, counts) for _ in range(n)]


class EarliestFinishAllocator:
    """List scheduling: each chunk to the device where its result returns first."""
    name = "eft"

    def assign(self, stage, chunks, devices):
        live = live_devices(devices)
        if len(live) == 1:
            return [live[0].name] * len(chunks)
        if len(live) > _SCALAR_MAX_DEVICES:
            return self._assign_numpy(stage, chunks, live)
        plan = ScalarPlan(live, stage.uplink)
        out = []
        for c in chunks:
            done = plan.times(c.macs, c.bytes_in, c.bytes_out)
            i = done.index(min(done))   # the first minimum, like np.argmin
            plan.commit(i)
            out.append(live[i].name)
        return out

    @staticmethod
    def _assign_numpy(stage, chunks, live):
        plan = _Plan(live, stage.uplink)
        out = []
        for c in chunks:
            send_end, comp_end, done = plan.times(c)
            i = int(np.argmin(done))
            plan.commit(i, send_end, comp_end)
            out.append(live[i].name)
        return out


# Above this many devices numpy's vector arithmetic beats the per-device Python loop.
_SCALAR_MAX_DEVICES = 16


_REGISTRY = {
    "random": RandomAllocator,
    "average": AverageAllocator,
    "least": LeastAllocator,
    "proportional": ProportionalAllocator,
    "eft": EarliestFinishAllocator,
}


def make_allocator(name: str, **kw) -> Allocator:
    """Build an allocator by name: random, average, least, proportional, eft, learned(path=...)."""
    if name == "learned":
        from decolla.learned import LearnedAllocator
        return LearnedAllocator(**kw)
    try:
        return _REGISTRY[name](**kw)
    except KeyError:
        raise ValueError(f"unknown allocator {name!r}; choose from "
                         f"{sorted([*_REGISTRY, 'learned'])}") from None


ALLOCATOR_NAMES = (*_REGISTRY, "learned")
