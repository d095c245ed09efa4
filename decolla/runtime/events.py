"""Live chunk events on their way to a request's caller, sent in batches.

A caller following a request (`Client.infer(on_event=...)`) gets its ChunkEvents in one
ChunkEvents message per `interval` seconds, and the rest just before the reply. One actor
message per event made following a request double its latency: the reply waited behind
hundreds of messages, each a round trip to the caller's process.
"""
from __future__ import annotations

from typing import Any

from decolla.runtime.messages import ChunkEvent, ChunkEvents

FLUSH_S = 0.1      # a live view redraws no faster; one message per 0.1 s costs ~1 %


class EventBatches:
    """Pending events per request, with the time the oldest of them was queued."""

    def __init__(self, interval: float = FLUSH_S):
        self.interval = interval
        self._pending: dict[str, tuple[Any, float, list[ChunkEvent]]] = {}

    def add(self, request: str, caller: Any, event: ChunkEvent, now: float) -> None:
        entry = self._pending.setdefault(request, (caller, now, []))
        entry[2].append(event)

    def take(self, request: str) -> tuple[Any, ChunkEvents] | None:
        """The request's pending events as one message (None if there are none)."""
        entry = self._pending.pop(request, None)
        if entry is None:
            return None
        return entry[0], ChunkEvents(request, entry[2])

    def due(self, now: float) -> list[tuple[Any, ChunkEvents]]:
        """Batches whose oldest event has waited `interval` or longer."""
        ready = [r for r, (_, t, _) in self._pending.items() if now - t >= self.interval]
        return [self.take(r) for r in ready]
