"""The cost model: what a chunk costs and when its result is back (numpy only).

Every timing estimate DeColla makes lives here, so that all layers can use it:

- `KIND_SPEED`: per layer kind, the MAC/s of a Pi-4-class core and the relative speed
  the policy's training scenarios draw devices with.
- `DeviceState`, `ChunkCost`, `StageInfo`: what an allocator knows when it places a stage.
- `Placement`: when each chunk of a stage, placed on one of a set of devices, is back.
  The earliest-finish-time allocator, the learned policy's features (and its compiled
  kernel, kernels/policy.pyx, with the same arithmetic) and the training simulator use it.
- `round_trip_s`: one chunk sent now to one device, as the supervisor sets deadlines.
- `layer_seconds`, `star_stage_seconds`: the auto planner's estimate of a stage, from
  layer specs, before any device is known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np


class KindSpeed(NamedTuple):
    core: float       # MAC/s of one Pi-4-class core (Cortex-A72, one thread, decolla's kernels)
    scenario: float   # speed relative to pwconv in the training scenarios


# The scenario column is rougher than the core column (gap, linear); the committed
# policies were trained on scenarios drawn with it, so it stays as it is.
KIND_SPEED = {
    "conv3x3": KindSpeed(1.2e9, 0.8),
    "dwconv3x3": KindSpeed(0.45e9, 0.3),   # depthwise is memory bound
    "pwconv": KindSpeed(1.6e9, 1.0),
    "gap": KindSpeed(0.5e9, 0.1),
    "linear": KindSpeed(1.0e9, 0.5),
    "fused": KindSpeed(1.6e9, 0.8),        # a stage of several layers, mostly pointwise
    # the operators of imported graphs (decolla.graph: `Node.cost_kind`), by analogy with
    # the kinds above: any other convolution is im2col + the pointwise gemm with the copy
    # on top, depthwise of other sizes the 3x3 kernel's loop, pools and element-wise ops
    # one pass over memory per input element (MACs counted as elements read)
    "conv": KindSpeed(1.0e9, 0.7),
    "dwconv": KindSpeed(0.4e9, 0.3),
    "pool": KindSpeed(0.5e9, 0.1),
    "eltwise": KindSpeed(0.3e9, 0.1),
    "graph": KindSpeed(1.2e9, 0.8),        # a segment without its per-op breakdown
}
#: Layer kinds in the order of the learned policy's stage features (its file format: the
#: kinds added for imported graphs are not among them, the policy sees them as 'fused').
KINDS = ("conv3x3", "dwconv3x3", "pwconv", "gap", "linear", "fused")
#: MAC/s assumed for a layer kind the table does not know.
DEFAULT_CORE_SPEED = KIND_SPEED["pwconv"].core


def core_speeds() -> dict[str, float]:
    """MAC/s of one Pi-4-class core per layer kind (a fresh dict)."""
    return {kind: s.core for kind, s in KIND_SPEED.items()}


# ---- what an allocator knows ------------------------------------------------------------

MIN_AVAILABLE = 1e-3  # a device reported at 0 % is treated as nearly stalled, not infinitely slow


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

    @property
    def rate(self) -> float:
        """MAC/s it computes at now (`rates` for one device)."""
        return max(self.speed, 0.0) * min(max(self.available, MIN_AVAILABLE), 1.0)


def rates(speed, available) -> np.ndarray:
    """MAC/s devices compute at: speed x availability (clipped to MIN_AVAILABLE..1)."""
    return np.maximum(speed, 0.0) * np.clip(available, MIN_AVAILABLE, 1.0)


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


# ---- placement timing ---------------------------------------------------------------------

class Placement:
    """When chunks placed one after another on device slots are back, from the stage start.

    Arrays are [..., M]: M device slots under any leading batch shape (one stage per row).
    A chunk's input goes over its device's link after the earlier sends to that device
    and, when the requester's uplink is finite, after every earlier send of the stage (a
    device with infinite bandwidth is the requester itself: no transfer, no uplink). The
    device computes its chunks in arrival order, after the work it already had (`busy`),
    at `rate` MAC/s plus a fixed `overhead` seconds per chunk; the result comes back after
    `latency` plus bytes_out / bandwidth. The learned policy's kernel (kernels/policy.pyx)
    does the same arithmetic in C; the tests hold both to the same decisions.
    """

    def __init__(self, rate, bandwidth, latency, busy, uplink=math.inf, overhead=0.0):
        """rate (MAC/s), bandwidth (bytes/s), latency (s), busy (s of work queued): [..., M];
        uplink (bytes/s): scalar or [..., 1]; overhead (s per chunk): scalar or [..., M]."""
        self.rate = np.maximum(rate, 1e-30)
        self.bw = bw = np.asarray(bandwidth, dtype=float)
        self.lat = np.asarray(latency, dtype=float)
        self.ovh = np.asarray(overhead, dtype=float)
        up = np.asarray(uplink, dtype=float)
        self.local = local = np.isinf(bw)
        self.eff = np.where(local, np.inf, np.minimum(bw, up))       # bytes/s of a send
        self.shared = ~local & np.isfinite(up)                        # sends wait for the uplink
        self._uplink = bool(self.shared.any())
        shape = self.rate.shape
        self.link_free = np.zeros(shape)
        self.comp_free = np.maximum(busy, 0.0)
        self.req_free = np.zeros(shape[:-1] + (1,))
        self.count = np.zeros(shape)                                 # chunks placed per slot
        self._send = self._comp = None

    @classmethod
    def of(cls, devices: Sequence[DeviceState], uplink: float = math.inf,
           overhead: bool = True) -> "Placement":
        """Placement on `devices` (overhead: count each one's `overhead_s`)."""
        return cls([d.rate for d in devices], [d.bandwidth for d in devices],
                   [d.latency for d in devices], [d.busy_s for d in devices], uplink,
                   [d.overhead_s for d in devices] if overhead else 0.0)

    def copy(self) -> "Placement":
        """A copy to place chunks on without changing this one (the constants are shared)."""
        new = object.__new__(Placement)
        new.__dict__.update(self.__dict__)
        for k in ("link_free", "comp_free", "req_free", "count"):
            setattr(new, k, getattr(self, k).copy())
        return new

    def times(self, macs, bytes_in, bytes_out) -> np.ndarray:
        """Result time of a chunk on every slot (remembered for `commit`); a batch's
        per-row chunk sizes come as [..., 1]."""
        if self._uplink:
            send = np.maximum(self.link_free, np.where(self.shared, self.req_free, 0.0))
            send += bytes_in / self.eff
        else:
            send = self.link_free + bytes_in / self.eff
        comp = send + self.lat
        np.maximum(comp, self.comp_free, out=comp)
        comp += macs / self.rate + self.ovh
        self._send, self._comp = send, comp
        return comp + self.lat + bytes_out / self.bw     # bw is inf for the requester: 0 s

    def commit(self, choice) -> None:
        """The chunk last given to `times` goes to slot `choice` (an int; [...] ints in a batch)."""
        if self.link_free.ndim == 1:
            s = self._send[choice]
            self.link_free[choice] = s
            self.comp_free[choice] = self._comp[choice]
            self.count[choice] += 1
            if s > self.req_free[0]:
                self.req_free[0] = s
            return
        c = np.asarray(choice).reshape(self.req_free.shape)
        s = np.take_along_axis(self._send, c, axis=-1)
        np.put_along_axis(self.link_free, c, s, axis=-1)
        np.put_along_axis(self.comp_free, c, np.take_along_axis(self._comp, c, axis=-1), axis=-1)
        np.maximum(self.req_free, s, out=self.req_free)
        np.put_along_axis(self.count, c, np.take_along_axis(self.count, c, axis=-1) + 1, axis=-1)

    def place(self, choice, macs, bytes_in, bytes_out):
        """Put a chunk on slot `choice`; returns its result time there."""
        done = self.times(macs, bytes_in, bytes_out)
        self.commit(choice)
        if done.ndim == 1:
            return float(done[choice])
        return np.take_along_axis(done, np.asarray(choice).reshape(self.req_free.shape), axis=-1)[..., 0]


def round_trip_s(macs: float, nbytes: float, rate: float, sec_per_byte: float,
                 overhead: float, queued_macs: float = 0.0) -> float:
    """Seconds until a chunk sent now to one device is back: its fixed overhead, its bytes
    (both ways), the work queued before it and its own, one after the other. No overlap is
    assumed, so a deadline a few times this is safe."""
    return overhead + nbytes * sec_per_byte + (queued_macs + macs) / rate


# ---- the auto planner's stage estimate ---------------------------------------------------

# What one kernel call costs whatever its rows, in MACs per weight of the layer (measured
# on the host with `decolla.ops`, one row per call over MobileNetV2-224, minus that row's
# MACs: weight traffic and per-call set-up; pointwise is cheap because its kernel packs
# a layer's weight once, not per call). A strip pays it for every layer it computes: the
# part of a layer's time that splitting by rows does not divide.
CALL_MACS_PER_WEIGHT = {"conv3x3": 25.0, "pwconv": 11.0, "dwconv3x3": 47.0}


def layer_weights(spec: dict) -> int:
    """Weights of a layer (kernel taps x input x output channels; depthwise: taps x channels;
    an imported graph segment: all of its nodes')."""
    if "weights" in spec:
        return int(spec["weights"])
    cin, cout = spec["in_shape"][-1], spec["out_shape"][-1]
    return {"conv3x3": 9 * cin * cout, "dwconv3x3": 9 * cout, "pwconv": cin * cout,
            "linear": cin * cout}.get(spec["kind"], 0)


def layer_seconds(spec: dict, frac: float, speeds: dict, call_macs_per_weight: dict,
                  whole_weights: bool) -> float:
    """Seconds one device takes for `frac` of a layer's outputs: that share of its MACs
    plus the per-call cost of the weights it is called with (all of them for a row strip,
    `frac` of them for a slice of the output channels)."""
    rate = speeds.get(spec["kind"], DEFAULT_CORE_SPEED)
    fixed = call_macs_per_weight.get(spec["kind"], 0.0) * layer_weights(spec)
    compute = spec["macs"] / rate
    if spec.get("op_macs"):       # a graph segment: each operator kind at its own speed
        compute = sum(m / speeds.get(k, DEFAULT_CORE_SPEED) for k, m in spec["op_macs"].items())
    return compute * frac + fixed * (1.0 if whole_weights else frac) / rate


def star_stage_seconds(compute_s: Sequence[float], costs: Sequence[ChunkCost], devices: int,
                       link_s: Callable[[float], float], message_s: float, chunk_s: float,
                       shared_link: bool, lockstep: bool) -> float:
    """When the last result of a stage is back, on `devices` devices around the requester.

    Chunk i goes to device i mod `devices`. The requester sends inputs one after the other
    (`message_s` each, serial, plus `link_s(bytes)` on its one link, or with `shared_link`
    False on each device's own link, which overlap); a device computes a chunk once its
    input is there and it is free (`chunk_s` + its compute seconds); results come back one
    after the other, in finishing order. `lockstep`: all chunks end with the slowest (strips
    swapping halos).
    """
    n = devices
    t, link, free, finish = 0.0, [0.0] * n, [0.0] * n, []
    for i, (cost, comp) in enumerate(zip(costs, compute_s)):
        d = i % n
        if shared_link:               # one requester link: transfers one after the other
            t += message_s + link_s(cost.bytes_in)
            arrive = t
        else:                         # the requester's messages in turn, links in parallel
            t += message_s
            link[d] = max(t, link[d]) + link_s(cost.bytes_in)
            arrive = link[d]
        free[d] = max(arrive, free[d]) + chunk_s + comp
        finish.append((free[d], cost.bytes_out, d))
    if lockstep:
        last = max(f for f, _, _ in finish)
        finish = [(last, out, d) for _, out, d in finish]
    down = 0.0
    for f, out, d in sorted(finish):
        if shared_link:
            down = max(down, f) + message_s + link_s(out)
        else:
            link[d] = max(link[d], f) + link_s(out)
            down = max(down, link[d]) + message_s
    return down
