"""What every allocator uses: the live devices and a device's free compute."""
from __future__ import annotations

from typing import Sequence

from decolla.cost import DeviceState


class NoLiveDevice(RuntimeError):
    """Raised when a stage must be allocated but no device is alive."""


def live_devices(devices: Sequence[DeviceState]) -> list[DeviceState]:
    """The alive devices, in input order; raises NoLiveDevice when there are none."""
    live = [d for d in devices if d.alive]
    if not live:
        raise NoLiveDevice("no live device to allocate the stage to")
    return live


def resource(d: DeviceState) -> float:
    """Available compute of a device in MAC/s (the ranking the heuristics use)."""
    return d.speed * max(d.available, 0.0)
