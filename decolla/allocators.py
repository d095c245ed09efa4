"""Allocation policies: which live device computes each chunk of a stage.

Every allocator implements `Allocator.assign(stage, chunks, devices)` and returns
one device name per chunk, always naming a live device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class DeviceState:
    """What the allocator knows about one device when a stage is planned."""
    name: str
    speed: float          # MAC/s the device reaches when fully available (measured)
    available: float      # fraction of its CPU free for DeColla, 0..1
    bandwidth: float      # bytes/s between the requester and this device
    queue: int = 0        # chunks already queued or running on it
    alive: bool = True


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


class Allocator(Protocol):
    name: str

    def assign(self, stage: StageInfo, chunks: Sequence[ChunkCost],
               devices: Sequence[DeviceState]) -> list[str]:
        """Return a live device name for each chunk (same order as `chunks`)."""
        ...


class NoLiveDevice(RuntimeError):
    """Raised when a stage must be allocated but no device is alive."""
