"""The heuristic allocators: random, average, least, proportional, earliest finish time."""
from __future__ import annotations

import numpy as np

from decolla.allocators.base import live_devices, resource
from decolla.cost import Placement


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
        plan = Placement.of(live, stage.uplink)
        out = []
        for c in chunks:
            i = int(plan.times(c.macs, c.bytes_in, c.bytes_out).argmin())
            plan.commit(i)
            out.append(live[i].name)
        return out
