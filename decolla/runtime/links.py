"""Measuring the devices' links from the requester, over the transport chunks use.

Per device, one device at a time (probes to different devices would share the
requester's own link): a few tiny LinkProbes give the round-trip time; then probes of
growing size (x4 from `first_bytes`, at most `max_bytes`) until one spends at least
`target_s` on the wire beyond that round trip, so that the shaper's burst bucket and the
TCP ramp-up are small against it; `samples` probes of that size give the upload
bandwidth (the best sample: a probe can only be slowed down by other traffic).

Then, with two or more devices, the same sized probes go to all of them at once,
`samples` times (the fastest round counts): if the last echo comes about as soon as the
slowest device's alone, every device has its own link (`shared` False); if it takes
about as long as all of them one after the other, they share one (`shared` True). `auto` plans with the median bandwidth and this topology
unless its name states them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from decolla.runtime.messages import LinkEcho, LinkProbe


@dataclass
class Link:
    """One device's measured link."""
    rtt_s: float
    bytes_per_s: float
    probe_bytes: int = 0          # the size it was measured with

    @property
    def mbit(self) -> float:
        return self.bytes_per_s * 8 / 1e6

    @property
    def probe_s(self) -> float:
        """Seconds one measuring probe took, round trip included."""
        return self.rtt_s + self.probe_bytes / self.bytes_per_s


@dataclass
class _Progress:
    rtts: list = field(default_factory=list)
    size: int = 0
    rates: list = field(default_factory=list)


class LinkProber:
    """Decides which probes to send next and turns echoes into `links` (device -> Link)
    and `shared` (None until measured with two or more devices)."""

    def __init__(self, first_bytes: int = 64 * 1024, max_bytes: int = 4 * 1024 * 1024,
                 target_s: float = 0.04, tiny: int = 3, samples: int = 2,
                 timeout_s: float = 10.0, clock=time.monotonic):
        self.first_bytes, self.max_bytes, self.target_s = first_bytes, max_bytes, target_s
        self.tiny, self.samples, self.timeout_s, self.clock = tiny, samples, timeout_s, clock
        self.links: dict[str, Link] = {}
        self.shared: bool | None = None
        self.todo: list[str] = []                 # devices waiting to be measured, in order
        self.progress: dict[str, _Progress] = {}
        self.out: dict[int, tuple] = {}           # seq -> (device, size, sent at)
        self.together: frozenset | None = None    # devices of the all-at-once probe out
        self.together_s: list = []                # its rounds' times so far
        self.compared: frozenset = frozenset()    # devices the last all-at-once probe covered
        self.seq = 0
        self.ended = 0                            # measurements finished or given up

    @property
    def settled(self) -> bool:
        """At least one measurement has ended and none is waiting."""
        return self.ended > 0 and not self.todo and not self.out and not self._compare_due()

    def track(self, devices, keep=None) -> None:
        """Measure the `devices` not measured yet; forget the ones not in `keep` (default:
        `devices`): a device that is briefly unreachable keeps its figure."""
        devices = list(devices)
        keep = set(devices) if keep is None else set(keep) | set(devices)
        for name in [d for d in self.links if d not in keep]:
            del self.links[name]
        self.todo = [d for d in self.todo if d in keep]
        for d in devices:
            if d not in self.links and d not in self.todo:
                self.todo.append(d)
        for seq in [s for s, o in self.out.items() if o[0] not in keep]:
            self.progress.pop(self.out.pop(seq)[0], None)
        if self.together is not None and not keep >= self.together:
            self._end_together()

    def next_probes(self) -> list[tuple[str, LinkProbe]]:
        """(device, probe) pairs to send now; none while probes are out or nothing is left."""
        if self.out:
            return []
        if self.todo:
            prog = self.progress.setdefault(self.todo[0], _Progress())
            return [self._probe(self.todo[0], prog.size)]
        if self._compare_due():
            if self.together is None:
                self.together, self.together_s = frozenset(self.links), []
            return [self._probe(d, self.links[d].probe_bytes) for d in self.together]
        return []

    def echo(self, msg: LinkEcho) -> Link | None:
        """Account for an echo; the device's Link once its measurement is complete."""
        out = self.out.pop(msg.seq, None)
        if out is None:
            return None              # late echo of an expired probe
        device, size, sent = out
        elapsed = self.clock() - sent
        if self.together is not None:
            if not self.out:         # the last echo of one all-at-once probe
                self.together_s.append(elapsed)
                if len(self.together_s) >= self.samples:
                    # the fastest: a device stalled by its CPU quota only ever adds time
                    self._decide(min(self.together_s))
            return None
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
        link = self.links[device] = Link(min(prog.rtts), max(prog.rates), size)
        del self.progress[device]
        self.todo.remove(device)
        self.ended += 1
        return link

    def expire(self, seq: int) -> str | None:
        """Give up on probe `seq` if it is still out; the device's name, or None. A device
        is skipped until it is listed again; an all-at-once probe leaves
        `shared` as it was."""
        out = self.out.pop(seq, None)
        if out is None:
            return None
        device = out[0]
        if self.together is not None:
            self._end_together()
            return device
        self.progress.pop(device, None)
        self.todo.remove(device)
        self.ended += 1
        return device

    def bandwidth_mbit(self) -> float | None:
        """Median measured bandwidth over the devices (None before any is measured)."""
        if not self.links:
            return None
        return statistics.median(l.mbit for l in self.links.values())

    # ------------------------------------------------------------ internals
    def _probe(self, device: str, size: int) -> tuple[str, LinkProbe]:
        self.seq += 1
        self.out[self.seq] = (device, size, self.clock())
        return device, LinkProbe(self.seq, bytes(size))

    def _compare_due(self) -> bool:
        return len(self.links) >= 2 and frozenset(self.links) != self.compared

    def _decide(self, elapsed: float) -> None:
        alone = [self.links[d] for d in self.together]
        apart = max(l.probe_s for l in alone)
        one_by_one = max(l.rtt_s for l in alone) + sum(l.probe_bytes / l.bytes_per_s
                                                       for l in alone)
        self.shared = elapsed > (apart + one_by_one) / 2
        self._end_together()

    def _end_together(self) -> None:
        self.out.clear()             # while it is out, only its probes are
        self.compared, self.together = self.together, None
