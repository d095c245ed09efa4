"""Allocation policies: which live device computes each chunk of a stage.

Every allocator implements `Allocator.assign(stage, chunks, devices)` and returns one
device name per chunk, always naming a live device. Build one by name with
`make_allocator` ("eft", "learned", "learned:path=policy.npz"); the timing they reason
with is `decolla.cost`.
"""
from __future__ import annotations

import inspect
from typing import Protocol, Sequence

from decolla.allocators.base import NoLiveDevice, live_devices, resource
from decolla.allocators.heuristics import (AverageAllocator, EarliestFinishAllocator, LeastAllocator,
                                           ProportionalAllocator, RandomAllocator)
from decolla.allocators.learned import LearnedAllocator
from decolla.cost import ChunkCost, DeviceState, StageInfo


class Allocator(Protocol):
    name: str

    def assign(self, stage: StageInfo, chunks: Sequence[ChunkCost],
               devices: Sequence[DeviceState]) -> list[str]:
        """Return a live device name for each chunk (same order as `chunks`)."""
        ...


ALLOCATORS = {cls.name: cls for cls in (RandomAllocator, AverageAllocator, LeastAllocator,
                                        ProportionalAllocator, EarliestFinishAllocator,
                                        LearnedAllocator)}
ALLOCATOR_NAMES = tuple(ALLOCATORS)


def parse_allocator_name(spec: str) -> tuple[str, dict]:
    """'learned:path=policy.npz' -> ('learned', {'path': 'policy.npz'}); whole numbers become
    ints ('random:seed=3'), other values stay strings."""
    name, _, rest = str(spec).partition(":")
    opts = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"allocator option {item!r} in {spec!r} is not KEY=VALUE")
        val = val.strip()
        opts[key.strip()] = int(val) if val.lstrip("-").isdigit() else val
    return name.strip(), opts


def make_allocator(spec: str, **kw) -> Allocator:
    """Build an allocator from its name, options after a colon: random, average, least,
    proportional, eft, learned (the shipped policy) or learned:path=FILE.npz."""
    name, opts = parse_allocator_name(spec)
    try:
        cls = ALLOCATORS[name]
    except KeyError:
        raise ValueError(f"unknown allocator {name!r}; choose from {sorted(ALLOCATORS)} "
                         "(learned:path=FILE.npz for your own policy)") from None
    try:
        inspect.signature(cls).bind(**opts, **kw)
    except TypeError as exc:
        raise ValueError(f"allocator {spec!r}: {exc}") from None
    return cls(**opts, **kw)


__all__ = ["ALLOCATORS", "ALLOCATOR_NAMES", "Allocator", "NoLiveDevice", "make_allocator",
           "live_devices", "parse_allocator_name", "resource", *(c.__name__ for c in ALLOCATORS.values())]
