"""Measuring each device's link from the requester, over the transport chunks use.

Per device, one device at a time (probes to different devices would share the
requester's own link): a few tiny LinkProbes give the round-trip time; then probes of
growing size (x4 from `first_bytes`, at most `max_bytes`) until one spends at least
`target_s` on the wire beyond that round trip, so that the shaper's burst bucket and the
TCP ramp-up are small against it; `samples` probes of that size give the upload
bandwidth (the best sample: a probe can only be slowed down by other traffic).
`auto` plans with the measured bandwidth unless its name states one.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from decolla.messages import LinkEcho, LinkProbe


@dataclass
class Link:
    """One device's measured link."""
    rtt_s: float
    bytes_per_s: float

    @property
    def mbit(self) -> float:
        return self.bytes_per_s * 8 / 1e6


@dataclass
class _Progress:
    rtts: list = field(default_factory=list)
    size: int = 0
    rates: list = field(default_factory=list)


class LinkProber:
    """Decides which probe to send next and turns echoes into `links` (device -> Link)."""

    def __init__(self, first_bytes: int = 64 * 1024, max_bytes: int = 4 * 1024 * 1024,
                 target_s: float = 0.04, tiny: int = 3, samples: int = 2,
                 timeout_s: float = 10.0, clock=time.monotonic):
        self.first_bytes, self.max_bytes, self.target_s = first_bytes, max_bytes, target_s
        self.tiny, self.samples, self.timeout_s, self.clock = tiny, samples, timeout_s, clock
        self.links: dict[str, Link] = {}
        self.todo: list[str] = []                 # devices waiting to be measured, in order
        self.progress: dict[str, _Progress] = {}
        self.out: tuple | None = None             # (device, seq, size, sent at) of the probe out
        self.seq = 0
        self.ended = 0                            # measurements finished or given up

    @property
    def settled(self) -> bool:
        """At least one measurement has ended and none is waiting."""
        return self.ended > 0 and not self.todo

    def track(self, devices) -> None:
        """Measure the devices not measured yet; forget the ones not listed any more."""
        devices = list(devices)
        keep = set(devices)
        for name in [d for d in self.links if d not in keep]:
            del self.links[name]
        self.todo = [d for d in self.todo if d in keep]
        for d in devices:
            if d not in self.links and d not in self.todo and not self._measuring(d):
                self.todo.append(d)
        if self.out is not None and self.out[0] not in keep:
            self.progress.pop(self.out[0], None)
            self.out = None

    def remeasure(self, device: str) -> None:
        """Measure `device` again (its connection was remade, say); the old figure stays
        in use until then."""
        if device not in self.todo and not self._measuring(device):
            self.todo.append(device)

    def next_probe(self) -> tuple[str, LinkProbe] | None:
        """(device, probe) to send now; None while a probe is out or nothing is left."""
        if self.out is not None:
            return None
        if not self.todo:
            return None
        device = self.todo[0]
        prog = self.progress.setdefault(device, _Progress())
        self.seq += 1
        self.out = (device, self.seq, prog.size, self.clock())
        return device, LinkProbe(self.seq, bytes(prog.size))

    def echo(self, msg: LinkEcho) -> Link | None:
        """Account for an echo; the device's Link once its measurement is complete."""
        if self.out is None or msg.seq != self.out[1]:
            return None              # late echo of an expired probe
        device, _, size, sent = self.out
        self.out = None
        elapsed = self.clock() - sent
        prog = self.progress[device]
        if size == 0:
            prog.rtts.append(elapsed)
            if len(prog.rtts) >= self.tiny:
                prog.size = self.first_bytes
            return None
        wire_s = elapsed - min(prog.rtts)
        if wire_s < self.target_s and size < self.max_bytes and not prog.rates:
            prog.size = min(self.max_bytes, size * 4)
            return None
        prog.rates.append(size / max(wire_s, 1e-6))
        if len(prog.rates) < self.samples:
            return None
        link = self.links[device] = Link(min(prog.rtts), max(prog.rates))
        del self.progress[device]
        self.todo.remove(device)
        self.ended += 1
        return link

    def expire(self, seq: int) -> str | None:
        """Give up on probe `seq` if it is still out (the device is skipped until it is
        listed or remeasured again); the device's name, or None."""
        if self.out is None or self.out[1] != seq:
            return None
        device = self.out[0]
        self.out = None
        self.progress.pop(device, None)
        self.todo.remove(device)
        self.ended += 1
        return device

    def bandwidth_mbit(self) -> float | None:
        """Median measured bandwidth over the devices (None before any is measured)."""
        if not self.links:
            return None
        return statistics.median(l.mbit for l in self.links.values())

    def _measuring(self, device: str) -> bool:
        return self.out is not None and self.out[0] == device
