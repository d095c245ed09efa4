"""Allocation policies: which live device computes each chunk of a stage.

Every allocator implements `Allocator.assign(stage, chunks, devices)` and returns one
device name per chunk, always naming a live device. Build one by name with
`make_allocator`; the timing they reason with is `decolla.cost`.
"""
from __future__ import annotations

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


def make_allocator(name: str, **kw) -> Allocator:
    """Build an allocator by name: random, average, least, proportional, eft, learned(path=...)."""
    try:
        cls = ALLOCATORS[name]
    except KeyError:
        raise ValueError(f"unknown allocator {name!r}; choose from {sorted(ALLOCATORS)}") from None
    return cls(**kw)


__all__ = ["ALLOCATORS", "ALLOCATOR_NAMES", "Allocator", "NoLiveDevice", "make_allocator",
           "live_devices", "resource", *(c.__name__ for c in ALLOCATORS.values())]
