"""Chunk supervision: per-device speed/transfer estimates, deadlines (t2), device health.

Pure logic with an injectable clock; the Requester actor owns one instance and
drives it (no extra actor hop on the result path). Health is the requester's own
opinion (missed deadlines) combined with the registrar's (heartbeats, convention):

  alive --miss--> suspect --(dead_after consecutive misses)--> dead
  any result from the device               -> alive
  alive --its connection broke--> suspect
  suspect + a heartbeat since its miss     -> alive (its misses still count)
  dead + >= revive_beats new heartbeats    -> alive (a device can come back)
  a new incarnation (another worker)       -> alive, its old attempts forgotten

A device is known by its incarnation (the registrar names each worker it starts), not by
its heartbeat count: a restarted device's count starts again at 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from decolla.cost import DeviceState, round_trip_s

UNQUEUED_KEEP = 1024
PRIOR_WORK_S = 0.05     # the start-up speed counts as this much computing time


@dataclass
class DeviceEstimate:
    """Moving estimates and health of one device, as seen by one requester."""
    name: str
    rate: float                    # MAC/s while computing
    sec_per_byte: float            # transfer time per byte (both directions)
    overhead: float                # fixed per-chunk cost (messaging, codec)
    state: str = "alive"           # alive | suspect | dead
    misses: int = 0
    member: bool = True            # registrar says ready
    beats: int = 0
    beats_at_death: int = 0
    beats_at_miss: int = 0
    incarnation: str = ""          # the registrar's id of the worker these figures are for
    available: float = 1.0
    reported_queue: int = 0
    outstanding: dict = field(default_factory=dict)   # attempt key -> macs
    # Attempts sent while nothing was outstanding (insertion-ordered, oldest dropped past
    # UNQUEUED_KEEP): their round trip is transfer + compute only, so their results, even
    # late or cancelled ones, may teach the transfer estimates.
    unqueued: dict = field(default_factory=dict)
    # moving averages of a chunk's MACs and computing seconds: rate = their ratio, so each
    # chunk counts by its time. A short chunk that a CPU quota let run at full speed (or
    # that waited out a throttled period) moves the rate little; a per-chunk average of
    # MAC/s let one 3 ms strip triple it and the allocator then piled whole requests there.
    work_macs: float = 0.0
    work_s: float = 0.0

    def __post_init__(self):
        if self.work_s <= 0:
            self.work_macs, self.work_s = self.rate * PRIOR_WORK_S, PRIOR_WORK_S

    @property
    def queued_macs(self) -> float:
        return float(sum(self.outstanding.values()))

    @property
    def usable(self) -> bool:
        return self.member and self.state != "dead"


class Supervisor:
    """Deadlines and health for the devices a requester sends chunks to."""

    def __init__(self, slack: float = 4.0, floor: float = 0.5, alpha: float = 0.3,
                 dead_after: int = 3, revive_beats: int = 2, prior_rate: float = 2e8,
                 prior_bandwidth: float = 50e6, prior_overhead: float = 0.005,
                 clock: Callable[[], float] = time.monotonic, link_bytes_per_s: float = 0.0):
        if slack < 1.0 or floor <= 0:
            raise ValueError("slack must be >= 1 and floor > 0")
        self.slack, self.floor, self.alpha = slack, floor, alpha
        self.dead_after, self.revive_beats = dead_after, revive_beats
        self.prior_rate, self.prior_spb = prior_rate, 1.0 / prior_bandwidth
        self.prior_overhead = prior_overhead
        # A link speed the user stated (e.g. an auto plan's bandwidth_mbit): predictions never
        # assume a faster link, so a link that just got slower does not make every chunk miss
        # its deadline and be sent twice before the estimates catch up.
        self.min_spb = 1.0 / link_bytes_per_s if link_bytes_per_s > 0 else 0.0
        self.clock = clock
        self.devices: dict[str, DeviceEstimate] = {}

    # ------------------------------------------------------------- membership
    def update_membership(self, infos: Iterable) -> list[str]:
        """Apply a registrar snapshot (objects with name/alive/speed/beats/available/queue).

        Returns devices that just stopped being usable (their chunks should move now).
        """
        lost = []
        seen = set()
        for info in infos:
            seen.add(info.name)
            d = self.devices.get(info.name)
            if d is None:
                rate = info.speed if info.speed > 0 else self.prior_rate
                d = self.devices[info.name] = DeviceEstimate(
                    info.name, rate, self.prior_spb, self.prior_overhead, member=False)
            was = d.usable
            self._reincarnate(d, getattr(info, "incarnation", ""))
            d.member = info.alive
            d.available = info.available
            d.reported_queue = info.queue
            if d.state == "dead" and info.beats - d.beats_at_death >= self.revive_beats:
                d.state, d.misses = "alive", 0
            elif d.state == "suspect" and info.beats > d.beats_at_miss:
                d.state = "alive"
            d.beats = info.beats
            if was and not d.usable:
                lost.append(info.name)
        for name, d in self.devices.items():
            if name not in seen and d.member:
                d.member = False
                lost.append(name)
        return lost

    @staticmethod
    def _reincarnate(d: DeviceEstimate, incarnation: str) -> None:
        """A device with another worker than before starts healthy: what the old worker
        missed says nothing of the new one, and its attempts died with it."""
        if incarnation == d.incarnation:
            return
        if d.incarnation:
            d.state, d.misses, d.beats, d.beats_at_death = "alive", 0, 0, 0
            d.outstanding.clear()
            d.unqueued.clear()
        d.incarnation = incarnation

    def incarnation(self, name: str) -> str:
        """The registrar's id of `name`'s current worker ('' if unknown)."""
        d = self.devices.get(name)
        return d.incarnation if d is not None else ""

    def usable(self) -> list[str]:
        """Devices chunks may be sent to, in a stable order."""
        return sorted(n for n, d in self.devices.items() if d.usable)

    def preferred(self) -> list[str]:
        """Usable devices not under suspicion, if any, else the usable ones: a device that
        just missed a deadline (stopped, say) gets no new work until it answers or beats
        again, so a many-stage request does not wait out its deadline stage after stage."""
        usable = self.usable()
        return [n for n in usable if self.devices[n].state == "alive"] or usable

    def members(self) -> list[str]:
        """Devices the registrar reports ready, whatever this requester thinks of them."""
        return sorted(n for n, d in self.devices.items() if d.member)

    def device_states(self, names: Iterable[str] | None = None) -> list[DeviceState]:
        """Allocator view of the given (default: usable) devices."""
        names = self.usable() if names is None else list(names)
        out = []
        for n in names:
            d = self.devices[n]
            out.append(DeviceState(n, speed=d.rate, available=d.available,
                                   bandwidth=1.0 / d.sec_per_byte,
                                   queue=len(d.outstanding) + d.reported_queue,
                                   alive=d.usable, latency=d.overhead / 2,
                                   busy_s=d.queued_macs / d.rate))
        return out

    def link_measured(self, name: str, bytes_per_s: float) -> None:
        """A measured link speed replaces the transfer estimate (chunks refine it later)."""
        d = self.devices.get(name)
        if d is not None and bytes_per_s > 0:
            d.sec_per_byte = 1.0 / bytes_per_s

    # ------------------------------------------------------------- deadlines
    def predict(self, name: str, macs: float, nbytes: float) -> float:
        """Predicted seconds until a chunk sent now returns (queue ahead included)."""
        d = self.devices[name]
        return round_trip_s(macs, nbytes, d.rate, max(d.sec_per_byte, self.min_spb), d.overhead,
                            d.queued_macs)

    def timeout(self, name: str, macs: float, nbytes: float,
                predicted: float | None = None) -> float:
        """t2 for a chunk sent now: slack x prediction, never below the floor."""
        if predicted is None:
            predicted = self.predict(name, macs, nbytes)
        return max(self.floor, self.slack * predicted)

    def dispatched(self, name: str, key, macs: float, nbytes: float,
                   predicted: float | None = None) -> float:
        """Record a chunk attempt sent now; returns its absolute deadline. `predicted`:
        the caller's `predict` for it, if it has one already."""
        t2 = self.timeout(name, macs, nbytes, predicted)
        d = self.devices[name]
        if not d.outstanding:
            d.unqueued[key] = True
            if len(d.unqueued) > UNQUEUED_KEEP:     # results that never came back
                del d.unqueued[next(iter(d.unqueued))]
        d.outstanding[key] = macs
        return self.clock() + t2

    def released(self, name: str, key) -> None:
        """An attempt stopped counting against the device (answered, cancelled, moved)."""
        d = self.devices.get(name)
        if d is not None:
            d.outstanding.pop(key, None)

    def completed(self, name: str, key, macs: float, nbytes: float,
                  compute_s: float, rtt_s: float) -> None:
        """A result arrived: update the moving estimates and clear misses."""
        d = self.devices.get(name)
        if d is None:
            return
        d.outstanding.pop(key, None)
        a = self.alpha
        if compute_s > 0 and macs > 0:
            d.work_macs = (1 - a) * d.work_macs + a * macs
            d.work_s = (1 - a) * d.work_s + a * compute_s
            d.rate = d.work_macs / d.work_s
        # A chunk that waited behind other work on the device: that wait is not transfer time.
        if d.unqueued.pop(key, False):
            comm = max(0.0, rtt_s - compute_s)
            if nbytes > 0:
                fixed = min(comm, d.overhead)
                d.sec_per_byte = (1 - a) * d.sec_per_byte + a * max(1e-10, (comm - fixed) / nbytes)
            d.overhead = (1 - a) * d.overhead + a * min(comm, 0.5)
        self.heard_from(name)

    def heard_from(self, name: str) -> None:
        """Any message from the device proves it is running again."""
        d = self.devices.get(name)
        if d is not None:
            d.state, d.misses = "alive", 0

    def suspect(self, name: str) -> None:
        """Its connection broke: no new work until it answers or beats again (a miss
        without the count)."""
        d = self.devices.get(name)
        if d is not None and d.state == "alive":
            d.state, d.beats_at_miss = "suspect", d.beats

    def missed(self, name: str, key) -> str:
        """A deadline expired on `name`; returns its new state."""
        d = self.devices.get(name)
        if d is None:
            return "dead"
        d.outstanding.pop(key, None)
        d.misses += 1
        d.beats_at_miss = d.beats
        if d.misses >= self.dead_after:
            if d.state != "dead":
                d.beats_at_death = d.beats
            d.state = "dead"
        else:
            d.state = "suspect"
        return d.state

    def best(self, candidates: Iterable[str], macs: float, nbytes: float) -> str | None:
        """The candidate with the earliest predicted finish (alive before suspect)."""
        scored = [(self.devices[n].state != "alive", self.predict(n, macs, nbytes), n)
                  for n in candidates if n in self.devices]
        return min(scored)[2] if scored else None
